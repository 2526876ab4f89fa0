"""benchmarks/gpu_suite.py at tiny size on CPU: every row runs and writes what the full-size run writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.distributed_helpers import REPO

pytestmark = pytest.mark.slow


def test_suite_rows_run_at_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--size", "tiny", "--device",
                           "cpu", "--out", str(out), "--rows", "a,b,c,d,e,f,g", "--steps", "1", "--warmup", "1",
                           # single-process ZeRO-3 takes about 20 s a step on CPU; it is tested on 2
                           # processes in test_distributed
                           "--zero-stages", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"date", "machine", "device", "versions", "tf32"} <= result.keys()
    rows = {r["row"]: r for r in result["rows"]}
    assert all(r["status"] in ("ok", "unavailable") for r in rows.values()), \
        {k: r.get("error") for k, r in rows.items() if r["status"] not in ("ok", "unavailable")}
    assert not any("tf32_changed" in r for r in rows.values())
    for batch in (1, 4):
        plain = rows[f"a_sdxl_b{batch}_gc0"]
        checkpointed = rows[f"a_sdxl_b{batch}_gc1"]
        for which in ("bare", "dist_lora"):
            # Model FLOPs do not count the recomputed forward; what ran does.
            assert plain[which]["model_flops_per_step"] == checkpointed[which]["model_flops_per_step"] > 0
            assert plain[which]["hardware_flops_per_step"] == plain[which]["model_flops_per_step"]
            assert checkpointed[which]["hardware_flops_per_step"] > 1.3 * checkpointed[which]["model_flops_per_step"]
            # The plan's prediction for the case sits beside the measurement.
            assert plain[which]["planned_allocated"] > 0
        # Both loops do the same math: the same FLOPs per step, recomputation included.
        assert checkpointed["bare"]["hardware_flops_per_step"] == checkpointed["dist_lora"]["hardware_flops_per_step"]
        assert plain["ratio_step_time"] > 0
    flops = {batch: rows[f"a_sdxl_b{batch}_gc0"]["bare"]["model_flops_per_step"] for batch in (1, 4)}
    assert flops[4] > 3 * flops[1]
    # Checkpointing and an 8-bit optimizer each lower the plan.
    assert rows["a_sdxl_b4_gc1"]["bare"]["planned_allocated"] < rows["a_sdxl_b4_gc0"]["bare"]["planned_allocated"]
    assert (rows["b_sdxl_b1_gc1_cached_adamw8bit"]["planned_allocated"]
            < rows["b_sdxl_b1_gc1_cached_adamw"]["planned_allocated"]
            < rows["b_sdxl_b1_gc1_online_adamw"]["planned_allocated"])
    assert rows["b_sdxl_b1_gc1_cached_adamw8bit"]["optimizer_used"].startswith("bitsandbytes")
    overflow = rows["e_sdxl_fp16_overflow"]
    assert overflow["scales"][2] == overflow["scales"][1] / 2 and overflow["scales"][3] == overflow["scales"][1] / 4
    assert overflow["loss_scale_skips"] == 2 and overflow["adapters_finite"]
    assert rows["g_sdxl_b1_gc1_nf4_base"]["planned_allocated"] < rows["b_sdxl_b1_gc1_cached_adamw"]["planned_allocated"]
    assert {"c_sdxl_b4_sdpa", "c_sdxl_b4_peft_fp32_input_cast", "d_sd15_b4_w1_jpeg", "d_sd15_b4_w4_jpeg",
            "f_sdxl_zero2_gc1", "g_sdxl_b1_gc1_fp8_base"} <= rows.keys()
    assert "c_sdxl_b4_compile_blocks" not in rows  # only with --compile
