"""`pmixed eval` and `pmixed sweep` on a tiny trained run: the outputs, the ledgers, the protocol."""

import json
import math
import subprocess
import sys

from pmixed.privacy.ledger import Ledger


def test_eval_writes_table_plot_and_charges_each_run(trained_run):
    from pmixed.eval.runner import evaluate_config

    cfg, _ = trained_run
    res = evaluate_config(cfg, progress=False)
    for key in ("json", "csv", "md", "png"):
        assert (cfg.output_dir / "eval" / f"eval.{key}").is_file()
    assert set(res["models"]) == {"public", "finetune", "dpsgd", "ensemble_avg"}
    s = res["pmixed"][0]
    assert s["runs"] == 2 and len(s["ppl_runs"]) == 2 and s["queries"] == 93
    assert all(math.isfinite(p) and p > 1 for p in s["ppl_runs"])
    assert s["epsilon_spent"] <= 8.0
    ledgers = sorted((cfg.output_dir / "ledgers" / "eval").glob("*.ledger"))
    assert len(ledgers) == 2  # a fresh budget per run
    for path in ledgers:
        with Ledger(path) as led:
            assert led.charges() == 1 and led.history()[0].count == 93
    md = (cfg.output_dir / "eval" / "eval.md").read_text()
    assert "PMixED" in md and "Fine-tuned" in md


def test_eval_without_the_ensemble_average_gives_the_same_pmixed_numbers(trained_run, tmp_path):
    import dataclasses

    from pmixed.eval.runner import evaluate_config

    cfg, _ = trained_run
    full = evaluate_config(cfg, out_dir=tmp_path / "full", progress=False)
    fast_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, ensemble_average=False))
    fast = evaluate_config(fast_cfg, out_dir=tmp_path / "fast", progress=False)
    assert "ensemble_avg" in full["models"] and "ensemble_avg" not in fast["models"]
    assert fast["models"]["public"] == full["models"]["public"]
    a, b = full["pmixed"][0], fast["pmixed"][0]
    for x, y in zip(a["ppl_runs"], b["ppl_runs"], strict=True):  # the same draws, the same releases
        assert math.isclose(x, y, rel_tol=1e-6)
    assert "Ensemble average" not in (tmp_path / "fast" / "eval.md").read_text()


def test_eval_in_bfloat16_is_close_and_says_so(trained_run, tmp_path):
    """``[eval] dtype = "bfloat16"``: the forwards in bf16 (after the fp32 hash checks), the
    perplexities within 1% of float32 here (0.05% on the quick config), the precision recorded."""
    import dataclasses

    import torch

    from pmixed.eval.runner import evaluate_config, load_runtime

    cfg, _ = trained_run
    ref = evaluate_config(cfg, out_dir=tmp_path / "fp32", progress=False)
    bf_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, dtype="bfloat16"))
    _, rt = load_runtime(bf_cfg, progress=False)
    assert rt.dtype == torch.bfloat16 and next(iter(rt.stacked._layers.values())).lora_A.dtype == torch.bfloat16
    bf = evaluate_config(bf_cfg, out_dir=tmp_path / "bf16", progress=False)
    assert ref["compute_dtype"] == "float32" and bf["compute_dtype"] == "bfloat16"
    for name, m in ref["models"].items():
        assert math.isclose(bf["models"][name]["ppl"], m["ppl"], rel_tol=1e-2), name
        assert bf["models"][name]["ppl"] != m["ppl"]  # it really ran in another precision
    assert math.isclose(bf["pmixed"][0]["ppl_mean"], ref["pmixed"][0]["ppl_mean"], rel_tol=1e-2)
    assert bf["pmixed"][0]["epsilon_spent"] <= 8.0


def test_sweep_cli(trained_run):
    cfg, cfg_path = trained_run
    out = subprocess.run([sys.executable, "-m", "pmixed", "sweep", "--config", str(cfg_path),
                          "--param", "epsilon", "--values", "2,8", "-q"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads((cfg.output_dir / "sweep" / "sweep.json").read_text())
    assert [s["epsilon"] for s in res["pmixed"]] == [2.0, 8.0]
    assert (cfg.output_dir / "sweep" / "sweep-epsilon.png").is_file()
    rows = (cfg.output_dir / "sweep" / "sweep.csv").read_text().splitlines()
    assert len(rows) == 3

    # an alpha sweep: the CSV's alpha is the swept order (the projection's largest), and the
    # order the conversion attains epsilon at has its own column
    out = subprocess.run([sys.executable, "-m", "pmixed", "sweep", "--config", str(cfg_path),
                          "--param", "alpha", "--values", "3,5", "-q"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import csv

    with (cfg.output_dir / "sweep" / "sweep.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [(r["value"], r["alpha"]) for r in table] == [("3.0", "3"), ("5.0", "5")]
    assert all(2 <= int(r["epsilon_order"]) <= int(r["alpha"]) for r in table)
    assert all(float(r["lam_max"]) > 0 and float(r["tail"]) >= 1 for r in table)


def test_eval_cli_and_generate_cli(trained_run):
    cfg, cfg_path = trained_run
    out = subprocess.run([sys.executable, "-m", "pmixed", "eval", "--config", str(cfg_path), "-q"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "PMixED" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pmixed", "generate", "--config", str(cfg_path),
                          "--prompt", "river", "--max-new-tokens", "5", "--seed", "1"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ledger epsilon spent" in out.stdout


def test_missing_ensemble_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pmixed", "eval", "--config", "configs/quick.toml",
                          "-o", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert out.returncode != 0
    assert "pmixed train ensemble" in out.stderr and "Traceback" not in out.stderr
