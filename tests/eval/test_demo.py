"""`pmixed demo` on a trained tiny run: finished steps are reused, stale baselines retrained."""

from __future__ import annotations

import shutil

from typer.testing import CliRunner

from tests.train.helpers import tiny_config_dict, write_toml


def _demo(cfg_path):
    from pmixed.cli import app

    result = CliRunner().invoke(app, ["demo", "--config", str(cfg_path), "--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)
    return " ".join(result.output.split())  # the console wraps long lines


def test_demo_reuses_matching_baselines_and_retrains_stale_ones(trained_run, tmp_path):
    cfg, _ = trained_run
    out = tmp_path / "out"
    shutil.copytree(cfg.output_dir, out)

    def config(name, **overrides):
        data = tiny_config_dict(cfg.model.base, cfg.data.source, out, n_parts=3, train__max_steps=8,
                                lora__dropout=0.0, **overrides)
        data["privacy"] = {"epsilon": 8.0, "delta": 1e-5, "queries": 93, "sample_rate": 0.5}
        data["eval"] = {"runs": 2, "n_blocks": 3, "block_size": 32, "seed": 0}
        return write_toml(data, tmp_path / name)

    text = _demo(config("same.toml"))
    assert "finetune: reusing" in text and "dpsgd: reusing" in text
    assert "Fine-tuned (non-private)" in text and "private continuation" in text
    before = (out / "finetune" / "finetune.json").read_text()

    text = _demo(config("ft.toml", train__finetune_lr=3e-3, dpsgd_unit__enabled=True,
                        dpsgd_unit__units_per_step=2.0, dpsgd_unit__steps=2))
    assert "finetune: retraining ([train] differs (finetune_lr))" in text
    assert "dpsgd: reusing" in text
    # the unit-level DP-SGD baseline is trained when enabled and gets its row in the table
    assert (out / "dpsgd_unit" / "dpsgd_unit.json").is_file()
    assert "| DP-SGD per user eps=" in text
    assert (out / "finetune" / "finetune.json").read_text() != before

    # `pmixed eval` does not retrain, but says when a baseline no longer matches the config
    from pmixed.cli import app

    result = CliRunner().invoke(app, ["eval", "--config", str(config("dp.toml", dpsgd__max_steps=2)), "--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)
    said = " ".join(result.output.split())
    assert "warning: the dpsgd baseline does not match this config ([dpsgd] differs (max_steps))" in said
    assert "DP-SGD per user" not in said and "dpsgd_unit" not in said  # not enabled: not evaluated
