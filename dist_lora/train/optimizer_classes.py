"""Optimizers beyond the built-in names: CAME, ADOPT, Muon and Schedule-Free AdamW by short name from
well-kept packages (pytorch-optimizer, schedulefree: the ``optimizers`` extra), and any
``torch.optim.Optimizer`` class by import path, as kohya's ``optimizer_type = "module.Class"``.

An import path is built as kohya builds it: ``Class(param_groups, lr=optimizer.lr, **optimizer.args)``.
The short names also pass the config's weight decay (and betas / eps where the optimizer has Adam's).
Muon orthogonalises the update of every adapter matrix (a convolution's as its flattened matrix) and
runs AdamW on the rest (DoRA magnitudes), as its authors specify: hidden matrices on Muon, gains and
biases on AdamW; both at the group's learning rate.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from dist_lora.config import OptimizerConfig
from dist_lora.errors import DistLoraError

BUILT_IN = ("adamw", "adamw8bit", "paged_adamw8bit", "lion", "lion8bit", "prodigy", "adafactor")
SHORT_NAMES = {"came": "pytorch_optimizer.CAME", "adopt": "pytorch_optimizer.ADOPT", "muon": "pytorch_optimizer.Muon",
               "adamw_schedulefree": "schedulefree.AdamWScheduleFree"}
EXTRA = "optimizers"
_EXTRA_PACKAGES = {"pytorch_optimizer": "pytorch-optimizer", "schedulefree": "schedulefree"}
# ZeRO gives the optimizer flat 1-D partitions of the parameters and keeps the weights the model runs apart
# from the ones the optimizer holds.
_ZERO_REFUSES = {
    "came": "it factors each parameter's second moment by rows and columns, and ZeRO hands it flat 1-D partitions",
    "muon": "it orthogonalises each parameter's matrix, and ZeRO hands it flat 1-D partitions",
}
_MODES_UNDER_ZERO = ("it swaps the weights between the point it trains at and the average it is evaluated at "
                     "(train()/eval(), outside its step), and under ZeRO the model does not run the partitions it "
                     "holds")


def all_names() -> str:
    return ", ".join([*BUILT_IN, *SHORT_NAMES])


def optimizer_class(type_name: str) -> type[torch.optim.Optimizer]:
    """The class a short name or an import path names; refused with the reason, naming optimizer.type."""
    path = SHORT_NAMES.get(type_name, type_name)
    module_name, _, class_name = path.rpartition(".")
    if not module_name or not all(part.isidentifier() for part in path.split(".")):
        raise DistLoraError(f"optimizer.type '{type_name}' is not one of {all_names()} nor an import path such as "
                            f"'torch.optim.RAdam' or 'pytorch_optimizer.Lamb'.")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.split(".")[0]
        if top in _EXTRA_PACKAGES:
            raise DistLoraError(f"optimizer.type '{type_name}' needs the {_EXTRA_PACKAGES[top]} package: "
                                f"pip install 'dist_lora[{EXTRA}]'.") from exc
        raise DistLoraError(f"optimizer.type '{type_name}': no module '{module_name}' can be imported ({exc}); "
                            f"install its package or correct the path.") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise DistLoraError(f"optimizer.type '{type_name}': module '{module_name}' has no '{class_name}'.")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise DistLoraError(f"optimizer.type '{type_name}': {path} is not an optimizer (a torch.optim.Optimizer "
                            f"subclass).")
    return cls


def switches_weights(cls: type) -> bool:
    """Schedule-free style: trains at one point and is evaluated at another, swapped by train() / eval()."""
    return callable(getattr(cls, "train", None)) and callable(getattr(cls, "eval", None))


def check_optimizer(cfg: OptimizerConfig, deepspeed: bool) -> None:
    """Before any model loads: the class resolves, and DeepSpeed can run it."""
    if cfg.type in BUILT_IN:
        return
    cls = optimizer_class(cfg.type)
    if not deepspeed:
        return
    reason = _ZERO_REFUSES.get(cfg.type) or (_MODES_UNDER_ZERO if switches_weights(cls) else "")
    if reason:
        raise DistLoraError(f"optimizer.type '{cfg.type}' cannot run under DeepSpeed: {reason}. Launch with DDP "
                            f"(launch/multi_gpu_ddp.yaml), or use an element-wise optimizer (adamw, adopt, lion).")


def _kwargs(type_name: str, cfg: OptimizerConfig) -> dict[str, Any]:
    if type_name in ("adopt", "adamw_schedulefree"):
        return {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "weight_decay": cfg.weight_decay,
                **({"eps": cfg.eps} if type_name == "adamw_schedulefree" else {})}
    if type_name in ("came", "muon"):
        return {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    return {"lr": cfg.lr}  # an import path: kohya's rule


def _muon_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each group split into its matrices (Muon) and the rest (AdamW), at the group's learning rate."""
    out = []
    for group in groups:
        for use_muon in (True, False):
            members = [p for p in group["params"] if (p.ndim >= 2) == use_muon]
            if members:
                out.append({**group, "params": members, "use_muon": use_muon})
    return out


def build_named_optimizer(type_name: str, groups: list[dict[str, Any]], cfg: OptimizerConfig,
                          args: dict[str, Any]) -> tuple[torch.optim.Optimizer, str]:
    cls = optimizer_class(type_name)
    if type_name == "muon":
        groups = _muon_groups(groups)
    try:
        optimizer = cls(groups, **{**_kwargs(type_name, cfg), **args})
    except (TypeError, ValueError) as exc:
        raise DistLoraError(f"optimizer.args {sorted(args)} do not fit {cls.__module__}.{cls.__name__}: {exc}") \
            from exc
    return optimizer, f"{cls.__module__}.{cls.__name__}"
