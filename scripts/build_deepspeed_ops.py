"""Build DeepSpeed's CPU ops ahead of the tests that use them: the shared-memory collective (every ZeRO run
on CPU) and CPU Adam (optimizer offload).

DeepSpeed compiles them on first use into torch's extension cache, about 100 s on 2 cores; inside a
multi-process test that is time every rank spends waiting, while the other test worker competes for the
cores. .ci/run starts this in the background while the Slurm packages install. A failure here costs
nothing: the tests then build the ops themselves.
"""

from deepspeed.accelerator import get_accelerator
from deepspeed.ops.op_builder import CPUAdamBuilder

if __name__ == "__main__":
    get_accelerator().create_op_builder("ShareMemCommBuilder").load()
    CPUAdamBuilder().load()
    print("DeepSpeed CPU ops built")
