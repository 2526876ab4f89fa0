"""Frozen modules held in host memory and copied to the device only while they run."""

from __future__ import annotations

import torch
from torch import nn

from dist_lora.train.offload import FrozenOffload


def _frozen() -> nn.Module:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).eval().requires_grad_(False)
    module[1].running_mean.normal_()  # a buffer that is not its initial value
    return module


def test_on_device_copies_and_home_is_the_host_copy_again() -> None:
    module, reference = _frozen(), _frozen()
    params = list(module.parameters())
    offload = FrozenOffload([module], torch.device("cpu"))
    homes = [p.data_ptr() for p in module.parameters()] + [b.data_ptr() for b in module.buffers()]
    x = torch.randn(4, 6)
    assert offload.is_home(module)
    with offload.on_device(module):
        assert not offload.is_home(module)
        working = [p.data_ptr() for p in module.parameters()] + [b.data_ptr() for b in module.buffers()]
        assert not set(working) & set(homes)  # every parameter and buffer is a distinct device copy
        with offload.on_device(module):  # nested: the copy made outside is used, not made again
            assert [p.data_ptr() for p in module.parameters()] + [b.data_ptr() for b in module.buffers()] == working
        assert not offload.is_home(module)
        assert torch.equal(module(x), reference(x))
    assert offload.is_home(module)
    assert [p.data_ptr() for p in module.parameters()] + [b.data_ptr() for b in module.buffers()] == homes
    # Parameters keep their identity (hooks, peft and optimizers hold them) and their values.
    assert all(a is b for a, b in zip(module.parameters(), params, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), reference.state_dict().values(),
                                                 strict=True))


def test_modules_it_does_not_manage_pass_through() -> None:
    managed, other = _frozen(), _frozen()
    offload = FrozenOffload([managed], torch.device("cpu"))
    pointers = [p.data_ptr() for p in other.parameters()]
    with offload.on_device(other, None, managed):
        assert [p.data_ptr() for p in other.parameters()] == pointers
        assert not offload.is_home(managed)
    assert not offload.manages(other) and offload.manages(managed) and not offload.manages(None)
