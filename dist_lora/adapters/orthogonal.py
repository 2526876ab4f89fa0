"""OFT and BOFT: orthogonal rotations of a layer's output channels, as LyCORIS, AUTOMATIC1111 and ComfyUI apply them.

A file holds ``oft_blocks``: OFT ``[blocks, b, b]`` or BOFT ``[stages, blocks, b, b]``. Each block ``B`` gives the
skew-symmetric ``Q = B - B^T`` and the exact Cayley rotation ``R = (I + Q)(I - Q)^-1``; where a constraint ``c``
is set, ``Q`` is first scaled down to norm ``c`` if it is longer (one norm over the module's whole tensor).

OFT rotates the weight's output rows block by block: row block ``k`` of ``W`` becomes ``R_k^T W_k``
(every loader's ``einsum("k n m, k n ... -> k m ...", R, W)``). BOFT applies ``stages`` such block-diagonal
rotations in turn, stage ``i`` on the rows regrouped by the butterfly permutation of stride ``2^i b / 2``
(LyCORIS' and ComfyUI's boft). The bias is not rotated. Because the rotation acts on output channels, the
same function applied to a layer's output (its bias taken out) is the adapted layer.

Multipliers: OFT's rotation at multiplier ``s`` is ``s R + (1 - s) I`` (kohya, LyCORIS and AUTOMATIC1111:
the weight change scales by ``s``); BOFT's is the same interpolation per stage (LyCORIS), so its change is
not linear in ``s``.

Block sizes are chosen from a maximum as LyCORIS does, so that LyCORIS rebuilds the module from the file:
OFT splits ``out = b * blocks`` with ``b <= blocks`` (lycoris ``factorization``); BOFT needs an even ``b`` and
a power-of-two number of blocks, and always has ``log2(blocks) + 1`` stages (lycoris ``power2factorization``).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def oft_block_size(dim: int, limit: int) -> int:
    """OFT's block size for ``dim`` output channels and a block size of at most ``limit`` (LyCORIS' rule:
    the divisor pair of ``dim`` nearest ``limit``, the smaller number being the block size)."""
    if limit > 0 and dim % limit == 0:
        return min(limit, dim // limit)
    bound = limit if limit > 0 else dim
    small, large = 1, dim
    while small < large:
        candidate = next(d for d in range(small + 1, dim + 1) if dim % d == 0)
        if candidate > bound:
            break
        small, large = candidate, dim // candidate
    return min(small, large)


def boft_block_sizes(dim: int) -> list[int]:
    """Every even block size ``b`` with ``dim / b`` a power of two, smallest first."""
    return [size for size in range(2, dim + 1, 2)
            if dim % size == 0 and (dim // size) & (dim // size - 1) == 0]


def boft_block_size(dim: int, limit: int) -> int | None:
    """BOFT's block size: the largest of ``boft_block_sizes`` at most ``limit``; None if there is none."""
    fitting = [size for size in boft_block_sizes(dim) if size <= limit]
    return fitting[-1] if fitting else None


def boft_stages(dim: int, block_size: int) -> int:
    return (dim // block_size).bit_length()  # log2(blocks) + 1 for a power-of-two block count


def rotation_change(blocks: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """``R - I`` of each ``[b, b]`` block's rotation (any leading dimensions), in fp32 whatever autocast is on.

    Computed as ``2 Q (I - Q)^-1`` (equal to ``(I + Q)(I - Q)^-1 - I``): training starts at ``R = I`` and stays
    near it, and ``R`` itself held in bf16 would round a change of 1e-3 to multiples of 4e-3."""
    device = blocks.device.type
    # The memory plan runs the model on the meta device, which has no autocast.
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
        blocks = blocks.float()
        q = blocks - blocks.transpose(-1, -2)
        if constraint > 0:
            norm = torch.linalg.vector_norm(q) + 1e-8
            q = torch.where(norm > constraint, q * (constraint / norm), q)
        eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
        return 2 * q @ torch.linalg.inv(eye - q)


def constrained_blocks(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """Blocks whose ``Q`` is the constrained one: applied without a constraint they rotate as ``blocks``
    do with it (``Q`` is linear in the blocks, so scaling them scales ``Q``)."""
    if constraint <= 0:
        return blocks
    norm = torch.linalg.vector_norm(blocks.float() - blocks.float().transpose(-1, -2)) + 1e-8
    return blocks * torch.where(norm > constraint, constraint / norm, torch.ones_like(norm)).to(blocks.dtype)


def _block_change(changes: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
    """``(R - I)^T`` of each block applied to its channels: ``grouped`` is ``[..., blocks, b]``."""
    return torch.einsum("k n m, ... k n -> ... k m", changes, grouped)


def rotate_channels(channels_last: torch.Tensor, changes: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """The change the rotations make to ``channels_last`` (channels on the last axis), given ``R - I`` of
    OFT ``[k, b, b]`` or BOFT ``[m, k, b, b]`` blocks (``rotation_change``). At multiplier ``s`` each rotation
    is ``I + s (R - I)``. Only changes are carried, never ``x + change``, so that the result keeps the
    precision of the (small) change in bf16 / fp16 too."""
    changes = multiplier * changes.to(channels_last.dtype)
    if changes.dim() == 3:
        return _block_change(changes, channels_last.unflatten(-1, (changes.shape[0], -1))).flatten(-2)
    change = torch.zeros_like(channels_last)
    half = changes.shape[-1] // 2
    for stage, stage_changes in enumerate(changes):
        stride = 2 ** stage * half
        # The butterfly: channels (c, 2, stride) regrouped as (c, stride, 2), then blocks of b; and back.
        current = channels_last + change
        grouped = current.unflatten(-1, (-1, 2, stride)).transpose(-2, -1).flatten(-3).unflatten(-1, (-1, 2 * half))
        step = _block_change(stage_changes.transpose(-1, -2), grouped)
        change = change + step.flatten(-2).unflatten(-1, (-1, stride, 2)).transpose(-2, -1).flatten(-3)
    return change


def weight_change(weight: torch.Tensor, blocks: torch.Tensor, constraint: float = 0.0,
                  multiplier: float = 1.0) -> torch.Tensor:
    """The change OFT/BOFT ``blocks`` make to a Linear ``[out, in]`` or Conv2d ``[out, in, k, k]`` weight (fp32)."""
    rows_last = weight.float().movedim(0, -1)
    return rotate_channels(rows_last, rotation_change(blocks, constraint), multiplier).movedim(-1, 0)


def check_blocks(blocks: torch.Tensor, out_channels: int) -> str | None:
    """Why ``blocks`` cannot rotate ``out_channels`` channels, or None."""
    if blocks.dim() not in (3, 4) or blocks.shape[-1] != blocks.shape[-2]:
        return (f"oft_blocks of shape {tuple(blocks.shape)} are not [blocks, b, b] (OFT) or [stages, blocks, b, b] "
                f"(BOFT)")
    count, size = blocks.shape[-3], blocks.shape[-1]
    if count * size != out_channels:
        return f"{count} blocks of {size} channels do not cover the module's {out_channels} output channels"
    if blocks.dim() == 4 and (size % 2 or count & (count - 1) or blocks.shape[0] != boft_stages(out_channels, size)):
        return (f"BOFT blocks {tuple(blocks.shape)} are not {boft_stages(out_channels, size)} butterfly stages of "
                f"a power-of-two number of even blocks")
    return None
