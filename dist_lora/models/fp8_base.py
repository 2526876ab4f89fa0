"""A frozen base model stored in float8 (e4m3), each layer upcast to the compute dtype as it runs.

This is kohya's ``fp8_base``: the frozen linear and convolution weights of the UNet (and optionally the
text encoders) take one byte a value instead of two, and adapters on top train in fp32 as before.

Three choices differ from a plain ``module.to(torch.float8_e4m3fn)``:
- The upcast happens inside a custom autograd function that saves the *fp8* weight for the backward pass
  and upcasts it again there. Letting autograd save the upcast copy (which ``F.linear(x, w.to(bf16))``
  does) would keep a compute-dtype copy of every layer alive until the backward pass: the full bf16 model
  again, the saving lost.
- The fp8 bits are kept as a ``uint8`` parameter. ``module.to(dtype)``, ``.half()`` and the casts of
  accelerate and DeepSpeed convert every floating-point tensor, float8 included, and would quietly undo
  the storage format; integer tensors are left alone.
- ``.weight`` stays readable (upcast, a fresh tensor each time) so that code reading the base weight,
  peft's DoRA norm and LoRA merges among it, sees a normal compute-dtype tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_lora.config_sections import ModelConfig
from dist_lora.errors import DistLoraError

FP8_DTYPE_NAME = "float8_e4m3fn"


def fp8_supported() -> bool:
    return hasattr(torch, FP8_DTYPE_NAME)


def check_fp8_supported(key: str) -> None:
    if not fp8_supported():
        raise DistLoraError(f"{key} = 'fp8' stores the frozen weights as torch.float8_e4m3fn, which torch "
                            f"{torch.__version__} lacks; install torch 2.1 or newer, or set {key} = 'auto'.")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _upcast(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return bits.view(torch.float8_e4m3fn).to(dtype)


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        dtype = _compute_dtype(x)
        ctx.save_for_backward(bits)
        ctx.dtype, ctx.input_dtype = dtype, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), _upcast(bits, dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (bits,) = ctx.saved_tensors
        grad_x = grad.to(ctx.dtype) @ _upcast(bits, ctx.dtype)
        return grad_x.to(ctx.input_dtype), None, None


class _Fp8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                conv: tuple) -> torch.Tensor:
        dtype = _compute_dtype(x)
        ctx.save_for_backward(bits)
        ctx.dtype, ctx.input_dtype, ctx.conv, ctx.input_shape = dtype, x.dtype, conv, x.shape
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x.to(dtype), _upcast(bits, dtype), None if bias is None else bias.to(dtype), *conv)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (bits,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, _upcast(bits, ctx.dtype), grad.to(ctx.dtype),
                                            stride, padding, dilation, groups)
        return grad_x.to(ctx.input_dtype), None, None, None


class _Fp8Weight:
    """The shared part of the fp8 layers: the stored bits and a readable, upcast ``weight``.

    peft builds a LoRA convolution's own down/up layers from ``type(base_layer)``: such a layer is made by the
    ordinary constructor, holds a plain ``weight`` and no bits, and behaves as the plain layer."""

    _parameters: dict[str, nn.Parameter | None]
    compute_dtype: torch.dtype

    @property
    def weight(self) -> torch.Tensor:
        bits = self._parameters.get("weight_fp8")
        if bits is None:
            weight = self._parameters.get("weight")
            if weight is None:  # during the constructor, before the weight is registered
                raise AttributeError("weight")
            return weight
        return _upcast(bits, self.compute_dtype)

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        raise DistLoraError("the weight of an fp8 base layer is frozen and cannot be replaced; load the model "
                            "without model.base_dtype = 'fp8' to change base weights.")


class Fp8Linear(_Fp8Weight, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = self._parameters.get("weight_fp8")
        if bits is None:
            return super().forward(x)
        return _Fp8Linear.apply(x, bits, self.bias)


class Fp8Conv2d(_Fp8Weight, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = self._parameters.get("weight_fp8")
        if bits is None:
            return super().forward(x)
        return _Fp8Conv2d.apply(x, bits, self.bias, (self.stride, self.padding, self.dilation, self.groups))


def _convert(module: nn.Linear | nn.Conv2d, compute_dtype: torch.dtype) -> None:
    weight = module._parameters.pop("weight")
    assert weight is not None
    bits = weight.detach().to(torch.float8_e4m3fn).view(torch.uint8)
    del weight
    module.__class__ = Fp8Linear if isinstance(module, nn.Linear) else Fp8Conv2d
    module.register_parameter("weight_fp8", nn.Parameter(bits, requires_grad=False))
    module.compute_dtype = compute_dtype  # type: ignore[assignment]
    if module.bias is not None:
        module.bias.requires_grad_(False)


def _storable(model: nn.Module) -> list[nn.Linear | nn.Conv2d]:
    return [m for m in model.modules()
            if type(m) in (nn.Linear, nn.Conv2d) and not m.weight.requires_grad
            and getattr(m, "padding_mode", "zeros") == "zeros"]


def fp8_storable_params(model: nn.Module) -> int:
    """How many weights ``store_in_fp8`` would store in one byte (for the memory plan)."""
    return sum(m.weight.numel() for m in _storable(model))


def store_in_fp8(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Store every frozen ``nn.Linear`` and ``nn.Conv2d`` weight of ``model`` in float8_e4m3fn, upcast to
    ``compute_dtype`` when read outside autocast (under autocast, to the autocast dtype). Call before adapters
    are attached: the layers peft wraps then stay fp8 underneath. Biases, norms and embeddings keep their
    dtype (they are a small share of the bytes). Returns the number of layers converted."""
    check_fp8_supported("model.base_dtype")
    layers = _storable(model)
    for layer in layers:
        _convert(layer, compute_dtype)
    return len(layers)


def fp8_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` whose weight is stored in fp8."""
    return [m for m in model.modules()
            if isinstance(m, (Fp8Linear, Fp8Conv2d)) and m._parameters.get("weight_fp8") is not None]


def check_base_dtype(model_cfg: ModelConfig, zero_stage: int, network_type: str = "lora") -> None:
    """model.base_dtype / model.fp8_text_encoders checked before any model loads."""
    base_dtype = model_cfg.base_dtype
    if model_cfg.fp8_text_encoders and base_dtype != "fp8":
        raise DistLoraError(f"model.fp8_text_encoders = true stores the text encoders in fp8 alongside an fp8 UNet, "
                            f"but model.base_dtype = '{base_dtype}'; set model.base_dtype = 'fp8' too (kohya's "
                            f"fp8_base), or model.fp8_text_encoders = false.")
    if base_dtype == "auto":
        return
    if zero_stage == 3:
        raise DistLoraError(f"model.base_dtype = '{base_dtype}' keeps the frozen weights as packed integer tensors, "
                            f"which DeepSpeed ZeRO-3 would partition and gather as trained parameters; launch with "
                            f"DDP{' or ZeRO-2' if base_dtype == 'fp8' else ''} (the frozen base is not partitioned "
                            f"there), or set model.base_dtype = 'auto'.")
    if base_dtype == "fp8":
        check_fp8_supported("model.base_dtype")
        return
    from dist_lora.models.quantized_base import require_bitsandbytes

    require_bitsandbytes(base_dtype)
    if base_dtype == "nf4" and network_type in ("loha", "lokr"):
        # peft's LyCORIS layers size their factors from base_layer.weight.shape, which for a 4-bit layer is the
        # packed storage ([n/2, 1]), not [out, in]: the adapter would get wrong shapes.
        raise DistLoraError(f"model.base_dtype = 'nf4' with network.type = '{network_type}': peft sizes LoHa/LoKr "
                            f"from the packed 4-bit weight's shape; use model.base_dtype = 'fp8' or 'int8' for "
                            f"{network_type}, or nf4 with lora, locon or dora.")
    if base_dtype == "int8" and network_type == "dora":
        # bitsandbytes 0.50's int8 matmul loses its row scales after peft dequantises the weight for DoRA's norm.
        raise DistLoraError("model.base_dtype = 'int8' with network.type = 'dora' fails inside bitsandbytes' int8 "
                            "matmul; use model.base_dtype = 'nf4' or 'fp8' for DoRA.")
    if zero_stage:
        raise DistLoraError(f"model.base_dtype = '{base_dtype}' (bitsandbytes layers) is tested under DDP only; launch "
                            f"without DeepSpeed (launch/multi_gpu.yaml), or use model.base_dtype = 'fp8' with ZeRO-2.")
