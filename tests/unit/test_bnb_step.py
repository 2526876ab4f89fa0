"""bitsandbytes' 8-bit optimizer step without a device synchronisation per parameter computes exactly what
bitsandbytes' own step computes, and keeps its hooks, state and class behaviour."""

from __future__ import annotations

import copy

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.optim import optimizer as bnb_optimizer  # noqa: E402

from dist_lora.train.bnb_step import without_per_parameter_sync  # noqa: E402


def _params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    # Above and below bitsandbytes' 4,096-element threshold for 8-bit state (smaller ones keep 32-bit state).
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((64, 96), (16, 8), (4096 + 7,))]


def _run(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int = 4) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()


@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit"])
def test_same_updates_as_bitsandbytes_without_its_syncs(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs: list[torch.Tensor] = []
    original = bnb_optimizer.sync_gpu
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: (syncs.append(t), original(t)))
    stock_params, ours_params = _params(), _params()
    stock = getattr(bnb.optim, name)([{"params": stock_params[:2]}, {"params": stock_params[2:], "lr": 3e-3}], lr=1e-2)
    ours = without_per_parameter_sync(getattr(bnb.optim, name)([{"params": ours_params[:2]},
                                                                 {"params": ours_params[2:], "lr": 3e-3}], lr=1e-2))
    _run(stock, stock_params)
    assert len(syncs) == 4 * 3  # bitsandbytes: one per parameter per step
    syncs.clear()
    hook_calls: list[int] = []
    ours.register_step_post_hook(lambda *args: hook_calls.append(1))
    _run(ours, ours_params)
    assert syncs == [] and len(hook_calls) == 4
    assert all(torch.equal(a, b) for a, b in zip(stock_params, ours_params, strict=True))
    assert isinstance(ours, getattr(bnb.optim, name)) and type(ours).__name__ == name
    # Its state dict loads into bitsandbytes' own class and continues identically.
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    resumed = getattr(bnb.optim, name)([{"params": resumed_params[:2]}, {"params": resumed_params[2:], "lr": 3e-3}],
                                       lr=1e-2)
    resumed.load_state_dict(copy.deepcopy(ours.state_dict()))
    _run(ours, ours_params, 2)
    _run(resumed, resumed_params, 2)
    assert all(torch.equal(a, b) for a, b in zip(resumed_params, ours_params, strict=True))


def test_paged_optimizers_and_others_keep_their_own_step(monkeypatch: pytest.MonkeyPatch) -> None:
    adamw = torch.optim.AdamW(_params())
    assert without_per_parameter_sync(adamw) is adamw and type(adamw) is torch.optim.AdamW
    paged = without_per_parameter_sync(bnb.optim.PagedAdamW8bit(_params()))
    calls: list[int] = []
    monkeypatch.setattr(type(paged), "_bitsandbytes_step", lambda self, closure=None: calls.append(1))
    paged.step()
    assert calls == [1]
    ours = without_per_parameter_sync(bnb.optim.AdamW8bit(_params()))
    assert without_per_parameter_sync(ours) is ours and type(ours).__mro__[1] is bnb.optim.AdamW8bit  # once
