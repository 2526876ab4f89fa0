"""OFT/BOFT math (dist_lora.adapters.orthogonal, oft_layer) against a plain restatement: the exact Cayley
rotation R = (I + Q)(I - Q)^-1 applied as a dense block-diagonal (OFT) or butterfly (BOFT) matrix product."""

from __future__ import annotations

import pytest
import torch

from dist_lora.adapters.oft_layer import OrthogonalLayer
from dist_lora.adapters.orthogonal import rotate_channels, rotation_change, weight_change


def _dense_rotation(blocks: torch.Tensor, multiplier: float) -> torch.Tensor:
    """The [out, out] matrix M with rotated rows = M @ W, in float64."""
    blocks = blocks.double()
    q = blocks - blocks.transpose(-1, -2)
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    r = multiplier * ((eye + q) @ torch.linalg.inv(eye - q)) + (1 - multiplier) * eye
    if blocks.dim() == 3:  # row block k becomes R_k^T W_k
        return torch.block_diag(*r.transpose(-1, -2))
    dim = blocks.shape[1] * blocks.shape[2]
    total = torch.eye(dim, dtype=torch.float64)
    half = blocks.shape[-1] // 2
    for stage, stage_rotations in enumerate(r):
        stride = 2 ** stage * half
        # Butterfly permutation: channel (c, g, k) -> (c, k, g) with g of 2 and k of stride.
        index = torch.arange(dim).reshape(-1, 2, stride).transpose(1, 2).reshape(-1)
        perm = torch.eye(dim, dtype=torch.float64)[index]
        total = perm.T @ torch.block_diag(*stage_rotations) @ perm @ total
    return total


@pytest.mark.parametrize("shape", [(4, 8, 8), (4, 8, 4, 4)])  # OFT 32 channels; BOFT 4 stages of 8 blocks of 4
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_weight_change_is_the_dense_rotation(shape: tuple[int, ...], multiplier: float) -> None:
    g = torch.Generator().manual_seed(0)
    blocks = 0.3 * torch.randn(shape, generator=g)
    weight = torch.randn(32, 6, 3, 3, generator=g)
    want = (_dense_rotation(blocks, multiplier) @ weight.double().flatten(1)).reshape(weight.shape) - weight.double()
    torch.testing.assert_close(weight_change(weight, blocks, multiplier=multiplier).double(), want, atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("shape", [(4, 8, 8), (4, 8, 4, 4)])
def test_layer_output_is_the_rotated_weight_applied(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.nn.Linear(12, 32)
    layer = OrthogonalLayer(base, "default", shape)
    with torch.no_grad():
        layer.oft_blocks["default"].copy_(0.3 * torch.randn(shape, generator=g))
    x = torch.randn(5, 12, generator=g)
    rotated = base.weight.double() + weight_change(base.weight, layer.oft_blocks["default"]).double()
    want = x.double() @ rotated.T + base.bias.double()  # the bias is not rotated
    torch.testing.assert_close(layer(x).double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(4, 8, 8), (4, 8, 4, 4)])
def test_a_small_rotation_keeps_its_precision_under_bf16_autocast(shape: tuple[int, ...]) -> None:
    """Training starts at R = I and stays near it, so the change a rotation adds to a layer's output is small.
    It must keep bf16's relative precision: rotating the output through BOFT's stages in bf16 and then
    subtracting the output leaves 30% of a change of 1e-3 as rounding error (measured)."""
    g = torch.Generator().manual_seed(2)
    blocks = 1e-3 * torch.randn(shape, generator=g)
    outputs = torch.randn(64, 32, generator=g)
    want = outputs.double() @ (_dense_rotation(blocks, 1.0) - torch.eye(32, dtype=torch.float64)).T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = rotate_channels(outputs.bfloat16(), rotation_change(blocks)).double()
    relative = ((got - want).norm() / want.norm()).item()
    assert relative < 0.02, relative
