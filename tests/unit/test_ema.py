"""The adapter weight average against one computed by hand, its swap, and its checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dist_lora.config import EmaConfig
from dist_lora.train.checkpoint_format import CheckpointError
from dist_lora.train.ema import AdapterEMA


def _params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(4))]


def _named(params: list[nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
    return [(f"layer{i}.weight", p) for i, p in enumerate(params)]


def test_average_every_second_step_with_the_warm_up_decay() -> None:
    params = _params()
    ema = AdapterEMA(_named(params), EmaConfig(decay=0.6, update_every=2))
    by_hand: list[torch.Tensor] | None = None
    updates = 0
    g = torch.Generator().manual_seed(0)
    for step in range(1, 12):
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=g))
        assert ema.due(step) == (step % 2 == 0)
        if ema.due(step):
            ema.update()
        if step % 2 == 0:
            updates += 1
            # diffusers' EMAModel: the first update takes the weights; the n-th decays by min(decay, n/(9 + n)).
            decay = 0.0 if updates == 1 else min(0.6, updates / (9 + updates))
            current = [p.detach().clone() for p in params]
            if by_hand is None:
                by_hand = current
            else:
                by_hand = [decay * a + (1 - decay) * c for a, c in zip(by_hand, current, strict=True)]
    assert by_hand is not None and updates == 5
    for got, want in zip(ema.average.shadow_params, by_hand, strict=True):
        torch.testing.assert_close(got, want)


def test_swap_restores_the_trained_weights_bit_for_bit_and_checkpoints_round_trip(tmp_path: Path) -> None:
    params = _params()
    ema = AdapterEMA(_named(params), EmaConfig(decay=0.9))
    for _ in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(torch.full(p.shape, 1.0 / 3))
        ema.update()
    trained = [p.detach().clone() for p in params]
    with ema.swapped_in():
        assert all(torch.equal(p, s) for p, s in zip(params, ema.average.shadow_params, strict=True))
        assert not torch.equal(params[0], trained[0])
    assert all(torch.equal(p, t) for p, t in zip(params, trained, strict=True))
    saved = ema.state_dict()
    again = AdapterEMA(_named(_params()), EmaConfig(decay=0.9))
    again.load_state_dict(saved)
    assert again.average.optimization_step == 3
    assert all(torch.equal(a, b) for a, b in zip(again.average.shadow_params, ema.average.shadow_params, strict=True))
    with pytest.raises(CheckpointError, match=r"average of another network \(2 tensors, this one has 1; differing"):
        AdapterEMA([("other.weight", nn.Parameter(torch.zeros(1)))], EmaConfig(decay=0.9)).load_state_dict(saved)
    # A checkpoint without an average: it restarts from the current weights.
    again.missing(tmp_path)
    assert again.average.optimization_step == 0
    assert all(torch.equal(a, p) for a, p in zip(again.average.shadow_params, again.params, strict=True))
