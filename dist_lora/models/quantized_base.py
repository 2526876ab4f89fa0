"""A frozen base with its linear layers quantised by bitsandbytes, adapters on top as in QLoRA.

``nf4``: 4-bit NormalFloat, blocks of 64 weights sharing an absmax, itself stored in 8 bits with an fp32
absmax per 256 blocks (bitsandbytes ``Linear4bit``, compress_statistics);
``int8``: per-output-row absmax int8 (``Linear8bitLt``, LLM.int8's outlier threshold 6.0). bitsandbytes runs
both on CUDA and, since 0.45, on the CPU, which is how the tests run them. Convolutions have no such
kernels: they stay in the compute dtype (the memory plan counts them so).

bitsandbytes rather than torchao or optimum-quanto: it is already a dependency (the 8-bit optimizers), peft
wraps its layers for LoRA and DoRA (``peft.tuners.lora.bnb``) and dequantises them for DoRA's norm, and the
same kernels serve the CPU tests and CUDA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dist_lora.errors import DistLoraError

QUANTIZED_BASE_DTYPES = ("nf4", "int8")
INT8_OUTLIER_THRESHOLD = 6.0


def require_bitsandbytes(base_dtype: str) -> Any:
    try:
        import bitsandbytes
    except ImportError as exc:  # no build for this platform (macOS)
        raise DistLoraError(f"model.base_dtype = '{base_dtype}' quantises the frozen base with bitsandbytes, which "
                            f"is not installed; `pip install bitsandbytes` (Linux or Windows), or use "
                            f"model.base_dtype = 'fp8'.") from exc
    return bitsandbytes


def _quantized(layer: nn.Linear, base_dtype: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    bnb = require_bitsandbytes(base_dtype)
    weight = layer.weight.detach()
    with torch.device("meta"):  # no full-precision weight allocated for the new layer: it is replaced below
        if base_dtype == "nf4":
            new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                    compute_dtype=compute_dtype, quant_type="nf4")
        else:
            new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                      has_fp16_weights=False, threshold=INT8_OUTLIER_THRESHOLD)
    if base_dtype == "nf4":
        new.weight = bnb.nn.Params4bit(weight.to("cpu"), requires_grad=False, quant_type="nf4")
    else:
        new.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False)
    if layer.bias is not None:
        new.bias = nn.Parameter(layer.bias.detach().to(compute_dtype), requires_grad=False)
    return new.to(device)  # bitsandbytes quantises on this move


def quantize_linears(model: nn.Module, base_dtype: str, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace every frozen ``nn.Linear`` of ``model`` by its bitsandbytes ``nf4`` or ``int8`` counterpart on
    ``device``. Call before adapters are attached (peft then wraps the quantised layers). Returns the number
    of layers replaced."""
    if base_dtype not in QUANTIZED_BASE_DTYPES:
        raise ValueError(f"base_dtype {base_dtype!r} is not one of {QUANTIZED_BASE_DTYPES}")
    require_bitsandbytes(base_dtype)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and not child.weight.requires_grad:
                setattr(parent, name, _quantized(child, base_dtype, compute_dtype, device))
                replaced += 1
    return replaced


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    """The bitsandbytes-quantised linear layers of ``model`` (inside peft wrappers too)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [m for m in model.modules() if type(m) in (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)]


def quantizable_params(model: nn.Module) -> int:
    """Weights that ``quantize_linears`` would quantise (for the memory plan)."""
    return sum(m.weight.numel() for m in model.modules() if type(m) is nn.Linear and not m.weight.requires_grad)
