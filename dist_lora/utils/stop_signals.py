"""Stop signals (preemption, time limits, Ctrl-C), remembered until the program can stop cleanly."""

from __future__ import annotations

import signal
from types import FrameType

# Exit status of a run that checkpointed and stopped early (preemption or checkpoint.stop_at_step):
# EX_TEMPFAIL, "try again": start the same command again to resume.
PREEMPTED_EXIT_CODE = 75
# Written into the run directory by such a run (launchers like torchrun turn any non-zero worker status
# into their own failure status, so job scripts look for this file).
PREEMPTED_MARKER = "preempted.json"


class Preempted(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The run checkpointed and stopped; starting it again with checkpoint.resume = 'latest' continues."""

    def __init__(self, step: int, checkpoint: str, reason: str, message: str = "") -> None:
        super().__init__(message or f"stopped at step {step} ({reason}); checkpoint {checkpoint or 'none yet'}")
        self.step, self.checkpoint, self.reason = step, checkpoint, reason


class StopSignals:
    """Remembers SIGTERM / SIGUSR1 / SIGINT (preemption, Slurm's time-limit warning, a pod's stop,
    Ctrl-C) until the code reaches a point where it can stop cleanly.

    ``install()`` sets the handlers for the whole life of the process (the CLI does it first thing), so a
    signal during start-up, caching, a checkpoint write or the export is remembered rather than fatal:
    a write in progress completes, a run that has finished still exits 0. A second Ctrl-C interrupts at
    once. DataLoader workers ignore these signals (``ignore_in_worker``) and leave the decision to their
    rank: Slurm signals every process of a job step, workers included.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    _process: StopSignals | None = None

    def __init__(self) -> None:
        self.received: str = ""
        self._previous: dict[int, object] = {}

    @classmethod
    def install(cls) -> StopSignals:
        if cls._process is None:
            cls._process = cls().__enter__()
        return cls._process

    @classmethod
    def current(cls) -> StopSignals:
        """The process-wide handler if installed, else one that never fires (library use in-process)."""
        return cls._process or cls()

    def __enter__(self) -> StopSignals:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        self.received = self.received or signal.Signals(signum).name


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: stop signals are for the training process to act on."""
    for sig in StopSignals.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def signal_hook(moment: str) -> None:
    """Test hook: ``DIST_LORA_SIGNAL_AT=MOMENT`` sends SIGTERM to this process's whole process group (as
    Slurm signals every process of a step, DataLoader workers included) when the program reaches
    MOMENT: ``checkpoint:STEP`` (half-way through writing that checkpoint), ``export`` (before the adapter
    is written), ``after_export``, or ``cache_shard:N`` (after this rank's N-th cached shard)."""
    import os

    if os.environ.get("DIST_LORA_SIGNAL_AT") == moment:
        os.killpg(os.getpgid(0), signal.SIGTERM)
