import pytest
import torch

from dist_lora.config import OptimizerConfig, SchedulerConfig
from dist_lora.train.optim import build_lr_scheduler, build_optimizer, param_groups


def _lrs(kind: str, warmup: int = 2, total: int = 10, **kw: object) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer(param_groups([p], [], OptimizerConfig(lr=1.0)), OptimizerConfig(lr=1.0))
    sched = build_lr_scheduler(opt, SchedulerConfig(type=kind, warmup_steps=warmup, **kw), total)  # type: ignore[arg-type]
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_constant_ignores_warmup() -> None:
    assert _lrs("constant") == [1.0] * 10


def test_warmup_then_constant() -> None:
    assert _lrs("constant_with_warmup") == pytest.approx([0.0, 0.5] + [1.0] * 8)


def test_linear_and_cosine_decay_to_zero() -> None:
    linear = _lrs("linear", warmup=0)
    assert linear == pytest.approx([1.0 - i / 10 for i in range(10)])
    cosine = _lrs("cosine", warmup=0)
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and cosine[-1] < 0.03


def test_restarts_and_polynomial() -> None:
    restarts = _lrs("cosine_with_restarts", warmup=0, num_cycles=2)
    assert restarts[5] == pytest.approx(1.0)  # second cycle starts again at the peak
    poly = _lrs("polynomial", warmup=0, power=2.0)
    assert poly[0] == 1.0 and poly[5] < _lrs("linear", warmup=0)[5]


def test_text_encoder_group_gets_its_own_lr() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    groups = param_groups([a], [b], OptimizerConfig(lr=1e-4, text_encoder_lr=5e-5))
    assert [g["lr"] for g in groups] == [1e-4, 5e-5]
