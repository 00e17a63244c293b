"""Members with fewer steps than ``max_steps`` say so; ``pmixed train ... -q``: no progress bars, no
third-party noise, but a long step (building the public base) is still announced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.train.helpers import (
    synthetic_texts,
    tiny_config,
    tiny_config_dict,
    write_records,
    write_toml,
)

# 5 users in 3 parts, no held-out user: parts of 1, 2 and 2 users (14, 27 and 32 blocks of 32
# tokens). At batch size 4 one epoch is 4, 7 and 8 steps: with max_steps = 6 only member-000
# (the one-user part) is short.
SHORT = {"train__max_steps": 6, "data__eval_units": 0}

NOISE = ("Warning", "warnings.warn", "Loading weights", "attention_mask", "pad_token", "it/s]")


@pytest.fixture(scope="module")
def small_records(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("small") / "small.jsonl", n_units=5, per_unit=2)


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _quiet_lines(stderr: str) -> list[str]:
    """stderr under -q is ours only: no third-party warning or progress bar in it."""
    for noise in NOISE:
        assert noise not in stderr, stderr
    return [line for line in stderr.splitlines() if line.strip()]


def test_a_member_with_fewer_steps_than_max_steps_says_so(tiny_base, small_records, tmp_path, capsys):
    from pmixed.train.ensemble import train_ensemble

    cfg = tiny_config(tiny_base, small_records, tmp_path / "out", n_parts=3, **SHORT)
    res = train_ensemble(cfg, progress=True)
    recs = res.manifest["members"]
    assert [(r["steps"], r["max_steps"], r["short"]) for r in recs] == [(4, 6, True), (6, 6, False), (6, 6, False)]
    assert "short_reason" not in recs[1] and "short_reason" not in recs[2]
    reason = recs[0]["short_reason"]
    assert f"only {recs[0]['n_blocks']} blocks of 32 tokens" in reason and "epochs = 1 at batch_size 4" in reason
    on_disk = json.loads((cfg.output_dir / "members" / "member-000" / "member.json").read_text())
    assert on_disk["short"] is True and on_disk["short_reason"] == reason
    # the progress output names the short member, once, and no other
    err = capsys.readouterr().err
    assert err.count("short member: member-000: 4 steps, fewer than max_steps = 6: its part has only") == 1
    assert "short member: member-001" not in err and "short member: member-002" not in err

    # no max_steps: nobody is short
    cfg2 = tiny_config(tiny_base, small_records, tmp_path / "out2", n_parts=3, **{**SHORT, "train__max_steps": None})
    recs = train_ensemble(cfg2, progress=False).manifest["members"]
    assert [(r["steps"], r["max_steps"], r["short"]) for r in recs] == [(4, None, False), (7, None, False),
                                                                         (8, None, False)]


def test_train_ensemble_quiet_names_short_members_and_nothing_third_party(tiny_base, small_records, tmp_path):
    cfg_path = write_toml(tiny_config_dict(tiny_base, small_records, tmp_path / "out", n_parts=3, **SHORT),
                          tmp_path / "short.toml")
    cmd = [sys.executable, "-m", "pmixed", "train", "ensemble", "-c", str(cfg_path), "-q"]
    for run in ("trains", "reuses"):  # the summary says it also when every member is reused
        out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        text = " ".join(out.stderr.split())  # the console wraps long lines
        _quiet_lines(out.stderr)
        assert "ensemble 3 members" in text and "1 with fewer steps than max_steps" in text, run
        assert text.count("short member: member-000: 4 steps, fewer than max_steps = 6") == 1, run
        assert "member-001:" not in text and "member-002:" not in text


def test_pretrain_quiet_announces_the_long_step_and_nothing_third_party(tmp_path):
    """Building builtin:tiny-gpt2 is announced by the build itself (every caller gets it), under
    -q too; nothing else but our summary reaches stderr."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(synthetic_texts(30, seed=3)):
        (corpus / f"doc{i:02d}.txt").write_text(text)
    data = tiny_config_dict("builtin:tiny-gpt2", tmp_path / "unused.jsonl", tmp_path / "out")
    data["public_pretrain"] = {"corpus": str(corpus), "vocab_size": 300, "n_layer": 1, "n_head": 2, "n_embd": 16,
                               "n_positions": 64, "block_size": 32, "steps": 3, "batch_size": 4,
                               "warmup_steps": 0, "heldout_fraction": 0.2}
    cfg_path = write_toml(data, tmp_path / "pre.toml")
    env = {**_env(), "PMIXED_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "pmixed", "train", "pretrain", "-c", str(cfg_path), "-q"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = _quiet_lines(out.stderr)
    assert lines[0].startswith(f"building the public base builtin:tiny-gpt2 (pre-training on {corpus}, "
                               "at most 3 steps; expect about 1 min"), out.stderr
    assert sum("building the public base" in line for line in lines) == 1
    summary = " ".join(" ".join(lines[1:]).split())  # the console wraps long lines
    assert summary.startswith("tiny-gpt2 ") and "held-out perplexity" in summary, out.stderr
    # cached: a second run builds nothing and announces nothing
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "building the public base" not in again.stderr


def test_an_announced_build_is_not_announced_twice(tmp_path, capsys, monkeypatch):
    """The CLI's announcement before a command's work (announce_long_steps) and the build's own
    one are the same line, said once; a later build in the same process is announced again."""
    import pmixed.data.sources as sources
    import pmixed.train.public_pretrain as pp
    from pmixed.config import PublicPretrainConfig

    cfg = PublicPretrainConfig(corpus=str(tmp_path / "none"))

    def stop(*args, **kwargs):  # the build gets as far as loading the corpus
        raise RuntimeError("stop")

    monkeypatch.setattr(sources, "load_records", stop)
    pp.announce_pretrain(cfg, cache_dir=tmp_path)
    with pytest.raises(RuntimeError, match="stop"):
        pp.ensure_tiny_gpt2(cfg, cache_dir=tmp_path, progress=False)
    assert capsys.readouterr().err.count("building the public base builtin:tiny-gpt2") == 1
    with pytest.raises(RuntimeError, match="stop"):
        pp.ensure_tiny_gpt2(cfg, cache_dir=tmp_path, progress=False)
    assert capsys.readouterr().err.startswith("building the public base builtin:tiny-gpt2")
