"""Config validation: every bad field is named; unknown tables/fields are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from pmixed.config import (
    DataConfig,
    DPSGDConfig,
    EvalConfig,
    LoraSettings,
    PrivacyConfig,
    RunConfig,
    config_from_dict,
    load_config,
)
from pmixed.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.privacy.epsilon == 8.0 and cfg.privacy.queries == 1024
    assert cfg.lora.r >= 1 and cfg.data.n_parts >= 1


def test_paper_config_matches_reference_section_3():
    cfg = load_config(CONFIGS / "paper-gpt2-wikitext103.toml")
    assert cfg.model.base == "gpt2" and cfg.data.n_parts == 80 and cfg.data.block_size == 512
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (
        4,
        32,
        0.1,
        ("c_attn",),
    )
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.batch_size, cfg.train.epochs) == (
        2e-4,
        0.01,
        8,
        15,
    )
    assert (cfg.dpsgd.batch_size, cfg.dpsgd.max_grad_norm, cfg.dpsgd.epsilon) == (256, 1.0, 8.0)
    assert (cfg.privacy.sample_rate, cfg.privacy.delta, cfg.privacy.alpha) == (0.03, 1e-5, 3)


@pytest.mark.parametrize(
    "section, fields, field_name",
    [
        ("lora", {"r": 0}, "lora.r"),
        ("lora", {"dropout": 1.0}, "lora.dropout"),
        ("lora", {"target_modules": []}, "lora.target_modules"),
        ("lora", {"target_modules": "c_attn"}, "lora.target_modules"),
        ("train", {"lr": -1.0}, "train.lr"),
        ("train", {"finetune_lr": 0}, "train.finetune_lr"),
        ("train", {"batch_size": 2.5}, "train.batch_size"),
        ("train", {"max_steps": 0}, "train.max_steps"),
        ("data", {"n_parts": 0}, "data.n_parts"),
        ("data", {"eval_units": 1.5}, "data.eval_units"),
        ("data", {"eval_units": -1}, "data.eval_units"),
        ("data", {"block_size": True}, "data.block_size"),
        ("dpsgd", {"delta": 1.0}, "dpsgd.delta"),
        ("dpsgd", {"accountant": "moments"}, "dpsgd.accountant"),
        ("privacy", {"sample_rate": 0.0}, "privacy.sample_rate"),
        ("privacy", {"alpha": 1}, "privacy.alpha"),
        ("privacy", {"queries": 0}, "privacy.queries"),
        ("eval", {"runs": 0}, "eval.runs"),
        ("eval", {"ensemble_average": "no"}, "eval.ensemble_average"),
        ("eval", {"member_chunk": -1}, "eval.member_chunk"),
        ("eval", {"dtype": "float64"}, "eval.dtype"),
        ("run", {"device": "gpu"}, "run.device"),
        ("model", {"dtype": "float8"}, "model.dtype"),
        ("model", {"base": "builtin:nope"}, "model.base"),
        ("public_pretrain", {"n_embd": 30, "n_head": 4}, "public_pretrain.n_embd"),
        ("run", {"seed": -1}, "run.seed"),
    ],
)
def test_invalid_fields_are_named(section, fields, field_name):
    with pytest.raises(ConfigError) as info:
        config_from_dict({section: fields})
    assert info.value.field == field_name
    assert str(info.value).startswith(field_name + ":")


def test_unknown_field_lists_allowed_ones():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"lora": {"rank": 4}})
    assert info.value.field == "lora.rank"
    assert "allowed fields" in str(info.value) and "target_modules" in str(info.value)


def test_unknown_table_is_refused():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"trian": {}})
    assert info.value.field == "trian" and "allowed tables" in str(info.value)


def test_block_size_must_fit_tiny_gpt2_positions():
    with pytest.raises(ConfigError, match="data.block_size"):
        config_from_dict({"public_pretrain": {"n_positions": 128}, "data": {"block_size": 256}})
    # any other base: no such limit here
    config_from_dict({"model": {"base": "gpt2"}, "data": {"block_size": 1024}})


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match=r"^lora\.r: must be >= 1"):
        LoraSettings(r=0)
    with pytest.raises(ConfigError, match="privacy.epsilon"):
        PrivacyConfig(epsilon=0)
    assert EvalConfig().runs >= 1 and DataConfig(eval_units=4).eval_units == 4
    assert DPSGDConfig().batch_size == 256


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_replace_and_to_dict_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "quick.toml")
    new = cfg.replace(run__output_dir=str(tmp_path), lora__r=8)
    assert new.lora.r == 8 and new.output_dir == tmp_path and cfg.lora.r == 4
    assert config_from_dict(new.to_dict()) == new
    with pytest.raises(ConfigError, match="lora.r"):
        cfg.replace(lora__r=0)


def test_pretrain_fingerprint_tracks_settings():
    a = config_from_dict({}).public_pretrain
    b = config_from_dict({"public_pretrain": {"steps": 7}}).public_pretrain
    assert a.fingerprint() != b.fingerprint() and a.fingerprint() == type(a)().fingerprint()


def test_member_chunk_is_automatic_per_device_unless_set():
    from pmixed.config import EvalConfig

    assert EvalConfig().chunk_for("cpu") == 1 and EvalConfig().chunk_for("cuda") == 16
    assert EvalConfig(member_chunk=5).chunk_for("cpu") == 5 == EvalConfig(member_chunk=5).chunk_for("cuda")
