"""The GPU suite's time budget, checked inside rows: cases that would pass the limit are skipped and a
case's timed steps are cut, so a device call never runs past its limit with nothing written."""

import json
import time
from pathlib import Path

import torch

from benchmarks import gpu_suite
from benchmarks.gpu import context, measure
from benchmarks.gpu.context import MIN_TIMED_STEPS, Case, Suite, tf32_state
from benchmarks.gpu.measure import timed


def _suite(tmp_path: Path, seconds: float, steps: int = 10, warmup: int = 1) -> Suite:
    suite = Suite("tiny", torch.device("cpu"), tmp_path / "suite.json", time.time() + seconds, steps, warmup, tmp_path)
    suite.env = {"tf32": tf32_state()}
    return suite


class _Clock:
    """A clock the cases advance: the budget logic is checked without depending on this machine's load."""

    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now


def test_cases_that_would_pass_the_limit_are_skipped(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    clock = _Clock()
    monkeypatch.setattr(gpu_suite, "time", clock)
    monkeypatch.setattr(context, "time", clock)
    monkeypatch.setattr(gpu_suite, "free", lambda: None)

    def takes(seconds: float) -> dict:
        clock.now += seconds
        return {"took": seconds}

    monkeypatch.setitem(gpu_suite.ROWS, "x", lambda suite: [Case(f"x{i}", lambda: takes(1.0)) for i in range(4)])
    monkeypatch.setitem(gpu_suite.ROWS, "y", lambda suite: [Case("y0", lambda: takes(0.0))])
    suite = _suite(tmp_path, 0)
    suite.deadline = clock.now + 2.5
    gpu_suite.run_rows(suite, ["x", "y"])
    # Two cases of 1 s fit in 2.5 s; a third would end after the limit, so it and the rest are skipped. The
    # next row's first case has no estimate yet and runs while any time is left.
    written = json.loads(suite.out.read_text())["rows"]
    assert [(r["row"], r["status"]) for r in written] == [("x0", "ok"), ("x1", "ok"), ("x2", "skipped"),
                                                           ("x3", "skipped"), ("y0", "ok")]
    assert clock.now == 1002.0


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


def test_timed_steps_are_cut_to_the_time_left(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    clock = _Clock()
    monkeypatch.setattr(context, "time", clock)
    monkeypatch.setattr(measure, "time", clock)
    calls = []

    def step() -> None:
        calls.append(1)
        clock.now += 0.05

    suite = _suite(tmp_path, 0, steps=100, warmup=1)
    suite.deadline = clock.now + 0.3
    result = timed(suite, step, 2)
    # The warm-up step shows 100 steps would take 5 s; 0.25 s are left after it: cut to the 5 that fit.
    assert result["timed_steps"] == 5 and len(calls) == 6
    assert abs(result["step_s"] - 0.05) < 1e-9 and abs(result["img_per_s"] - 40) < 1e-6
    suite.deadline = clock.now  # nothing left: still the minimum, so the case has a measurement
    assert timed(suite, step, 1)["timed_steps"] == MIN_TIMED_STEPS
