"""What the training loop counts, in one resumable object."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class TrainState:
    """Where the run stands and what it has seen, saved in every checkpoint (``train_state.json``).

    ``batch_in_epoch`` and ``micro_step`` are in the current layout's terms (its batch size and
    accumulation): a resume on another layout translates them once, when it starts."""

    step: int = 0  # optimizer steps done (skipped ones included)
    micro_step: int = 0  # micro-batches done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed
    skipped_steps: int = 0  # updates not applied, for any reason
    loss_scale_skips: int = 0  # of which the fp16 loss scaler skipped for an overflow
    consecutive_skips: int = 0
    first_loss: float | None = None  # of the whole run
    resumes: list[dict[str, object]] = field(default_factory=list)  # step, checkpoint and time of each resume

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {f.name for f in fields(self)}
        for name, value in state.items():
            if name in known:  # a field a later version adds is ignored here, not an error
                setattr(self, name, value)
        self.resumes = [dict(r) for r in self.resumes]
