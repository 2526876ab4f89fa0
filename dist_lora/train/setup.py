"""A run's trained model, optimizer and schedule, built from the loaded components and prepared for the
process world: freezing, attention, the adapter network, precision and checkpointing switches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from dist_lora import parallel
from dist_lora.adapters.dropout import AdapterDropout
from dist_lora.adapters.inject import (
    adapter_layers,
    compute_in_input_dtype,
    lora_parameters,
    up_projection_parameters,
)
from dist_lora.adapters.network import attach_network, unet_lr_weights
from dist_lora.config import Config
from dist_lora.models.fp8_base import store_in_fp8
from dist_lora.models.load import Components
from dist_lora.models.quantized_base import QUANTIZED_BASE_DTYPES, quantize_linears
from dist_lora.train.ema import AdapterEMA
from dist_lora.train.memory import set_attention
from dist_lora.train.model import AdaptedDenoiser
from dist_lora.train.offload import FrozenOffload
from dist_lora.train.optim import (
    OptimizerChoice,
    TrainedParameters,
    build_lr_scheduler,
    build_optimizer,
    param_groups,
)
from dist_lora.train.precision import WEIGHT_DTYPES


@dataclass
class Setup:
    """Everything a run trains with, once prepared for the process world."""

    components: Components
    model: nn.Module  # the prepared AdaptedDenoiser (wrapped by DDP or a DeepSpeed engine when distributed)
    optimizer: torch.optim.Optimizer  # as prepared by accelerate
    lr_scheduler: LRScheduler  # stepped once per optimizer step by the loop, not by accelerate
    frozen_text_encoders: list[nn.Module]  # encoders run under no_grad outside the model (none trained)
    weight_dtype: torch.dtype
    trainable_params: list[nn.Parameter]
    optimizer_choice: OptimizerChoice
    comm: parallel.CommCounter | None = None
    ema: AdapterEMA | None = None  # with ema.decay: the average of trainable_params
    adapter_dropout: AdapterDropout | None = None  # with rank/module dropout: masks drawn by each step
    offload: FrozenOffload | None = None  # model.offload_frozen: the VAE / frozen encoders held in host memory


def _freeze(module: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    module.requires_grad_(False)
    current = next(module.parameters())
    if current.dtype != dtype:
        module.to(dtype=dtype)
    if current.device != device:
        module.to(device=device)


def build_setup(cfg: Config, components: Components, accelerator: Accelerator, total_steps: int) -> Setup:
    device, weight_dtype = accelerator.device, WEIGHT_DTYPES[cfg.training.mixed_precision]
    unet = components.unet
    # With model.offload_frozen the VAE and text encoders never move to the device whole: they stay in host
    # memory and visit the device while they encode (text encoders that train are moved below).
    frozen_home = torch.device("cpu") if cfg.model.offload_frozen else device
    if components.vae is not None:
        _freeze(components.vae, torch.float32 if cfg.training.vae_fp32 else weight_dtype, frozen_home)
    _freeze(unet, weight_dtype, device)
    for module in components.text_encoders:
        _freeze(module, weight_dtype, frozen_home)
    # Before the adapters are attached: peft then wraps the fp8 / quantised layers, which stay so underneath.
    if cfg.model.base_dtype == "fp8":
        for module in [unet, *(components.text_encoders if cfg.model.fp8_text_encoders else [])]:
            store_in_fp8(module, weight_dtype)
    elif cfg.model.base_dtype in QUANTIZED_BASE_DTYPES:
        quantize_linears(unet, cfg.model.base_dtype, weight_dtype, device)
    set_attention(unet, cfg.training.attention, cfg.training.attention_fallback)
    attached = attach_network(unet, components.text_encoders, components.family, cfg.network,
                              cfg.output.format)
    trained_encoders = attached.trained_text_encoders
    if trained_encoders:  # all of them run inside the trained model (below), on the device
        for module in components.text_encoders:
            module.to(device)
    adapter_dropout = None
    if cfg.network.rank_dropout or cfg.network.module_dropout:
        adapter_dropout = AdapterDropout([layer for m in [unet, *trained_encoders] for _, layer in adapter_layers(m)],
                                         cfg.network.rank_dropout, cfg.network.module_dropout)
    unet_params = lora_parameters(unet)
    text_params = [p for e in trained_encoders for p in lora_parameters(e)]
    for p in unet_params + text_params:
        p.data = p.data.float()  # adapters train in fp32 whatever the autocast precision
    if cfg.training.mixed_precision != "no":
        for module in [unet, *trained_encoders]:
            compute_in_input_dtype(module)
    if cfg.training.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in trained_encoders:
            # Reentrant checkpointing (the default of transformers 4.x) passes no gradient to adapters
            # inside a checkpointed block whose input does not require grad (frozen embeddings): the
            # text-encoder adapters would silently never train.
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # When any encoder is trained, all of them run inside the wrapped module (prompt encoding needs
    # every encoder); otherwise they stay outside and run under no_grad.
    inside = components.text_encoders if trained_encoders else []
    model = AdaptedDenoiser(unet, inside, components.family, components.text_encoding)
    net = cfg.network
    trained = TrainedParameters(unet_params, text_params, up_projection_parameters(unet),
                                [p for e in trained_encoders for p in up_projection_parameters(e)],
                                net.loraplus_unet_lr_ratio or net.loraplus_lr_ratio,
                                net.loraplus_text_encoder_lr_ratio or net.loraplus_lr_ratio,
                                unet_lr_weights(unet, net, components.family))
    optimizer, choice = build_optimizer(param_groups(trained, cfg.optimizer), cfg.optimizer, accelerator.device)
    # The LR schedule is stepped by us once per optimizer step, so it is not handed to accelerate
    # (whose wrapper steps it once per process).
    lr_scheduler = build_lr_scheduler(optimizer, cfg.scheduler, total_steps)
    model, optimizer, comm = parallel.prepare(accelerator, model, optimizer, count_comm=cfg.logging.comm_stats)
    frozen = [] if trained_encoders else list(components.text_encoders)
    offloaded = [m for m in [components.vae, *frozen] if m is not None]
    offload = FrozenOffload(offloaded, device) if cfg.model.offload_frozen and offloaded else None
    ema = None
    if cfg.ema.decay > 0:
        names = {id(p): name for name, p in parallel.unwrap(accelerator, model).named_parameters()}
        with parallel.master_weights(accelerator, unet_params + text_params):
            ema = AdapterEMA([(names[id(p)], p) for p in unet_params + text_params], cfg.ema)
    return Setup(components, model, optimizer, lr_scheduler, frozen, weight_dtype, unet_params + text_params, choice,
                 comm, ema, adapter_dropout, offload)
