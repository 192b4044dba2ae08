"""Config: presets load and validate, overrides are typed, mistakes are reported together."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from gbcosface.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs").glob("*.toml"))


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


MINIMAL = """
[data]
backend = "synthetic"
num_classes = 100
"""


def test_presets_exist():
    names = {p.name for p in PRESETS}
    for expected in ("demo_cpu.toml", "ms1mv2_r100_gbcosface.toml", "glint360k_r50_gbcosface.toml",
                     "ms1mv2_r100_cosface.toml"):
        assert expected in names
    assert any(n.startswith("webface42m") for n in names)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_validates_on_8_ranks(preset):
    cfg = load_config(preset)
    validate(cfg, world_size=8, check_paths=False)


def test_demo_validates_on_2_ranks():
    validate(load_config(REPO / "configs" / "demo_cpu.toml"), world_size=2, check_paths=False)


def test_ms1mv2_preset_is_the_published_recipe():
    cfg = load_config(REPO / "configs" / "ms1mv2_r100_gbcosface.toml")
    assert (cfg.data.num_classes, cfg.data.num_images) == (85742, 5822653)
    assert (cfg.backbone.name, cfg.backbone.embedding_size) == ("iresnet100", 512)
    assert cfg.data.batch_size * 8 == 512
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
    optim = cfg.optim
    assert (cfg.train.epochs, optim.lr_schedule, optim.milestones, optim.gamma) == (24, "step", [5, 10, 15, 20], 0.1)
    loss = cfg.loss
    assert (loss.name, loss.s, loss.m, loss.alpha, loss.update_rate) == ("gbcosface", 32.0, 0.16, 0.15, 0.01)
    assert (loss.boundary_min, loss.boundary_max) == (0.5, 0.7)


def test_other_presets_scale():
    glint = load_config(REPO / "configs" / "glint360k_r50_gbcosface.toml")
    assert (glint.data.num_classes, glint.backbone.name) == (360232, "iresnet50")
    (wf,) = [p for p in PRESETS if p.name.startswith("webface42m")]
    wf = load_config(wf)
    assert (wf.data.num_classes, wf.head.sample_rate) == (2059906, 0.2)
    cos = load_config(REPO / "configs" / "ms1mv2_r100_cosface.toml")
    assert (cos.loss.name, cos.loss.s, cos.loss.m) == ("cosface", 64.0, 0.4)


def test_loss_defaults_are_the_authors():
    loss = Config().loss
    assert (loss.s, loss.m, loss.alpha, loss.update_rate, loss.boundary_min, loss.boundary_max) == (
        32.0, 0.16, 0.15, 0.01, 0.5, 0.7)


def test_every_field_is_documented():
    cfg = Config()
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no help text"


def test_overrides_are_parsed_to_the_field_type(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), [
        "optim.lr=0.05",
        "optim.grad_accum=4",
        "optim.warmup_epochs=1",           # int literal into a float field
        "train.deterministic=true",
        "optim.milestones=[3, 7]",
        "train.output=runs/exp 1",          # bare word into a string field
        "train.resume=",                    # empty string
        'eval.bins=["a.bin", "b.bin"]',
        "optim.head_lr=0.5",
        "backbone.name=\"r50\"",            # quoted string
    ])
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.grad_accum == 4
    assert cfg.optim.warmup_epochs == 1.0 and isinstance(cfg.optim.warmup_epochs, float)
    assert cfg.train.deterministic is True
    assert cfg.optim.milestones == [3, 7]
    assert cfg.train.output == "runs/exp 1"
    assert cfg.train.resume == ""
    assert cfg.eval.bins == ["a.bin", "b.bin"]
    assert cfg.optim.head_lr == 0.5
    assert cfg.backbone.name == "r50"
    assert load_config(write(tmp_path, MINIMAL), ["optim.head_lr=none"]).optim.head_lr is None


def test_override_wins_over_file(tmp_path):
    path = write(tmp_path, MINIMAL + "\n[optim]\nlr = 0.3\n")
    assert load_config(path).optim.lr == 0.3
    assert load_config(path, ["optim.lr=0.2"]).optim.lr == 0.2


def test_unknown_keys_name_the_file_and_suggest(tmp_path):
    path = write(tmp_path, MINIMAL + "\n[optim]\nlrr = 0.1\n\n[optimizer]\nlr = 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert str(path) in text
    assert "optim.lrr" in text and "'optim.lr'" in text
    assert "[optimizer]" in text and "'optim'" in text
    assert len(err.value.problems) == 2


def test_unknown_override_key_is_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), ["train.epoch=3"])
    assert "train.epoch=3" in str(err.value) and "'train.epochs'" in str(err.value)


def test_wrong_types_are_refused(tmp_path):
    path = write(tmp_path, MINIMAL + '\n[train]\nepochs = 2.5\ndeterministic = "yes"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, ["optim.grad_accum=1.5", "optim.milestones=5"])
    keys = {p.key for p in err.value.problems}
    assert keys == {"train.epochs", "train.deterministic", "optim.grad_accum", "optim.milestones"}


def test_many_mistakes_in_one_message(tmp_path):
    path = write(tmp_path, """
[data]
backend = "dal"
batch_size = 0
num_classes = 10
[loss]
alpha = 1.5
[optim]
milestones = [10, 5]
[bogus]
x = 1
""")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.amp=fp8", "notakey"])
    problems = err.value.problems
    keys = {p.key for p in problems}
    assert {"data.backend", "data.batch_size", "loss.alpha", "optim.milestones", "train.amp"} <= keys
    assert len(problems) == 7
    text = str(err.value)
    assert text.startswith("7 problems")
    assert "[bogus]" in text and "notakey" in text
    # a value set on the command line is blamed on the override, a file value on the file
    (amp,) = [p for p in problems if p.key == "train.amp"]
    assert "train.amp=fp8" in amp.source
    (alpha,) = [p for p in problems if p.key == "loss.alpha"]
    assert alpha.source == str(path)


def test_validate_reports_every_relation_at_once():
    cfg = config_from_dict({
        "data": {"backend": "torch", "num_classes": 4, "num_images": 100, "batch_size": 64},
        "backbone": {"name": "iresnet101"},
        "loss": {"boundary_min": 0.8, "boundary_max": 0.6},
        "optim": {"lr_schedule": "step", "milestones": [5, 30], "warmup_epochs": 20},
        "train": {"epochs": 20},
        "eval": {"every": 100},
    })
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=8, check_paths=False)
    keys = [p.key for p in err.value.problems]
    assert sorted(keys) == sorted([
        "data.num_classes", "data.num_images", "data.rec", "data.idx", "backbone.name",
        "loss.boundary_min", "optim.milestones", "optim.warmup_epochs", "eval.every",
    ])
    assert "'iresnet100'" in str(err.value)


def test_num_classes_must_be_set():
    with pytest.raises(ConfigError) as err:
        validate(config_from_dict({"data": {"backend": "synthetic"}}), world_size=1, check_paths=False)
    assert [p.key for p in err.value.problems] == ["data.num_classes"]


def test_validate_checks_files(tmp_path):
    rec, idx, good_bin = tmp_path / "t.rec", tmp_path / "t.idx", tmp_path / "v.bin"
    for f in (rec, idx, good_bin):
        f.write_bytes(b"")
    data = {"data": {"backend": "torch", "num_classes": 10, "rec": str(rec), "idx": str(idx)},
            "eval": {"bins": [str(good_bin)]}, "train": {"output": str(tmp_path / "out")}}
    validate(config_from_dict(data), world_size=2)
    data["data"]["idx"] = str(tmp_path / "missing.idx")
    data["eval"]["bins"].append(str(tmp_path / "missing.bin"))
    data["train"]["resume"] = str(tmp_path / "no-ckpt")
    with pytest.raises(ConfigError) as err:
        validate(config_from_dict(data), world_size=2)
    assert sorted(p.key for p in err.value.problems) == ["data.idx", "eval.bins", "train.resume"]
    assert "missing.idx" in str(err.value) and "missing.bin" in str(err.value)
    # the same config is fine when files are not checked, and synthetic data needs none
    validate(config_from_dict(data), world_size=2, check_paths=False)
    validate(config_from_dict({"data": {"backend": "synthetic", "num_classes": 10}}), world_size=2)


def test_unwritable_output_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = config_from_dict({"data": {"backend": "synthetic", "num_classes": 10},
                            "train": {"output": str(blocker / "run")}})
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    assert [p.key for p in err.value.problems] == ["train.output"]


def test_deepspeed_json_must_agree_with_amp(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}))
    base = {"data": {"backend": "synthetic", "num_classes": 10},
            "deepspeed": {"config": str(ds)}, "train": {"engine": "deepspeed", "output": str(tmp_path)}}
    validate(config_from_dict(base, overrides=["train.amp=bf16"]), world_size=2)
    with pytest.raises(ConfigError) as err:
        validate(config_from_dict(base, overrides=["train.amp=none"]), world_size=2)
    assert [p.key for p in err.value.problems] == ["deepspeed.config"]


def test_round_trip_through_dict_and_json(tmp_path):
    cfg = load_config(REPO / "configs" / "ms1mv2_r100_gbcosface.toml", ["optim.head_lr=0.3"])
    assert config_from_dict(cfg.to_dict()) == cfg
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(cfg.to_dict()))
    assert load_config(saved) == cfg


def test_config_hash_is_stable_and_sensitive(tmp_path):
    path = REPO / "configs" / "demo_cpu.toml"
    a, b = load_config(path), load_config(path)
    assert a.config_hash() == b.config_hash()
    # key order does not matter
    reordered = {s: dict(reversed(list(v.items()))) for s, v in reversed(list(a.to_dict().items()))}
    assert config_from_dict(reordered).config_hash() == a.config_hash()
    assert load_config(path, ["optim.lr=0.2"]).config_hash() != a.config_hash()


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")
    bad = write(tmp_path, "[data\nx=1", "bad.toml")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(bad)


def test_post_init_checks_single_fields_directly():
    from gbcosface.config import OptimConfig

    with pytest.raises(ConfigError) as err:
        OptimConfig(lr=-1.0, grad_accum=0)
    assert sorted(p.key for p in err.value.problems) == ["optim.grad_accum", "optim.lr"]
