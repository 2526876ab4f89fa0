"""benchmarks/gpu_suite.py at tiny size on CPU: every row runs and writes what the full-size run writes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.distributed_helpers import REPO

pytestmark = pytest.mark.slow


def test_suite_rows_run_at_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--size", "tiny", "--device",
                           "cpu", "--out", str(out), "--rows", "a,b,c,d,e,f", "--steps", "1", "--warmup", "1",
                           # single-process ZeRO-3 takes about 20 s a step on CPU; it is tested on 2
                           # processes in test_distributed
                           "--zero-stages", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"date", "machine", "device", "versions"} <= result.keys()
    rows = {r["row"]: r for r in result["rows"]}
    assert all(r["status"] in ("ok", "unavailable") for r in rows.values()), \
        {k: r.get("error") for k, r in rows.items() if r["status"] not in ("ok", "unavailable")}
    for batch in (1, 4):
        for gc in (0, 1):
            row = rows[f"a_sdxl_b{batch}_gc{gc}"]
            # Both loops do the same math: the same FLOPs per step.
            assert row["bare"]["flops_per_step"] == row["dist_lora"]["flops_per_step"] > 0
            assert row["ratio_step_time"] > 0
    assert rows["a_sdxl_b4_gc0"]["bare"]["flops_per_step"] > 3 * rows["a_sdxl_b1_gc0"]["bare"]["flops_per_step"]
    assert rows["a_sdxl_b1_gc1"]["bare"]["flops_per_step"] > rows["a_sdxl_b1_gc0"]["bare"]["flops_per_step"]
    assert rows["b_sdxl_b1_gc1_cached_adamw8bit"]["optimizer_used"].startswith("bitsandbytes")
    overflow = rows["e_sdxl_fp16_overflow"]
    assert overflow["scales"][2] == overflow["scales"][1] / 2 and overflow["scales"][3] == overflow["scales"][1] / 4
    assert overflow["loss_scale_skips"] == 2 and overflow["adapters_finite"]
    assert {"c_sdxl_b4_sdpa", "c_sdxl_b4_no_peft_input_cast", "d_sd15_b4_w1_jpeg", "d_sd15_b4_w4_jpeg",
            "f_sdxl_zero2_gc1"} <= rows.keys()
