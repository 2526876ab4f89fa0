"""The GPU suite's time budget, checked inside rows: cases that would pass the limit are skipped and a
case's timed steps are cut, so a device call never runs past its limit with nothing written."""

import json
import time
from pathlib import Path

import torch

from benchmarks import gpu_suite
from benchmarks.gpu.context import MIN_TIMED_STEPS, Case, Suite, tf32_state
from benchmarks.gpu.measure import timed


def _suite(tmp_path: Path, seconds: float, steps: int = 10, warmup: int = 1) -> Suite:
    suite = Suite("tiny", torch.device("cpu"), tmp_path / "suite.json", time.time() + seconds, steps, warmup, tmp_path)
    suite.env = {"tf32": tf32_state()}
    return suite


def _sleeping(seconds: float) -> dict:
    time.sleep(seconds)
    return {"slept": seconds}


def test_cases_that_would_pass_the_limit_are_skipped(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cases = [Case(f"x{i}", lambda: _sleeping(1.0)) for i in range(4)]
    monkeypatch.setitem(gpu_suite.ROWS, "x", lambda suite: cases)
    monkeypatch.setitem(gpu_suite.ROWS, "y", lambda suite: [Case("y0", lambda: _sleeping(0.0))])
    suite = _suite(tmp_path, 3.0)
    began = time.time()
    gpu_suite.run_rows(suite, ["x", "y"])
    # Two cases of 1 s fit in 3 s; a third would end after the limit, so it and the rest are skipped.
    assert time.time() - began < 3.0
    written = json.loads(suite.out.read_text())["rows"]
    assert [(r["row"], r["status"]) for r in written] == [("x0", "ok"), ("x1", "ok"), ("x2", "skipped"),
                                                           ("x3", "skipped"), ("y0", "ok")]


def test_a_failed_case_is_a_result_and_tf32_is_restored(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def changes_tf32() -> dict:
        torch.backends.cuda.matmul.allow_tf32 = not torch.backends.cuda.matmul.allow_tf32
        raise RuntimeError("boom")

    monkeypatch.setitem(gpu_suite.ROWS, "x", lambda suite: [Case("x0", changes_tf32)])
    suite = _suite(tmp_path, 30.0)
    before = tf32_state()
    gpu_suite.run_rows(suite, ["x"])
    row = json.loads(suite.out.read_text())["rows"][0]
    assert row["status"] == "failed" and "RuntimeError: boom" in row["error"]
    assert row["tf32_changed"]["matmul"] != before["matmul"]
    assert tf32_state() == before


def test_timed_steps_are_cut_to_the_time_left(tmp_path: Path) -> None:
    calls = []

    def step() -> None:
        calls.append(1)
        time.sleep(0.05)

    suite = _suite(tmp_path, 0.3, steps=100, warmup=1)
    result = timed(suite, step, 2)
    # The warm-up step shows 100 steps would take 5 s: cut to the ~5 that fit, never under the minimum.
    assert MIN_TIMED_STEPS <= result["timed_steps"] <= 6
    assert len(calls) == 1 + result["timed_steps"]
    assert abs(result["step_s"] - 0.05) < 0.03 and result["img_per_s"] == 2 / result["step_s"]
    assert timed(_suite(tmp_path, 0.0, steps=100), step, 1)["timed_steps"] == MIN_TIMED_STEPS
