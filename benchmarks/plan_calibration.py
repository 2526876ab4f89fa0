"""The memory plan checked at full size on the CPU: planned bytes against bytes measured in real steps.

    .venv/bin/python -m benchmarks.plan_calibration [--rows all] [--out benchmarks/results/plan_calibration_cpu.json]

Every row runs in a fresh process, which builds the full SD 1.5 or SDXL UNet from the published configs
(``dist_lora.models.reference``) with random weights, attaches a rank-16 LoRA as training does
(``network`` defaults: attention and feed-forward projections), and runs one real training step: forward,
a loss, backward. The plan's figures come from ``dist-lora plan``'s own code (``measure_model`` on the meta
device and ``estimate``) for the same model, image size, precision and switches.

Measured: live tensor bytes, from torch's profiler, which records every allocation and free of the CPU
allocator during the step (``profile_memory=True``). Beside them, for reference, the process's resident
memory: glibc is told to serve every allocation of 64 KiB or more by mmap and to hand it back on free
(MALLOC_MMAP_THRESHOLD_, which also stops it raising that threshold as it goes), and the step's peak is
the kernel's high-water mark (VmHWM), reset before the step; it also holds host-only bookkeeping (the
autograd graph's nodes, about 40 MiB for SD 1.5 at any size), which a GPU's memory does not. Rows:

- ``saved after forward``: resident memory after the forward pass, less before it: what autograd keeps
  for the backward pass (without checkpointing: every saved tensor; with it: each checkpointed unit's
  inputs and what runs outside the units). Planned: the saved-tensor count (``plain``), or the
  checkpointed count less the unit recomputed in the backward pass.
- ``step peak``: the most bytes alive at once during the step beyond the weights and the adapters'
  gradients (allocated before the step): saved tensors, the recomputed unit, the gradients in flight.
  Planned: the plan's "UNet activations" component.
- ``UNet weights + adapters``: the sum of the model's tensor storage (resident memory beside it).
- ``frozen UNet``: the bytes of the frozen UNet in bf16, fp8, nf4 and int8 (the bnb quantisers on the
  CPU), measured as the resident memory the converted model adds and as the sum of its tensors' storage;
  planned: the plan's "UNet weights" component.

The steps run in fp32: this CPU (AVX2, no AVX-512 BF16 / AMX) multiplies bf16 matrices at 0.5 GFLOP/s,
fp32 at about 60. The plan's figures scale with the compute dtype's bytes, so fp32 checks the same
arithmetic. SDXL 1024^2 without checkpointing needs 9.6 GiB of fp32 weights plus 13.4 GiB of
activations, more than this machine's 24 GiB, so that row stores the frozen base in fp8
(``model.base_dtype = "fp8"``, upcast to fp32 per layer), which the plan knows too.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "plan_calibration_cpu.json"
GOAL = 0.10  # every row within 10% of what is measured
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024),
              "MALLOC_ARENA_MAX": "2"}


@dataclass(frozen=True)
class StepRow:
    arch: str  # sd15 / sdxl
    side: int  # image side in pixels
    checkpointing: bool
    base_dtype: str  # auto / fp8

    @property
    def name(self) -> str:
        base = "" if self.base_dtype == "auto" else f", {self.base_dtype} base"
        return f"{self.arch} {self.side}^2, fp32, checkpointing {'on' if self.checkpointing else 'off'}{base}"


STEP_ROWS = {
    "sd15-plain": StepRow("sd15", 512, False, "auto"),
    "sd15-checkpointed": StepRow("sd15", 512, True, "auto"),
    "sdxl-checkpointed": StepRow("sdxl", 1024, True, "auto"),
    "sdxl-plain-fp8": StepRow("sdxl", 1024, False, "fp8"),
}
WEIGHT_ROWS = {"sd15-weights": "sd15", "sdxl-weights": "sdxl"}


def _resident() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _high_water_mark() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # resets VmHWM to the current resident size


def _settled() -> int:
    gc.collect()
    return _resident()


def _network() -> Any:
    from dist_lora.config import NetworkConfig

    return NetworkConfig()


def _family(arch: str) -> str:
    return "sdxl" if arch == "sdxl" else "sd1"


def _build_unet(arch: str) -> Any:
    from diffusers import UNet2DConditionModel

    from dist_lora.models.reference import FULL_SIZE

    torch_module = __import__("torch")
    torch_module.manual_seed(0)
    return UNet2DConditionModel.from_config(FULL_SIZE[arch]["unet"]).requires_grad_(False)


def _inputs(arch: str, side: int, unet: Any) -> dict[str, Any]:
    import torch

    from dist_lora.models.reference import sdxl_pooled_width

    config = unet.config
    inputs: dict[str, Any] = {
        "sample": torch.randn(1, config.in_channels, side // 8, side // 8),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 77, config.cross_attention_dim)}
    if arch == "sdxl":
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, sdxl_pooled_width(config)),
                                       "time_ids": torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32)}
    return inputs


def _plan(arch: str, side: int, precision: str, checkpointing: bool, base_dtype: str) -> dict[str, int]:
    import torch

    from dist_lora.models.reference import write_config_folder
    from dist_lora.planning.estimate import RunSettings, estimate
    from dist_lora.planning.shapes import measure_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_config_folder(arch, Path(tmp) / arch)
        dtype = {"no": torch.float32, "bf16": torch.bfloat16}[precision]
        sizes = measure_model(folder, _network(), (side, side), dtype)
    run = RunSettings(batch_size=1, gradient_accumulation_steps=1, mixed_precision=precision,
                      gradient_checkpointing=checkpointing, optimizer="adamw", cached_latents=True, cached_text=True,
                      train_text_encoder=False, vae_fp32=False, base_dtype=base_dtype)
    plan = estimate(sizes, run)
    by_name = {c.name.split(" (")[0]: c.bytes for c in plan.components}
    acts = sizes.unet_activations
    return {"unet_weights": by_name["UNet weights"], "adapter_params": sizes.unet_adapter_params,
            "activations": acts.checkpointed if checkpointing else acts.plain,
            "saved_after_forward": acts.checkpointed - acts.recomputed if checkpointing else acts.plain}


def _step_row(key: str) -> dict[str, Any]:
    import torch

    from dist_lora.adapters.inject import lora_parameters
    from dist_lora.adapters.network import attach_network
    from dist_lora.models.fp8_base import store_in_fp8

    row = STEP_ROWS[key]
    torch.set_num_threads(os.cpu_count() or 1)
    plan = _plan(row.arch, row.side, "no", row.checkpointing, row.base_dtype)
    started = time.perf_counter()
    before_model = _settled()
    unet = _build_unet(row.arch)
    if row.base_dtype == "fp8":
        store_in_fp8(unet, torch.float32)
    attach_network(unet, [], _family(row.arch), _network())
    adapters = lora_parameters(unet)
    for p in adapters:
        p.data = p.data.float()
    if row.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    inputs = _inputs(row.arch, row.side, unet)
    built = time.perf_counter()
    resident_weights = _settled() - before_model
    stored_weights = _storage_bytes(unet)
    # The adapters' gradients exist before the step (as after any first step without set_to_none): the
    # plan counts them with the adapters, so the step's own allocations are the activations alone.
    for p in adapters:
        p.grad = torch.zeros_like(p)
    before_step = _settled()
    _reset_high_water_mark()
    live = _step_allocations(unet, inputs)
    stepped = time.perf_counter()
    resident_peak = _high_water_mark() - before_step
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in adapters if p.grad is not None)
    moved = sum(float(p.grad.abs().sum()) for p in adapters if p.grad is not None)
    measured = {"unet_weights_and_adapters": stored_weights, "unet_weights_and_adapters_resident": resident_weights,
                "saved_after_forward": live["after_forward"], "step_peak": live["peak"],
                "left_after_step": live["end"], "adapter_gradients": gradients, "adapter_gradient_abs_sum": moved,
                "resident_step_peak": resident_peak}
    comparisons = _step_comparisons(plan, measured)
    return {"row": row.name, "arch": row.arch, "image_side": row.side, "compute_dtype": "float32",
            "gradient_checkpointing": row.checkpointing, "base_dtype": row.base_dtype, "adapter_params":
            plan["adapter_params"], "planned": plan, "measured": measured, "comparisons": comparisons,
            "seconds": {"build": round(built - started, 1), "step": round(stepped - built, 1)}}


def _step_allocations(unet: Any, inputs: dict[str, Any]) -> dict[str, int]:
    """One forward + loss + backward under torch's profiler, which records every tensor allocation and free
    of the CPU allocator: the live bytes after the forward pass, their peak during the backward pass, and
    what is left at the end (the adapters' gradients), each relative to before the step."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("calibration_forward"):
            prediction = unet(**inputs).sample
            loss = prediction.float().pow(2).mean()
            del prediction
        with record_function("calibration_backward"):
            loss.backward()
        del loss
    events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    spans = {e.name(): (e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
             if e.name() in ("calibration_forward", "calibration_backward")}
    live, peak, after_forward = 0, 0, None
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if after_forward is None and event.start_ns() > spans["calibration_forward"][1]:
            after_forward = live
        live += event.nbytes()
        if event.start_ns() >= spans["calibration_backward"][0]:
            peak = max(peak, live)
    return {"after_forward": after_forward if after_forward is not None else live, "peak": peak, "end": live}


def _step_comparisons(plan: dict[str, int], measured: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        _compare("saved after forward", plan["saved_after_forward"], measured["saved_after_forward"]),
        _compare("step peak (activations)", plan["activations"], measured["step_peak"]),
        _compare("UNet weights + adapters", plan["unet_weights"] + plan["adapter_params"] * 4,
                 measured["unet_weights_and_adapters"]),
    ]


def _weights_plan(arch: str) -> dict[str, int]:
    return {dtype: _plan(arch, 512 if arch == "sd15" else 1024, "bf16", False, dtype)["unet_weights"]
            for dtype in ("auto", "fp8", "nf4", "int8")}


def _weights_comparisons(planned: dict[str, int], measured: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    comparisons = []
    for dtype in ("auto", "fp8", "nf4", "int8"):
        label = "bf16" if dtype == "auto" else dtype
        comparisons.append(_compare(f"frozen UNet, {label} (resident)", planned[dtype], measured[label]["resident"]))
        comparisons.append(_compare(f"frozen UNet, {label} (tensor storage)", planned[dtype],
                                    measured[label]["tensor_storage"]))
    return comparisons


def _storage_bytes(model: Any) -> int:
    """Bytes of every distinct tensor storage the model holds: parameters, buffers and the quantisers' state
    (bitsandbytes keeps each layer's absmax / scales on the weight's quant_state or the layer)."""
    import torch

    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for tensor in [*model.parameters(), *model.buffers()]:
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            for value in vars(state).values():
                add(value)
                if hasattr(value, "absmax"):  # nested quantisation state
                    add(value.absmax)
    for module in model.modules():
        for attr in ("SCB", "CB"):
            add(getattr(getattr(module, "weight", None), attr, None))
        add(getattr(getattr(module, "state", None), "SCB", None))
    return sum(seen.values())


def _weights_row(key: str) -> dict[str, Any]:
    import copy

    import torch

    from dist_lora.models.fp8_base import store_in_fp8
    from dist_lora.models.quantized_base import quantize_linears

    arch = WEIGHT_ROWS[key]
    torch.set_num_threads(os.cpu_count() or 1)
    planned = _weights_plan(arch)
    base = _build_unet(arch).to(torch.bfloat16)
    gc.collect()
    measured = {}
    for dtype in ("auto", "fp8", "nf4", "int8"):
        before = _settled()
        model = copy.deepcopy(base)
        if dtype == "fp8":
            store_in_fp8(model, torch.bfloat16)
        elif dtype in ("nf4", "int8"):
            quantize_linears(model, dtype, torch.bfloat16, torch.device("cpu"))
        resident = _settled() - before
        storage = _storage_bytes(model)
        label = "bf16" if dtype == "auto" else dtype
        measured[label] = {"resident": resident, "tensor_storage": storage}
        del model
    ratios = {label: round(m["tensor_storage"] / measured["bf16"]["tensor_storage"], 4)
              for label, m in measured.items()}
    return {"row": f"{arch} frozen UNet weights", "arch": arch, "planned": planned, "measured": measured,
            "share_of_bf16": ratios, "comparisons": _weights_comparisons(planned, measured)}


def _compare(what: str, planned: int, measured: int) -> dict[str, Any]:
    error = (planned - measured) / measured if measured else float("inf")
    return {"what": what, "planned_bytes": planned, "measured_bytes": measured,
            "planned_gib": round(planned / 2**30, 3), "measured_gib": round(measured / 2**30, 3),
            "relative_error": round(error, 4), "within_goal": abs(error) <= GOAL}


def _child(key: str) -> None:
    result = _step_row(key) if key in STEP_ROWS else _weights_row(key)
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")


def _run_row(key: str) -> dict[str, Any]:
    env = {**os.environ, **MALLOC_ENV, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.plan_calibration", "--child", key], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"row {key} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1][len("RESULT "):]))


def _replan(path: Path) -> None:
    report = json.loads(path.read_text(encoding="utf-8"))
    for row in report["rows"]:
        if "gradient_checkpointing" in row:
            row["planned"] = _plan(row["arch"], row["image_side"], "no", row["gradient_checkpointing"],
                                   row["base_dtype"])
            row["comparisons"] = _step_comparisons(row["planned"], row["measured"])
        else:
            row["planned"] = _weights_plan(row["arch"])
            row["comparisons"] = _weights_comparisons(row["planned"], row["measured"])
        for c in row["comparisons"]:
            print(f"{row['row']}: {c['what']}: planned {c['planned_gib']} GiB, measured {c['measured_gib']} GiB "
                  f"({c['relative_error']:+.1%})", flush=True)
    report["all_within_goal"] = all(c["within_goal"] for r in report["rows"] for c in r["comparisons"])
    report["planned_on"] = datetime.date.today().isoformat()
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"rewrote {path}; all within {GOAL:.0%}: {report['all_within_goal']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="all", help=f"comma-separated of {', '.join([*STEP_ROWS, *WEIGHT_ROWS])}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--replan", action="store_true",
                        help="recompute the planned figures of --out's measured rows with this checkout's plan "
                             "(the measurements do not depend on the plan's code)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    if args.replan:
        _replan(args.out)
        return
    keys = [*STEP_ROWS, *WEIGHT_ROWS] if args.rows == "all" else args.rows.split(",")
    unknown = [k for k in keys if k not in STEP_ROWS and k not in WEIGHT_ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {[*STEP_ROWS, *WEIGHT_ROWS]}")
    rows = []
    for key in keys:
        result = _run_row(key)
        rows.append(result)
        for c in result["comparisons"]:
            print(f"{result['row']}: {c['what']}: planned {c['planned_gib']} GiB, measured {c['measured_gib']} GiB "
                  f"({c['relative_error']:+.1%})", flush=True)
    import diffusers
    import torch

    report = {
        "benchmark": "plan_calibration", "date": datetime.date.today().isoformat(), "goal_relative_error": GOAL,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "device": "cpu"},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "bitsandbytes": __import__("bitsandbytes").__version__},
        "malloc": MALLOC_ENV,
        "all_within_goal": all(c["within_goal"] for r in rows for c in r["comparisons"]),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}; all within {GOAL:.0%}: {report['all_within_goal']}")


if __name__ == "__main__":
    main()
