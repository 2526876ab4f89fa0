from pathlib import Path

import pytest

from dist_lora.config import ConfigError, config_from_dict, load_config, parse_override, reference_markdown, to_toml

REPO = Path(__file__).resolve().parents[2]
BASE = {"model": {"pretrained": "m"}, "data": {"shards": "s"}}


def _raw(**sections: dict) -> dict:
    raw = {k: dict(v) for k, v in BASE.items()}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return raw


def test_typo_names_key_and_suggests() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(_raw(training={"batch_sise": 2}))
    message = str(err.value)
    assert "training.batch_sise" in message and "Did you mean 'training.batch_size'" in message


def test_unknown_section_suggests() -> None:
    with pytest.raises(ConfigError, match="unknown config section 'trainig'.*Did you mean 'training'"):
        config_from_dict(_raw(trainig={"seed": 1}))


def test_wrong_type_names_value_and_expected_type() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(_raw(training={"batch_size": "four"}))
    assert "training.batch_size" in str(err.value) and "'four'" in str(err.value) and "an integer" in str(err.value)


def test_bool_is_not_an_integer() -> None:
    with pytest.raises(ConfigError, match="training.epochs"):
        config_from_dict(_raw(training={"epochs": True}))


def test_out_of_range() -> None:
    with pytest.raises(ConfigError, match=r"network.rank': got 0; must be >= 1"):
        config_from_dict(_raw(network={"rank": 0}))
    with pytest.raises(ConfigError, match=r"network.dropout': got 1.5; must be <= 1"):
        config_from_dict(_raw(network={"dropout": 1.5}))
    with pytest.raises(ConfigError, match=r"optimizer.lr': got 0.0; must be > 0"):
        config_from_dict(_raw(optimizer={"lr": 0}))


def test_bad_choice_suggests() -> None:
    expected = r"training.mixed_precision.*one of 'auto', 'no', 'fp16', 'bf16'.*Did you mean 'bf16'"
    with pytest.raises(ConfigError, match=expected):
        config_from_dict(_raw(training={"mixed_precision": "bf61"}))


def test_missing_required() -> None:
    with pytest.raises(ConfigError, match="required config key 'model.pretrained' is missing"):
        config_from_dict({"data": {"shards": "s"}})


def test_overrides_and_file(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\npretrained = "a"\n[data]\nshards = "b"\n[training]\nbatch_size = 2\n')
    cfg = load_config(recipe, ["training.batch_size=8", "optimizer.lr=3e-4", "output.name=my lora",
                               "network.unet_target_modules=['to_q', 'to_v']"])
    assert cfg.training.batch_size == 8 and cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.output.name == "my lora" and cfg.network.unet_target_modules == ["to_q", "to_v"]


def test_bad_override_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("training.batch_size")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = config_from_dict(_raw(training={"batch_size": 3, "noise_offset": 0.05}, output={"name": 'q"uote'}))
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


def test_readme_config_reference_is_current() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert reference_markdown() in readme, "README config reference is stale: run `dist-lora config-reference`"


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe: Path) -> None:
    load_config(recipe)
