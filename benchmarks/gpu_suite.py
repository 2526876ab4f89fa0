"""GPU benchmark suite: img/s, peak memory (measured beside planned) and MFU of dist_lora's training step
against a bare loop.

    .venv/bin/python benchmarks/gpu_suite.py --out suite.json                  # full size on the GPU (about 6 min)
    .venv/bin/python benchmarks/gpu_suite.py --size tiny --device cpu --rows a,b,c,d,e,f,g --out /tmp/suite.json

Full size builds SD 1.5 and SDXL from their published configs (dist_lora.models.reference) with random
weights, on the device (once; each case gets a fresh copy): nothing is downloaded. Rows, most important
first (the default runs a, b, e, f, g):

  a  SDXL LoRA (rank 16, attn_ff, bf16): a bare PyTorch loop doing the same math (same UNet, adapters,
     batch, dtype, the adapters computing in their input's dtype, the noise schedule on the device;
     batch-level noise, no checks, no syncs) against dist_lora's own step (StepRunner and TrainingLoop:
     keyed per-sample draws, guard, metrics) on the same in-memory batch; batch 1 and 4, gradient
     checkpointing off and on. The ratio dist_lora / bare is the headline.
  b  batch 1 with checkpointing: cached vs online latents; adamw, adamw8bit, paged_adamw8bit.
  c  switches on the bare loop at batch 4: SDPA, channels_last, peft's fp32 copy of each adapted layer's
     input, fused AdamW, xformers (when installed), regional torch.compile (only with --compile).
  d  SD 1.5 from JPEG shards through the real loader with 1 and 4 workers.
  e  fp16 overflow recovery: inf gradients injected at two steps; the loss scale halves twice and
     training continues.
  f  single-process DeepSpeed ZeRO-2 and ZeRO-3 with checkpointing (a child process each).
  g  the frozen base stored in fp8 and in nf4 (model.base_dtype), batch 1 with checkpointing.

Every case checks the time limit: one that would not finish in the time left (judged by the row's
previous case) is "skipped", and a case's timed steps are cut (to no fewer than 3) when its warm-up shows
they would pass the limit. The JSON is written after every case; a case that runs out of memory is a
result ("oom"). TF32 is set once as the trainer sets it and checked unchanged after each case.

Metrics: step time from CUDA events after warm-up; peak memory (max_memory_allocated, max_memory_reserved,
device total minus free) beside the plan's prediction for the case (``dist-lora plan``'s own estimate,
``plan_error`` = measured / planned - 1); MFU = model FLOPs of a step (forward and backward once, counted
with torch.utils.flop_counter with checkpointing off) x steps/s / the data sheet's dense bf16 peak, and
the same against the bf16 matmul rate measured on the device; with checkpointing, HFU from the FLOPs that
ran (the recomputed forward included). The counter sees torch's own matmuls: bitsandbytes' 4-bit ones
are not in an nf4 case's hardware FLOPs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gpu.context import Suite, environment, set_tf32, tf32_state  # noqa: E402
from benchmarks.gpu.measure import matmul_bf16_flops  # noqa: E402
from benchmarks.gpu.rows import DEFAULT_ROWS, ROWS, free, zero_child  # noqa: E402
from dist_lora.train.precision import allow_tf32  # noqa: E402


def run_rows(suite: Suite, keys: list[str]) -> None:
    for key in keys:
        previous_case_s = 0.0
        for case in ROWS[key](suite):
            if suite.seconds_left() <= previous_case_s:
                suite.rows.append({"row": case.name, "status": "skipped", "reason": "time limit"})
                suite.write()
                continue
            began = time.time()
            try:
                suite.rows.append({"row": case.name, "status": "ok", **case.run()})
            except torch.OutOfMemoryError as exc:
                suite.rows.append({"row": case.name, "status": "oom", "error": str(exc)[:500]})
            except Exception as exc:  # noqa: BLE001 - a failed case is a result; the others still run
                error = f"{type(exc).__name__}: {exc}"[:2000]
                suite.rows.append({"row": case.name, "status": "failed", "error": error})
            free()
            previous_case_s = time.time() - began
            suite.rows[-1]["case_s"] = previous_case_s
            if tf32_state() != suite.env["tf32"]:
                suite.rows[-1]["tf32_changed"] = tf32_state()
                set_tf32(suite.env["tf32"])
            suite.write()
            print(f"{case.name}: {suite.rows[-1]['status']} in {previous_case_s:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="")
    parser.add_argument("--rows", default=DEFAULT_ROWS)
    parser.add_argument("--time-limit", type=float, default=420.0, help="seconds, checked before each case")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per measurement (default 10 full, 3 tiny)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps first (default 3 full, 1 tiny)")
    parser.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    parser.add_argument("--zero-stages", default="2,3", help="ZeRO stages of row f")
    parser.add_argument("--compile", action="store_true", help="add regional torch.compile to row c (minutes)")
    parser.add_argument("--child-zero", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [key for key in args.rows.split(",") if key not in ROWS]
    if unknown:
        parser.error(f"--rows: no row {', '.join(unknown)}; the rows are {', '.join(ROWS)}")
    device = torch.device(args.device)
    name = torch.cuda.get_device_properties(device).name.replace(" ", "_") if device.type == "cuda" else "cpu"
    out = Path(args.out or REPO / "benchmarks" / "results" / f"gpu_{name}.json")
    allow_tf32()  # as the trainer sets it, in every row
    with tempfile.TemporaryDirectory() as scratch:
        full = args.size == "full"
        suite = Suite(args.size, device, out, time.time() + args.time_limit, args.steps or (10 if full else 3),
                      args.warmup or (3 if full else 1), Path(args.work or scratch), compile=args.compile,
                      zero_stages=tuple(int(x) for x in args.zero_stages.split(",")))
        suite.env = {**environment(device), "tf32": tf32_state()}
        if args.child_zero:
            print(json.dumps(zero_child(suite, args.child_zero)))
            return 0
        suite.env["matmul_bf16_flops"] = matmul_bf16_flops(device)
        suite.write()
        run_rows(suite, args.rows.split(","))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
