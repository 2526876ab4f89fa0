"""Putting adapters on modules: LoRA (and LoCon), DoRA, LoHa and LoKr through peft; OFT and BOFT as our own
peft tuner layer (``oft_layer``: peft's rotate the input, the files every loader reads rotate the output)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from dist_lora.adapters.dora_axis import use_input_axis
from dist_lora.adapters.oft_layer import OrthogonalLayer, out_channels
from dist_lora.adapters.orthogonal import boft_block_size, boft_block_sizes, boft_stages, oft_block_size
from dist_lora.adapters.targets import ModuleRank, TargetPlan
from dist_lora.errors import DistLoraError

ADAPTER_NAME = "default"
NETWORK_TYPES = ("lora", "locon", "loha", "lokr", "dora", "oft", "boft")
ORTHOGONAL_TYPES = ("oft", "boft")


def _peft_config(kind: str, plan: TargetPlan, *, dropout: float = 0.0, lokr_factor: int = -1,
                 lokr_decompose_both: bool = False, tucker: bool = False):  # type: ignore[no-untyped-def]
    # The most common rank/alpha is the config default; only the exceptions become patterns
    # (peft matches every pattern against every module name).
    default, _ = Counter(plan.modules.values()).most_common(1)[0]
    exceptions = TargetPlan({n: m for n, m in plan.modules.items() if m != default})
    kwargs = exceptions.peft_kwargs()
    common = {"r": default.rank, "target_modules": sorted(plan.modules),
              "rank_pattern": kwargs["rank_pattern"]}
    if kind in ("lora", "locon", "dora"):
        # Down projection Gaussian, up projection zero: training starts from the unchanged model.
        return LoraConfig(lora_alpha=default.alpha, alpha_pattern=kwargs["alpha_pattern"], lora_dropout=dropout,
                          init_lora_weights="gaussian", use_dora=kind == "dora", **common)
    if kind == "loha":
        return LoHaConfig(alpha=default.alpha, alpha_pattern=kwargs["alpha_pattern"], module_dropout=dropout,
                          use_effective_conv2d=tucker, **common)
    if kind == "lokr":
        if lokr_factor == 0:
            raise DistLoraError("network.lokr_factor = 0 is not allowed; use -1 (balanced) or a positive factor.")
        return LoKrConfig(alpha=default.alpha, alpha_pattern=kwargs["alpha_pattern"], module_dropout=dropout,
                          decompose_both=lokr_decompose_both, decompose_factor=lokr_factor,
                          use_effective_conv2d=tucker, **common)
    raise DistLoraError(f"network.type '{kind}' is not one of {', '.join(NETWORK_TYPES)}.")


def _check_lokr_factor(model: nn.Module, plan: TargetPlan, factor: int) -> None:
    """peft splits a dimension d divisible by the factor f as (f, d/f); LyCORIS and A1111 rebuild LoKr
    modules with the smaller part first, so a file with f > d/f could not be loaded there."""
    for name in plan.modules:
        module = model.get_submodule(name)
        dims = (module.in_features, module.out_features) if isinstance(module, nn.Linear) else \
            (module.in_channels, module.out_channels)  # type: ignore[union-attr]
        for dim in dims:
            if dim % factor == 0 and factor * factor > dim:
                raise DistLoraError(
                    f"network.lokr_factor = {factor} splits dimension {dim} of '{name}' as {factor} x {dim // factor}; "
                    f"LyCORIS and AUTOMATIC1111 expect the smaller factor first and could not load the file. Use "
                    f"-1 (balanced) or a factor whose square is at most the smallest adapted dimension.")


def blocks_shape(kind: str, dim: int, limit: int, name: str) -> tuple[int, ...]:
    """The ``oft_blocks`` shape of an OFT/BOFT module with ``dim`` output channels and block size at most
    ``limit`` (the rank), as LyCORIS chooses it."""
    if kind == "oft":
        size = oft_block_size(dim, limit)
        return (dim // size, size, size)
    size = boft_block_size(dim, limit)
    if size is None:
        sizes = boft_block_sizes(dim)
        fits = f"the smallest block that fits is {sizes[0]}" if sizes else "no block size fits an odd channel count"
        raise DistLoraError(f"network.type = 'boft' cannot split the {dim} output channels of '{name}' into a "
                            f"power-of-two number of even blocks of at most {limit} channels (BOFT's butterfly "
                            f"needs that; {fits}): raise network.rank (or conv_rank) or use network.type = 'oft'.")
    return (boft_stages(dim, size), dim // size, size, size)


def _orthogonal_shapes(model: nn.Module, kind: str, plan: TargetPlan) -> dict[str, tuple[int, ...]]:
    return {name: blocks_shape(kind, out_channels(model.get_submodule(name)), setting.rank, name)
            for name, setting in plan.modules.items()}


def check_plan(model: nn.Module, kind: str, plan: TargetPlan, lokr_factor: int = -1) -> None:
    """Refuse a plan the adapter type cannot be built on, naming the module, without changing the model (so a
    caller checks every component's plan before it adapts any)."""
    if kind in ORTHOGONAL_TYPES:
        _orthogonal_shapes(model, kind, plan)
    elif kind == "lokr" and lokr_factor > 0:
        _check_lokr_factor(model, plan, lokr_factor)


def _add_orthogonal(model: nn.Module, kind: str, plan: TargetPlan, constraint: float, dropout: float) -> int:
    """Wrap each planned module in an OrthogonalLayer; ``constraint`` is per output channel (LyCORIS and
    kohya: the bound on ||Q|| is constraint x out_dim)."""
    shapes = _orthogonal_shapes(model, kind, plan)  # every module checked before any is changed
    for name, shape in shapes.items():
        base = model.get_submodule(name)
        layer = OrthogonalLayer(base, ADAPTER_NAME, shape, constraint * out_channels(base), dropout)
        parent_path, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, layer)
    return len(shapes)


def bound_rotations(model: nn.Module, constraint: float) -> None:
    """Bound every OFT/BOFT layer's ||Q|| to ``constraint`` x its output channels (LyCORIS' constraint)."""
    for _, layer in adapter_layers(model):
        if isinstance(layer, OrthogonalLayer):
            layer.constraint[ADAPTER_NAME] = constraint * out_channels(layer)


def add_network(model: nn.Module, kind: str, plan: TargetPlan, *, dora_axis: str = "output",
                **options: object) -> int:
    """Inject adapters of ``kind`` into exactly the modules of ``plan``; return how many. DoRA keeps its
    magnitude per output row (peft's convention) or, with ``dora_axis = "input"``, per input column."""
    constraint = float(options.pop("oft_constraint", 0.0))  # type: ignore[arg-type]
    if kind in ORTHOGONAL_TYPES:
        return _add_orthogonal(model, kind, plan, constraint, float(options.get("dropout", 0.0)))  # type: ignore[arg-type]
    factor = int(options.get("lokr_factor", -1))  # type: ignore[call-overload]
    if kind == "lokr" and factor > 0:
        _check_lokr_factor(model, plan, factor)
    inject_adapter_in_model(_peft_config(kind, plan, **options), model, adapter_name=ADAPTER_NAME)  # type: ignore[arg-type]
    layers = list(adapter_layers(model))
    if len(layers) != len(plan.modules):
        raise RuntimeError(f"peft adapted {len(layers)} modules, expected {len(plan.modules)}")
    if kind == "dora" and dora_axis == "input":
        for name, layer in layers:
            if name in plan.modules:
                use_input_axis(layer, ADAPTER_NAME)
    return len(layers)


def add_lora(model: nn.Module, target_modules: list[str], rank: int, alpha: float, dropout: float = 0.0) -> int:
    """LoRA on every Linear/Conv2d whose name ends with one of ``target_modules`` (a small convenience)."""
    names = {name: ModuleRank(rank, alpha) for name, module in model.named_modules()
             if isinstance(module, (nn.Linear, nn.Conv2d))
             and any(name == t or name.endswith("." + t) for t in target_modules)}
    if not names:
        raise DistLoraError(f"no module matched the target modules {list(target_modules)}; module names end "
                            "like to_q or ff.net.0.proj (UNet), q_proj (text encoder).")
    return add_network(model, "lora", TargetPlan(names), dropout=dropout)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, BaseTunerLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, (LoraLayer, LoHaLayer, LoKrLayer, OrthogonalLayer)) and ADAPTER_NAME in module.scaling:
            yield name, module


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable adapter parameter (whatever the adapter type)."""
    out: list[nn.Parameter] = []
    for _, layer in adapter_layers(model):
        out.extend(p for n, p in layer.named_parameters() if ADAPTER_NAME in n.split(".") and "base_layer" not in n)
    return out


def is_up_projection(parameter_name: str) -> bool:
    """Whether an adapter parameter is a LoRA up projection (kohya's lora_up, peft's lora_B): what LoRA+
    gives its higher learning rate."""
    return "lora_B" in parameter_name.split(".")


def up_projection_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA up projections among ``lora_parameters(model)``."""
    out: list[nn.Parameter] = []
    for _, layer in adapter_layers(model):
        out.extend(p for n, p in layer.named_parameters()
                   if ADAPTER_NAME in n.split(".") and "base_layer" not in n and is_up_projection(n))
    return out


def set_multiplier(model: nn.Module, multiplier: float) -> None:
    """Scale every adapter's update by ``multiplier`` (the ``<lora:name:w>`` weight). Not for DoRA, whose
    UIs interpolate whole weights instead (see ``dist_lora.adapters.merge``)."""
    for _, layer in adapter_layers(model):
        if isinstance(layer, LoraLayer) and layer.use_dora.get(ADAPTER_NAME):
            raise DistLoraError("DoRA multipliers are not a scale of the update; merge with dist-lora merge instead")
        layer.unscale_layer()
        if multiplier != 1.0:
            layer.scale_layer(multiplier)


def compute_in_input_dtype(model: nn.Module) -> int:
    """Stop peft casting each adapted layer's input to the adapter's dtype (fp32 master weights).

    Under autocast the adapter's matmuls run in the autocast dtype anyway, so the cast only adds an
    fp32 copy of every adapted layer's input (kernel time and transient memory, about 2 GB per 1024^2
    SDXL image without checkpointing) that autocast immediately casts back. Returns the layers changed."""
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False  # type: ignore[attr-defined]
    return len(layers)
