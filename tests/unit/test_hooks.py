"""Step hook schedules and scopes."""

from dist_lora.train.hooks import HookContext, HookRunner, Moment, Schedule, Scope


def _steps(schedule: Schedule, epoch_ends: list[int]) -> list[tuple[str, int]]:
    """Where ``schedule`` fires over a run whose epochs end after the given steps."""
    fired = []
    if schedule.due(HookContext(Moment.START, 0, 0, epoch_ends[-1])):
        fired.append(("start", 0))
    step = 0
    for epoch, end in enumerate(epoch_ends):
        while step < end:
            step += 1
            if schedule.due(HookContext(Moment.STEP, step, epoch, epoch_ends[-1], epoch_finished=step == end)):
                fired.append(("step", step))
    if schedule.due(HookContext(Moment.END, step, len(epoch_ends) - 1, step)):
        fired.append(("end", step))
    return fired


def test_schedules_by_steps_epochs_start_and_end() -> None:
    ends = [4, 8, 12]
    assert _steps(Schedule(every_steps=5), ends) == [("step", 5), ("step", 10)]
    assert _steps(Schedule(every_epochs=2), ends) == [("step", 8)]
    assert _steps(Schedule(every_epochs=1, every_steps=6), ends) == [("step", 4), ("step", 6), ("step", 8),
                                                                      ("step", 12)]
    assert _steps(Schedule(at_start=True, at_end=True), ends) == [("start", 0), ("end", 12)]
    assert _steps(Schedule(), ends) == []


class _Recorder:
    def __init__(self, name: str, scope: Scope, schedule: Schedule, log: list[str]) -> None:
        self.name, self.scope, self.schedule, self.log = name, scope, schedule, log

    def run(self, ctx: HookContext) -> None:
        self.log.append(f"{self.name}@{ctx.step}")


def test_runner_keeps_order_and_runs_main_scope_on_the_main_rank_only() -> None:
    for is_main, expected in ((True, ["a@2", "b@2"]), (False, ["a@2"])):
        log: list[str] = []
        hooks = [_Recorder("a", Scope.ALL_RANKS, Schedule(every_steps=2), log),
                 _Recorder("b", Scope.MAIN, Schedule(every_steps=1), log)]
        HookRunner(hooks, is_main).run(HookContext(Moment.STEP, 2, 0, 10))  # type: ignore[list-item]
        assert log == expected
