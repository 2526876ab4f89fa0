"""The training objective a config asks for: its noise and loss options, checked against the model."""

from __future__ import annotations

from typing import Any

from diffusers import DDPMScheduler

from dist_lora.config import TrainingConfig
from dist_lora.errors import DistLoraError
from dist_lora.train.losses import LossOptions
from dist_lora.train.noise import NoiseOptions


class ObjectiveError(DistLoraError):
    """Training options that contradict each other or the model."""


def noise_options(t: TrainingConfig) -> NoiseOptions:
    return NoiseOptions(t.noise_offset, t.noise_offset_random_strength, t.adaptive_noise_scale,
                        t.multires_noise_iterations, t.multires_noise_discount, t.ip_noise_gamma,
                        t.ip_noise_gamma_random_strength, t.min_timestep, t.max_timestep)


def loss_options(t: TrainingConfig) -> LossOptions:
    return LossOptions(t.loss_type, t.huber_schedule, t.huber_c, t.huber_scale, t.min_snr_gamma,
                       t.debiased_estimation, t.scale_v_pred_loss_like_noise_pred, t.v_pred_like_loss)


def check_objective(t: TrainingConfig, prediction_type: str | None = None,
                    num_train_timesteps: int | None = None) -> None:
    """Refuse contradictory options; the model's prediction type and schedule length are checked when
    known (before loading, from the model folder's scheduler config or model.prediction_type)."""
    if t.adaptive_noise_scale and t.noise_offset <= 0:
        raise ObjectiveError(f"training.adaptive_noise_scale = {t.adaptive_noise_scale} adds to the noise offset, "
                             f"but training.noise_offset is {t.noise_offset}; set noise_offset > 0 (0.0357 and "
                             f"0.1 are common) or adaptive_noise_scale = 0.")
    if t.min_timestep > t.max_timestep:
        raise ObjectiveError(f"training.min_timestep = {t.min_timestep} is above training.max_timestep = "
                             f"{t.max_timestep}; timesteps are drawn from [min_timestep, max_timestep).")
    if num_train_timesteps is not None and t.max_timestep > num_train_timesteps:
        raise ObjectiveError(f"training.max_timestep = {t.max_timestep} is beyond the model's "
                             f"{num_train_timesteps} training timesteps; use at most {num_train_timesteps}.")
    last = (num_train_timesteps or 1000) - 1
    if t.zero_terminal_snr and t.v_pred_like_loss > 0 and t.max_timestep > last:
        raise ObjectiveError(f"training.v_pred_like_loss = {t.v_pred_like_loss} divides the loss by SNR/(SNR + 1), "
                             f"which zero_terminal_snr makes 0 at the last timestep ({last}): the loss would be "
                             f"infinite there. Set training.max_timestep = {last} (timesteps are drawn below it), "
                             f"or turn one of the two off.")
    if prediction_type is None or prediction_type == "v_prediction":
        return
    for key, on in (("zero_terminal_snr", t.zero_terminal_snr),
                    ("scale_v_pred_loss_like_noise_pred", t.scale_v_pred_loss_like_noise_pred)):
        if on:
            raise ObjectiveError(f"training.{key} = true needs a v_prediction model, but this one predicts "
                                 f"{prediction_type}; use a v-prediction model (SD 2.x 768-v), set "
                                 f"model.prediction_type = 'v_prediction' to train one, or set {key} = false.")


def training_scheduler(scheduler: Any, t: TrainingConfig) -> Any:
    """The model's DDPM schedule, with betas rescaled to zero terminal SNR when asked (diffusers'
    rescale_zero_terminal_snr, the algorithm kohya's zero_terminal_snr applies)."""
    if not t.zero_terminal_snr:
        return scheduler
    return DDPMScheduler.from_config(scheduler.config, rescale_betas_zero_snr=True)
