import sys

import pytest
import torch

from dist_lora.config import OptimizerConfig, SchedulerConfig
from dist_lora.errors import DistLoraError
from dist_lora.train.lion import Lion
from dist_lora.train.optim import (
    TrainedParameters,
    build_lr_scheduler,
    build_optimizer,
    param_groups,
    parse_optimizer_args,
)


def _lrs(kind: str, warmup: int = 2, total: int = 10, **kw: object) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt, _ = build_optimizer(param_groups(TrainedParameters([p], []), OptimizerConfig(lr=1.0)), OptimizerConfig(lr=1.0))
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
    groups = param_groups(TrainedParameters([a], [b]), OptimizerConfig(lr=1e-4, text_encoder_lr=5e-5))
    assert [g["lr"] for g in groups] == [1e-4, 5e-5]


def test_loraplus_boosts_the_up_projections_of_lora_only() -> None:
    """One AdamW step from LoRA's start (up projection zero, so only it has a gradient): the up projection
    moves ratio times as far under LoRA+, its down projection and a LoHa's factors not at all differently."""
    from peft import LoHaConfig, LoraConfig, inject_adapter_in_model

    from dist_lora.adapters.inject import lora_parameters, up_projection_parameters

    def step(ratio: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        unet = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["0"]),
                                       torch.nn.Sequential(torch.nn.Linear(8, 8)))
        text = inject_adapter_in_model(LoHaConfig(r=4, alpha=4, target_modules=["0"]),
                                       torch.nn.Sequential(torch.nn.Linear(8, 8)))
        params = TrainedParameters(lora_parameters(unet), lora_parameters(text), up_projection_parameters(unet),
                                   up_projection_parameters(text), ratio, ratio)
        cfg = OptimizerConfig(lr=1e-3, text_encoder_lr=2e-3, weight_decay=0.0)
        groups = param_groups(params, cfg)
        opt, _ = build_optimizer(groups, cfg)
        before = {n: p.detach().clone() for n, p in [*unet.named_parameters(), *text.named_parameters()]}
        x = torch.randn(3, 8)
        (unet(x).square().sum() + text(x).square().sum()).backward()
        opt.step()
        assert sum(len(g["params"]) for g in groups) == len(params.unet) + len(params.text)
        return {n: p.detach() - before[n] for n, p in [*unet.named_parameters(), *text.named_parameters()]
                if n in before and p.requires_grad}

    plain, plus = step(0.0), step(16.0)
    up = [n for n in plain if "lora_B" in n]
    assert up and all(plain[n].abs().max() > 0 for n in up)
    for name in plain:
        factor = 16.0 if name in up else 1.0
        torch.testing.assert_close(plus[name], factor * plain[name], rtol=1e-5, atol=1e-9, msg=name)


def _one_step(kind: str, **cfg: object) -> tuple[torch.Tensor, str]:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 64))
    before = p.detach().clone()
    opt, choice = build_optimizer([{"params": [p]}], OptimizerConfig(type=kind, lr=1e-2, **cfg))  # type: ignore[arg-type]
    p.grad = torch.randn_like(p)
    opt.step()
    return (p.detach() - before), choice.used


@pytest.mark.parametrize(("kind", "used"), [
    ("adamw", "torch.optim.AdamW"),
    ("adamw8bit", "bitsandbytes.optim.AdamW8bit"),
    ("paged_adamw8bit", "bitsandbytes.optim.PagedAdamW8bit"),
    ("lion", "bitsandbytes.optim.Lion"),
    ("lion8bit", "bitsandbytes.optim.Lion8bit"),
    ("prodigy", "prodigyopt.Prodigy"),
    ("adafactor", "transformers.optimization.Adafactor"),
])
def test_every_optimizer_steps(kind: str, used: str) -> None:
    delta, got = _one_step(kind)
    assert got == used and delta.abs().max() > 0


def test_fallback_without_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now fails
    with pytest.warns(UserWarning, match=r"'adamw8bit' replaced by torch.optim.AdamW: bitsandbytes"):
        _, used = _one_step("adamw8bit")
    assert used == "torch.optim.AdamW"
    with pytest.warns(UserWarning, match=r"'lion8bit' replaced by dist_lora.train.lion.Lion"):
        _, used = _one_step("lion8bit")


def test_torch_lion_matches_bitsandbytes_lion() -> None:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(32, 32))
    b = torch.nn.Parameter(a.detach().clone())
    ours, theirs = Lion([a], lr=1e-3, weight_decay=0.1), bnb.optim.Lion([b], lr=1e-3, weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(32, 32)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_optimizer_args() -> None:
    assert parse_optimizer_args(["betas=[0.9, 0.99]", "d_coef=2"]) == {"betas": (0.9, 0.99), "d_coef": 2}
    with pytest.raises(DistLoraError, match="not key=value"):
        parse_optimizer_args(["decouple"])
    with pytest.raises(DistLoraError, match="do not fit adamw"):
        build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}], OptimizerConfig(args=["bogus=1"]))
