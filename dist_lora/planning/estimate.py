"""Peak GPU memory of a training run per component, and the cheapest changes that make it fit.

Pure arithmetic on ``ModelSizes`` (measured once from the model's configs) and the run's settings, so
every "what if" (checkpointing, cached latents, an 8-bit optimizer, a smaller batch, ZeRO-3) is
recomputed without building anything again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dist_lora.planning.shapes import ModelSizes

GIB = 2**30
# Optimizer state bytes per trainable parameter (fp32 unless 8-bit).
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "paged_adamw8bit": 2.0, "lion": 4.0, "lion8bit": 1.0,
                         "prodigy": 16.0, "adafactor": 0.5, "came": 4.5, "adopt": 8.0, "muon": 4.0,
                         "adamw_schedulefree": 8.0}
UNKNOWN_STATE_BYTES = 8.0  # an optimizer by import path: planned as AdamW
DTYPE_BYTES = {"no": 4, "fp16": 2, "bf16": 2}
# Bytes per quantised linear weight: nf4 packs two in a byte, plus each block of 64's absmax, itself quantised to
# one byte with an fp32 absmax per 256 blocks (bitsandbytes' compress_statistics, on by default); int8 is one
# byte (its fp32 scale per output row is left out: a few KiB).
QUANTIZED_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}
# Outside any tensor: the caching allocator's rounding and fragmentation, cuBLAS/cuDNN workspaces. The
# CUDA context itself (about 0.5 GiB) is not in torch's counters but is in the device's used memory.
ALLOCATOR_OVERHEAD = 0.05
WORKSPACE_BYTES = int(0.4 * GIB)
CUDA_CONTEXT_BYTES = int(0.5 * GIB)


@dataclass(frozen=True)
class RunSettings:
    batch_size: int
    gradient_accumulation_steps: int
    mixed_precision: str  # resolved: no / fp16 / bf16
    gradient_checkpointing: bool
    optimizer: str
    cached_latents: bool
    cached_text: bool
    train_text_encoder: bool
    vae_fp32: bool
    gpus: int = 1
    zero_stage: int = 0
    base_dtype: str = "auto"  # model.base_dtype: 'auto' (the compute dtype), 'fp8', 'nf4' or 'int8'
    fp8_text_encoders: bool = False
    offload_frozen: bool = False  # model.offload_frozen: online VAE / frozen encoders on the GPU only to encode
    text_cacheable: bool = True  # False where captions change per step (shuffle, dropout): text stays online


@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    # Transient components are alive one after another within a step (the VAE encodes and frees its
    # activations before the UNet's forward builds its own): the peak holds only the largest of them.
    transient: bool = False


@dataclass(frozen=True)
class Plan:
    components: list[Component]
    settings: RunSettings

    @property
    def allocated(self) -> int:
        persistent = sum(c.bytes for c in self.components if not c.transient)
        return persistent + max((c.bytes for c in self.components if c.transient), default=0)

    @property
    def device_total(self) -> int:
        """What the device must have free: torch's reserved memory plus the CUDA context."""
        return int(self.allocated * (1 + ALLOCATOR_OVERHEAD)) + WORKSPACE_BYTES + CUDA_CONTEXT_BYTES


def _frozen_bytes(params: int, fp8_params: int, weight: int, fp8: bool) -> int:
    """Frozen weights in the compute dtype, or with their Linear/Conv2d weights at one byte each (fp8)."""
    return params * weight - (fp8_params * (weight - 1) if fp8 else 0)


def estimate(sizes: ModelSizes, run: RunSettings) -> Plan:
    weight = DTYPE_BYTES[run.mixed_precision]
    shards = run.gpus if run.zero_stage >= 2 else 1  # ZeRO-2/3 split gradients and optimizer states
    fp8 = run.base_dtype == "fp8"
    text_fp8 = sum(sizes.text_fp8_params) if fp8 and run.fp8_text_encoders else 0
    text_bytes = _frozen_bytes(sum(sizes.text_encoder_params), text_fp8, weight, text_fp8 > 0)
    frozen_trained_module = _frozen_bytes(sizes.unet_params, sizes.unet_fp8_params, weight, fp8)
    if run.base_dtype in QUANTIZED_BYTES:
        frozen_trained_module = (sizes.unet_params - sizes.unet_linear_params) * weight + \
            int(sizes.unet_linear_params * QUANTIZED_BYTES[run.base_dtype])
    if run.train_text_encoder:
        frozen_trained_module += text_bytes
    if run.zero_stage == 3 and run.gpus > 1:
        # Each rank holds a shard and gathers one layer at a time.
        frozen_trained_module = frozen_trained_module // run.gpus + sizes.largest_unet_layer_params * weight
    adapters = sizes.unet_adapter_params + (sizes.text_adapter_params if run.train_text_encoder else 0)
    acts = sizes.unet_activations.checkpointed if run.gradient_checkpointing else sizes.unet_activations.plain
    text_acts = sizes.text_activations.checkpointed if run.gradient_checkpointing else sizes.text_activations.plain
    storage = {"fp8": ", fp8", "nf4": ", nf4 linears", "int8": ", int8 linears"}.get(run.base_dtype, "")
    components = [
        Component(("UNet + text encoder weights (frozen" if run.train_text_encoder else "UNet weights (frozen") +
                  storage + ")", frozen_trained_module),
        Component("adapters (fp32) + gradients", adapters * 4 + adapters * 4 // shards),
        Component(f"optimizer state ({run.optimizer})",
                  int(adapters * OPTIMIZER_STATE_BYTES.get(run.optimizer, UNKNOWN_STATE_BYTES)) // shards),
    ]
    # Offloaded, the encoders are on the GPU one phase at a time (VAE encode, then prompt encode) and never
    # beside the UNet's activations: each phase is one transient component.
    offload = run.offload_frozen
    where = ", on the GPU to encode" if offload else ""
    if not run.train_text_encoder and not run.cached_text:
        components.append(Component(f"text encoders (frozen, online{', fp8' if text_fp8 else ''}{where})", text_bytes,
                                    transient=offload))
    if not run.cached_latents:
        vae_weight = 4 if run.vae_fp32 else weight
        vae_bytes = sizes.vae_params * vae_weight
        encode_bytes = sizes.vae_encode_peak * run.batch_size * vae_weight // 4
        if offload:
            components.append(Component("VAE weights + encode activations (on the GPU to encode)",
                                        vae_bytes + encode_bytes, transient=True))
        else:
            components.append(Component("VAE weights (online latents)", vae_bytes))
            components.append(Component("VAE encode activations", encode_bytes, transient=True))
    components.append(Component("UNet activations" + (" (checkpointed)" if run.gradient_checkpointing else "") +
                                (" + text encoders" if run.train_text_encoder else ""),
                                (acts + (text_acts if run.train_text_encoder else 0)) * run.batch_size,
                                transient=True))
    return Plan(components, run)


@dataclass(frozen=True)
class Suggestion:
    change: str
    settings: RunSettings
    device_total: int


def suggestions(sizes: ModelSizes, run: RunSettings, budget: int) -> list[Suggestion]:
    """Changes applied one after another, cheapest in speed first, until the run fits ``budget``."""
    steps: list[tuple[str, RunSettings]] = []
    current = run
    if current.base_dtype == "auto" and sizes.unet_fp8_params and current.zero_stage != 3:
        # An upcast per layer as it runs: a memory-bound cast of each weight, small beside the step's matmuls,
        # where checkpointing recomputes the whole forward (about a third more compute).
        current = replace(current, base_dtype="fp8")
        steps.append(("model.base_dtype=fp8 (frozen UNet weights in one byte, upcast per layer)", current))
    if not current.gradient_checkpointing:
        current = replace(current, gradient_checkpointing=True)
        steps.append(("training.gradient_checkpointing=true", current))
    if not current.cached_latents:
        current = replace(current, cached_latents=True,
                          cached_text=current.cached_text or (not run.train_text_encoder and run.text_cacheable))
        steps.append(("cache latents first (`dist-lora cache`), so the VAE stays unloaded", current))
    online_text = not current.cached_text and not current.train_text_encoder
    if online_text and not current.offload_frozen:
        # Text that cannot be cached (caption shuffling / dropout): a host-to-GPU copy of the encoders per step.
        current = replace(current, offload_frozen=True)
        steps.append(("model.offload_frozen=true (text encoders on the GPU only while they encode)", current))
    if current.optimizer in ("adamw", "lion", "prodigy"):
        eight_bit = "lion8bit" if current.optimizer == "lion" else "adamw8bit"
        current = replace(current, optimizer=eight_bit)
        steps.append((f"optimizer.type={eight_bit}", current))
    if current.mixed_precision == "no":
        current = replace(current, mixed_precision="bf16")
        steps.append(("training.mixed_precision=bf16 (fp16 on GPUs without bf16)", current))
    while current.batch_size > 1:
        current = replace(current, batch_size=current.batch_size // 2,
                          gradient_accumulation_steps=current.gradient_accumulation_steps * 2)
        steps.append((f"training.batch_size={current.batch_size} with training.gradient_accumulation_steps="
                      f"{current.gradient_accumulation_steps} (same effective batch)", current))
    if current.gpus > 1 and current.zero_stage < 3:
        current = replace(current, zero_stage=3)
        steps.append((f"launch with launch/zero3.yaml over {current.gpus} GPUs", current))
    out: list[Suggestion] = []
    for change, settings in steps:
        total = estimate(sizes, settings).device_total
        out.append(Suggestion(change, settings, total))
        if total <= budget:
            break
    return out


def format_plan(plan: Plan, budget: int | None, advice: list[Suggestion]) -> str:
    s = plan.settings
    lines = [f"Memory plan per GPU: batch {s.batch_size}, {s.mixed_precision}, "
             f"checkpointing {'on' if s.gradient_checkpointing else 'off'}, {s.optimizer}, "
             f"{s.gpus} GPU(s){f', ZeRO-{s.zero_stage}' if s.zero_stage else ''}"
             f"{f', {s.base_dtype} base' if s.base_dtype != 'auto' else ''}"]
    width = max(len(c.name) for c in plan.components)
    for c in plan.components:
        lines.append(f"  {c.name:<{width}}  {c.bytes / GIB:7.2f} GiB" + ("  (one at a time)" if c.transient else ""))
    lines.append(f"  {'tensors allocated (peak)':<{width}}  {plan.allocated / GIB:7.2f} GiB")
    lines.append(f"  {'device memory needed':<{width}}  {plan.device_total / GIB:7.2f} GiB  (allocator, workspace, "
                 f"CUDA context)")
    if budget is not None:
        fits = plan.device_total <= budget
        lines.append(f"Fits in {budget / GIB:.1f} GiB: {'yes' if fits else 'no'}")
        if not fits:
            lines.append("Cheapest changes that make it fit, applied in this order:")
            for item in advice:
                mark = "fits" if item.device_total <= budget else "still over"
                lines.append(f"  - {item.change}: {item.device_total / GIB:.2f} GiB ({mark})")
            if advice and advice[-1].device_total > budget:
                lines.append("  Even with all of these it does not fit: a lower resolution or a larger GPU is needed.")
    return "\n".join(lines)
