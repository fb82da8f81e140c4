from pathlib import Path

import pytest

from genforge.common.config import TrainConfig, from_dict, load_recipe
from genforge.common.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = "name: x\nfamily: lm\ndataset: d\ntrain:\n  max_steps: 10\n"


def test_recipe_loads_with_defaults_and_overrides(tmp_path):
    r = load_recipe(write(tmp_path, BASE), ["train.lr=0.01", "train.betas=[0.8, 0.9]", "model.preset=lm-nano"])
    assert r.train.lr == 0.01 and r.train.betas == (0.8, 0.9)
    assert r.train.max_steps == 10 and r.train.batch_size == 16
    assert r.model == {"preset": "lm-nano"}
    assert r.run_dir == Path("runs/x")


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.lerning_rate'.*"):
        load_recipe(write(tmp_path, BASE + "  lerning_rate: 1\n"))
    with pytest.raises(ConfigError, match=r"did you mean 'max_steps'"):
        load_recipe(write(tmp_path, BASE), ["train.max_step=3"])
    with pytest.raises(ConfigError, match=r"did you mean 'dataset'"):
        load_recipe(write(tmp_path, BASE + "datset: y\n"))


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", r"train.lr: -1.0 is out of range"),
    ("train.batch_size=0", r"train.batch_size: 0 is out of range"),
    ("train.batch_size=abc", r"train.batch_size: expected an integer"),
    ("train.precision=fp8", r"train.precision: 'fp8' is not one of"),
    ("train.betas=[0.9, 1.5]", r"train.betas\[1\]"),
    ("family=rnn", r"family: 'rnn' is not one of"),
])
def test_bad_values_are_config_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(write(tmp_path, BASE), [override])


def test_schedule_length_is_required():
    with pytest.raises(ConfigError, match="max_steps or max_tokens"):
        from_dict(TrainConfig, {"time_budget": 10}, "train")


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="expected key=value"):
        load_recipe(write(tmp_path, BASE), ["train.lr"])


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=true", "train.batch_size: expected an integer, got True"),
    ("train.betas=[0.9]", "train.betas: expected 2 values, got 1"),
    ("train.lr=0", "train.lr: 0.0 is out of range (must be > 0)"),
    ("train.warmup_steps=-1", "train.warmup_steps: -1 is out of range (must be >= 0)"),
    ("train.ema_decay=2", "train.ema_decay: 2.0 is out of range (must be <= 1)"),
    ("train=5", "train: expected a mapping, got int 5"),
])
def test_messages_are_one_line_with_the_full_path(tmp_path, override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, BASE), [override])
    assert str(e.value) == message


def test_nested_sections_name_the_full_path_and_suggest_from_their_own_keys():
    from genforge.data.images import ImageDataConfig

    with pytest.raises(ConfigError, match=r"^unknown key 'data.augment.flip_prb' \(did you mean 'flip_prob'\?\)$"):
        from_dict(ImageDataConfig, {"augment": {"flip_prb": 1}}, "data")
    with pytest.raises(ConfigError, match=r"^data.augment.flip_prob: 2.0 is out of range \(must be <= 1\)$"):
        from_dict(ImageDataConfig, {"augment": {"flip_prob": 2}}, "data")


def test_a_missing_key_is_reported_before_a_cross_field_rule(tmp_path):
    with pytest.raises(ConfigError, match="^missing required key 'dataset'$"):
        load_recipe(write(tmp_path, "name: x\nfamily: lm\n"))


def test_sections_are_pydantic_models_with_their_ranges_in_the_schema():
    from pydantic import BaseModel

    assert issubclass(TrainConfig, BaseModel)
    props = TrainConfig.model_json_schema()["properties"]
    assert props["batch_size"]["minimum"] == 1 and props["lr"]["exclusiveMinimum"] == 0
    cfg = from_dict(TrainConfig, {"max_steps": "100", "lr": "3e-4"}, "train")  # YAML strings coerced
    assert cfg.max_steps == 100 and cfg.lr == 3e-4
