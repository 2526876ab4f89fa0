"""Which precision a run computes in, chosen from what the device supports."""

from __future__ import annotations

import torch

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_mixed_precision(requested: str, *, cuda: bool, bf16_supported: bool) -> str:
    """'auto' -> bf16 on GPUs that have it (Ampere and newer), fp16 with loss scaling on older CUDA GPUs,
    fp32 ('no') on CPU and MPS, where autocast brings little. Anything else is kept as asked."""
    if requested != "auto":
        return requested
    if not cuda:
        return "no"
    return "bf16" if bf16_supported else "fp16"


def device_mixed_precision(requested: str) -> str:
    cuda = torch.cuda.is_available()
    return resolve_mixed_precision(requested, cuda=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported())


def allow_tf32() -> None:
    """fp32 matmuls and convolutions that remain (the adapters' own math, fp32 runs) use TF32 tensor
    cores on Ampere and newer: about 8x the fp32 rate for a 10-bit mantissa in the products."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
