"""Ensemble training on a tiny setup: N distinct adapters, base untouched, resume, verification."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pmixed.errors import EnsembleMismatch
from tests.train.helpers import tiny_config


@pytest.fixture(scope="module")
def trained(tiny_base, tiny_records, tmp_path_factory):
    from pmixed.train.ensemble import train_ensemble

    out = tmp_path_factory.mktemp("ens")
    cfg = tiny_config(tiny_base, tiny_records, out, n_parts=3)
    res = train_ensemble(cfg, progress=False)
    return cfg, res


def test_writes_n_distinct_adapters_and_manifest(trained, tiny_base):
    from transformers import AutoModelForCausalLM

    from pmixed.models.loading import weights_sha256

    cfg, res = trained
    out = cfg.output_dir
    assert res.trained == [0, 1, 2] and res.skipped == []
    m = json.loads((out / "ensemble.json").read_text())
    assert m["format"] == "pmixed-ensemble" and m["format_version"] == 1
    assert m["complete"] and m["n_members"] == 3 and len(m["members"]) == 3
    assert (out / "partition.json").is_file() and (out / "eval_records.jsonl").is_file()
    assert m["partition"]["n_eval_records"] > 0
    raw = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert m["base_model"]["weights_sha256"] == weights_sha256(raw)
    weights = []
    for i, rec in enumerate(m["members"]):
        folder = out / "members" / f"member-{i:03d}"
        assert (folder / "adapter_config.json").is_file()
        assert rec["part_index"] == i and rec["n_blocks"] > 0
        assert rec["final_train_loss"] == rec["final_train_loss"]  # not NaN
        assert {"torch", "transformers", "peft"} <= set(rec["versions"])
        weights.append(load_file(folder / "adapter_model.safetensors"))
    keys = sorted(weights[0])
    assert keys and all(sorted(w) == keys for w in weights)
    for a in range(3):
        for b in range(a + 1, 3):
            assert any(not torch.equal(weights[a][k], weights[b][k]) for k in keys)
    # every LoRA B moved away from its zero init (the member was trained)
    for w in weights:
        assert all(w[k].abs().sum() > 0 for k in keys if "lora_B" in k)


def test_resume_skips_finished_members(trained):
    from pmixed.train.ensemble import train_ensemble

    cfg, first = trained
    before = json.loads((cfg.output_dir / "ensemble.json").read_text())
    res = train_ensemble(cfg, progress=False)
    assert res.trained == [] and res.skipped == [0, 1, 2]
    after = json.loads((cfg.output_dir / "ensemble.json").read_text())
    assert [m["adapter_sha256"] for m in after["members"]] == [
        m["adapter_sha256"] for m in before["members"]
    ]


def test_resume_retrains_only_a_missing_or_corrupt_member(
    tiny_base, tiny_records, trained, tmp_path
):
    from pmixed.train.ensemble import train_ensemble

    cfg, _ = trained
    out = tmp_path / "copy"
    shutil.copytree(cfg.output_dir, out)
    cfg2 = cfg.replace(run__output_dir=str(out))
    shutil.rmtree(out / "members" / "member-001")
    with open(out / "members" / "member-002" / "adapter_model.safetensors", "r+b") as fh:
        fh.seek(-8, os.SEEK_END)
        fh.write(b"\x00" * 8)
    res = train_ensemble(cfg2, progress=False)
    assert res.trained == [1, 2] and res.skipped == [0]
    new = json.loads((out / "ensemble.json").read_text())
    old = json.loads((cfg.output_dir / "ensemble.json").read_text())
    # deterministic per-member seeds: the retrained members are bit-identical
    assert [m["adapter_sha256"] for m in new["members"]] == [
        m["adapter_sha256"] for m in old["members"]
    ]


def test_changed_settings_refuse_to_resume(trained):
    from pmixed.train.ensemble import train_ensemble

    cfg, _ = trained
    with pytest.raises(EnsembleMismatch, match="other settings"):
        train_ensemble(cfg.replace(lora__r=3), progress=False)
    # the fine-tune baseline's own rate does not touch a member: everything is reused
    res = train_ensemble(cfg.replace(train__finetune_lr=1e-4), progress=False)
    assert res.trained == [] and len(res.skipped) == cfg.data.n_parts


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"lora__r": 3}, "[lora] r 2 -> 3"),
        ({"lora__alpha": 4}, "[lora] alpha 8 -> 4"),
        ({"train__lr": 1e-3}, "[train] lr 0.01 -> 0.001"),
        ({"train__max_steps": 6}, "[train] max_steps 4 -> 6"),
        ({"run__seed": 1}, "[run] seed 0 -> 1"),
        ({"data__seed": 5}, "data partition differs ([data] seed 0 -> 5)"),
        ({"data__block_size": 16}, "[data] block_size 32 -> 16"),
    ],
    ids=["lora.r", "lora.alpha", "train.lr", "train.max_steps", "run.seed", "data.seed", "data.block_size"],
)
def test_a_changed_member_setting_is_refused_by_name_and_nothing_is_reused(trained, change, named):
    """Reported: after a refused [data] seed change, a changed [lora] r on the same folder skipped
    all three members. Not so: every change a member's weights depend on is refused, naming the
    field, after the [data] seed refusal too; the folder is left as it was."""
    from pmixed.train.ensemble import train_ensemble

    cfg, _ = trained
    before = (cfg.output_dir / "ensemble.json").read_text()
    with pytest.raises(EnsembleMismatch, match="data partition differs"):
        train_ensemble(cfg.replace(data__seed=5), progress=False)
    with pytest.raises(EnsembleMismatch, match="other settings") as err:
        train_ensemble(cfg.replace(**change), progress=False)
    assert named in str(err.value) and "choose a new run.output_dir" in str(err.value)
    if "data__seed" not in change:
        assert "data partition" not in str(err.value)
    assert (cfg.output_dir / "ensemble.json").read_text() == before


def test_without_the_manifest_members_of_other_settings_are_retrained(trained, tmp_path):
    """A folder whose ensemble.json was deleted: each member's own record decides, so members
    trained with another [lora] r (or [train] lr) are retrained, never reused."""
    from pmixed.train.ensemble import train_ensemble

    cfg, _ = trained
    out = tmp_path / "no-manifest"
    shutil.copytree(cfg.output_dir, out)
    (out / "ensemble.json").unlink()
    old = {i: json.loads((out / "members" / f"member-{i:03d}" / "member.json").read_text()) for i in range(3)}
    res = train_ensemble(cfg.replace(run__output_dir=str(out), lora__r=3), progress=False)
    assert res.trained == [0, 1, 2] and res.skipped == []
    m = json.loads((out / "ensemble.json").read_text())
    assert m["lora"]["r"] == 3 and m["complete"]
    for rec in m["members"]:
        assert rec["settings_sha256"] == m["settings_sha256"] != old[rec["index"]]["settings_sha256"]
        assert rec["adapter_sha256"] != old[rec["index"]]["adapter_sha256"]
        cfg_file = json.loads((out / rec["path"] / "adapter_config.json").read_text())
        assert cfg_file["r"] == 3
    (out / "ensemble.json").unlink()
    res = train_ensemble(cfg.replace(run__output_dir=str(out), lora__r=3, train__lr=1e-3), progress=False)
    assert res.trained == [0, 1, 2] and res.skipped == []


def test_load_ensemble_verifies(trained, tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM

    from pmixed.models.ensemble import load_ensemble

    cfg, _ = trained
    ens = load_ensemble(cfg.output_dir)
    assert ens.n_members == 3 and ens.member_names[0] == "member-000"
    assert all((p / "adapter_model.safetensors").is_file() for p in ens.adapter_paths)
    assert ens.partition_manifest
    evals = ens.eval_records()
    assert evals and all(r.unit == evals[0].unit for r in evals)  # one held-out user
    pm = ens.peft_model()
    assert set(pm.peft_config) == {"member-000", "member-001", "member-002"}

    # a different base
    other = AutoModelForCausalLM.from_pretrained(tiny_base)
    with torch.no_grad():
        other.transformer.wte.weight[0, 0] += 1.0
    with pytest.raises(EnsembleMismatch, match="base model weights"):
        load_ensemble(cfg.output_dir, base_model=other)

    # a corrupt adapter, named in the error
    out = tmp_path / "corrupt"
    shutil.copytree(cfg.output_dir, out)
    path = out / "members" / "member-001" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(EnsembleMismatch, match="member-001"):
        load_ensemble(out)


def test_base_weights_unchanged_by_training(trained, tiny_base):
    from transformers import AutoModelForCausalLM

    from pmixed.models.loading import weights_sha256
    from pmixed.train.common import load_base

    cfg, _ = trained
    base = load_base(cfg, progress=False)
    assert base.weights_sha256 == weights_sha256(AutoModelForCausalLM.from_pretrained(tiny_base))


@pytest.mark.slow
def test_torchrun_two_ranks_train_each_member_once(tiny_base, tiny_records, tmp_path):
    """2 gloo ranks: each member trained exactly once, by rank index % 2; rank 0 writes the
    manifest; the result equals the single-process one (per-member seeds)."""
    from tests.train.helpers import tiny_config_dict, write_toml

    out = tmp_path / "dist"
    cfg_path = write_toml(
        tiny_config_dict(tiny_base, tiny_records, out, n_parts=3), tmp_path / "tiny.toml"
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "pmixed.train.ensemble_main",
        "--config",
        str(cfg_path),
        "--quiet",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((out / "ensemble.json").read_text())
    assert m["complete"] and len(m["members"]) == 3
    by = {rec["index"]: rec["trained_by"] for rec in m["members"]}
    assert sorted(by) == [0, 1, 2]
    assert all(t["world_size"] == 2 and t["rank"] == i % 2 for i, t in by.items())
    assert len({t["pid"] for t in by.values()}) == 2  # two processes did the work
