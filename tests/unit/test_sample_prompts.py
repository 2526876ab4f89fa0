"""Sample prompts in kohya's formats, and samplers by the names users know."""

from pathlib import Path

import pytest
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from dist_lora.config import SampleConfig
from dist_lora.sampling.prompts import PromptError, SamplePrompt, load_prompts
from dist_lora.sampling.samplers import UnknownSampler, find_sampler


def _load(tmp_path: Path, name: str, text: str, **defaults: object) -> list[SamplePrompt]:
    path = tmp_path / name
    path.write_text(text)
    return load_prompts(SampleConfig(prompt_file=str(path), **defaults), resolution=512, training_seed=100)


def test_every_line_option_and_the_defaults(tmp_path: Path) -> None:
    text = ("# a comment\n\n"
            "a dlsks robot --n blurry, lowres --w 1024 --h 768 --d 42 --l 7 --s 28 --ss euler_a\n"
            "a dlsks cat --ss DPM++ 2M Karras\n")
    first, second = _load(tmp_path, "p.txt", text, negative_prompt="ugly", cfg_scale=5.0, steps=20,
                          sampler="ddim")
    assert first == SamplePrompt(0, "a dlsks robot", "blurry, lowres", 1024, 768, 42, 7.0, 28, "euler_a",
                                 f"{tmp_path / 'p.txt'}:3")
    # Unset options take [sample]'s defaults; the size the data's resolution, the seed training.seed + number.
    assert (second.negative_prompt, second.width, second.height, second.seed, second.cfg_scale, second.steps,
            second.sampler) == ("ugly", 512, 512, 101, 5.0, 20, "dpm++_2m_karras")
    assert second.origin.endswith("p.txt:4")


def test_toml_and_json_files_read_like_kohya(tmp_path: Path) -> None:
    toml = ('[prompt]\nnegative_prompt = "bad"\nwidth = 640\nsample_steps = 12\nscale = 4.5\n\n'
            '[[prompt.subset]]\nprompt = "one"\nseed = 7\n\n[[prompt.subset]]\nprompt = "two"\nwidth = 512\n'
            'sample_sampler = "k_dpm_2_a"\n')
    one, two = _load(tmp_path, "p.toml", toml)
    assert (one.prompt, one.negative_prompt, one.width, one.steps, one.cfg_scale, one.seed) == \
        ("one", "bad", 640, 12, 4.5, 7)
    assert (two.width, two.sampler, two.seed) == (512, "dpm_2_a", 101)
    json_text = '["three --w 256 --h 256", {"prompt": "four", "height": 1024, "cfg_scale": 3, "sampler": "Euler"}]'
    three, four = _load(tmp_path, "p.json", json_text)
    assert (three.prompt, three.width, three.height) == ("three", 256, 256)
    assert (four.prompt, four.height, four.cfg_scale, four.sampler) == ("four", 1024, 3.0, "euler")


def test_inline_prompts_come_first(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("from the file\n")
    prompts = load_prompts(SampleConfig(prompts=["inline --s 5"], prompt_file=str(tmp_path / "p.txt")), 512, 0)
    assert [(p.number, p.prompt, p.origin) for p in prompts] == [(0, "inline", "sample.prompts[0]"),
                                                                 (1, "from the file", f"{tmp_path / 'p.txt'}:1")]


@pytest.mark.parametrize(("name", "text", "message"), [
    ("p.txt", "ok\nbad --x 3\n", r"p\.txt:2: unknown option '--x'"),
    ("p.txt", "ok --w abc\n", r"p\.txt:1: --w 'abc' is not a whole number"),
    ("p.txt", "ok --w 1000 --h 1001\n", r"p\.txt:1: height 1001 must be a multiple of 8"),
    ("p.txt", "ok --ss eulr_a\n", r"p\.txt:1: unknown sampler 'eulr_a'\. Did you mean 'euler_a'\?"),
    ("p.txt", " --w 512\n", r"p\.txt:1: the line has no prompt"),
    ("p.txt", "ok --s\n", r"p\.txt:1: option '--s' has no value"),
    ("p.toml", "[prompt]\nwidth = 512\n", r"needs a \[prompt\] table with \[\[prompt\.subset\]\]"),
    ("p.toml", '[prompt]\n[[prompt.subset]]\nprompt = "a"\ncolour = 1\n', r"subset\]\] #1: unknown key 'colour'"),
    ("p.json", '[{"prompt": "a", "steps": 0}]', r"item 1: steps 0 must be between 1 and 1000"),
    ("p.json", '{"prompt": "a"}', r"must hold a list"),
    ("p.yaml", "a", r"expected a \.txt, \.toml or \.json file"),
])
def test_bad_prompts_name_file_and_line(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(PromptError, match=message):
        _load(tmp_path, name, text)


def test_missing_prompt_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match=r"sample\.prompt_file '.*nope\.txt' does not exist"):
        load_prompts(SampleConfig(prompt_file=str(tmp_path / "nope.txt")), 512, 0)


@pytest.mark.parametrize(("name", "scheduler", "settings"), [
    ("euler", EulerDiscreteScheduler, {}),
    ("k_euler_a", EulerAncestralDiscreteScheduler, {}),
    ("Euler a", EulerAncestralDiscreteScheduler, {}),
    ("dpm_2_a", KDPM2AncestralDiscreteScheduler, {}),
    ("lms", LMSDiscreteScheduler, {"use_karras_sigmas": False}),
    ("ddim", DDIMScheduler, {}),
    ("PLMS", PNDMScheduler, {}),
    ("dpm++_2m", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    ("DPM++ 2M Karras", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    ("dpm++_sde_karras", DPMSolverSDEScheduler, {"use_karras_sigmas": True}),
    ("unipc", UniPCMultistepScheduler, {}),
])
def test_sampler_names_build_the_intended_scheduler(name: str, scheduler: type, settings: dict) -> None:
    # From a v-prediction model's scheduler config: the model's betas and prediction type carry over.
    base = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="v_prediction").config
    built = find_sampler(name).build(base)
    assert type(built) is scheduler
    assert built.config.prediction_type == "v_prediction" and built.config.beta_end == 0.012
    for key, value in settings.items():
        assert built.config[key] == value


def test_every_name_and_alias_builds_its_scheduler() -> None:
    from dist_lora.sampling.samplers import _ALIASES, SAMPLERS

    base = DDIMScheduler(beta_schedule="scaled_linear").config
    for name in [*SAMPLERS, *_ALIASES]:
        sampler = find_sampler(name)
        built = sampler.build(base)
        assert type(built) is sampler.scheduler
        for key, value in sampler.settings.items():
            assert built.config[key] == value
    # A1111's display names round-trip: the label written into a PNG names the same sampler.
    assert all(find_sampler(s.label) is s for s in SAMPLERS.values())


def test_unknown_sampler_lists_the_known_ones() -> None:
    with pytest.raises(UnknownSampler, match=r"Known: ddim, ddpm, dpm\+\+_2m"):
        find_sampler("nope")
