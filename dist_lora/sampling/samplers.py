"""Samplers by the names users know (kohya's, A1111's), each mapped to the diffusers scheduler and
settings that reproduce it (the mapping of diffusers' own A1111 table).

A sampler is built from the base model's scheduler configuration, so the training betas, the
prediction type (epsilon or v) and the timestep settings of the model carry over.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dist_lora.errors import DistLoraError

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin


class UnknownSampler(DistLoraError):  # noqa: N818 - reads as the user's mistake
    """A sampler name that is not known."""


@dataclass(frozen=True)
class Sampler:
    name: str  # canonical name
    label: str  # as A1111 shows it (written into the PNG parameters)
    scheduler_name: str  # the diffusers scheduler class; imported when built (diffusers loads slowly)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def scheduler(self) -> type[SchedulerMixin]:
        import diffusers

        return getattr(diffusers, self.scheduler_name)  # type: ignore[no-any-return]

    def build(self, base_config: Any) -> SchedulerMixin:
        """This sampler's scheduler, configured from the model's scheduler config plus its own settings."""
        return self.scheduler.from_config(base_config, **self.settings)  # type: ignore[no-any-return]


_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_KARRAS = {"use_karras_sigmas": True}

SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("euler", "Euler", "EulerDiscreteScheduler"),
    Sampler("euler_a", "Euler a", "EulerAncestralDiscreteScheduler"),
    Sampler("heun", "Heun", "HeunDiscreteScheduler"),
    Sampler("dpm_2", "DPM2", "KDPM2DiscreteScheduler"),
    Sampler("dpm_2_a", "DPM2 a", "KDPM2AncestralDiscreteScheduler"),
    Sampler("lms", "LMS", "LMSDiscreteScheduler"),
    Sampler("lms_karras", "LMS Karras", "LMSDiscreteScheduler", _KARRAS),
    Sampler("ddim", "DDIM", "DDIMScheduler"),
    Sampler("ddpm", "DDPM", "DDPMScheduler"),
    Sampler("pndm", "PLMS", "PNDMScheduler"),
    Sampler("dpm++_2m", "DPM++ 2M", "DPMSolverMultistepScheduler", _DPMPP),
    Sampler("dpm++_2m_karras", "DPM++ 2M Karras", "DPMSolverMultistepScheduler", {**_DPMPP, **_KARRAS}),
    Sampler("dpm++_2m_sde", "DPM++ 2M SDE", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    Sampler("dpm++_2m_sde_karras", "DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, **_KARRAS}),
    Sampler("dpm++_sde", "DPM++ SDE", "DPMSolverSDEScheduler"),
    Sampler("dpm++_sde_karras", "DPM++ SDE Karras", "DPMSolverSDEScheduler", _KARRAS),
    Sampler("dpmsingle", "DPM++ 2S", "DPMSolverSinglestepScheduler"),
    Sampler("unipc", "UniPC", "UniPCMultistepScheduler"),
)}

# kohya's names (sd-scripts --sample_sampler) and A1111's display names, lower-cased.
_ALIASES = {
    "k_euler": "euler", "k_euler_a": "euler_a", "k_heun": "heun", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a",
    "k_lms": "lms", "dpmsolver++": "dpm++_2m", "plms": "pndm", "dpm2": "dpm_2", "dpm2 a": "dpm_2_a",
    "dpm2 karras": "dpm_2", "lms karras": "lms_karras",
    **{s.label.lower(): s.name for s in SAMPLERS.values()},
}


def sampler_names() -> list[str]:
    return sorted(SAMPLERS)


def find_sampler(name: str) -> Sampler:
    """The sampler called ``name`` (canonical, kohya's or A1111's, any case); UnknownSampler otherwise."""
    key = " ".join(name.strip().lower().split())
    key = _ALIASES.get(key, key)
    if key in SAMPLERS:
        return SAMPLERS[key]
    close = difflib.get_close_matches(key, [*SAMPLERS, *_ALIASES], n=1, cutoff=0.6)
    hint = f" Did you mean '{_ALIASES.get(close[0], close[0])}'?" if close else ""
    raise UnknownSampler(f"unknown sampler {name!r}.{hint} Known: {', '.join(sampler_names())} (also kohya's k_* "
                         f"names and A1111's, e.g. 'Euler a', 'DPM++ 2M Karras').")
