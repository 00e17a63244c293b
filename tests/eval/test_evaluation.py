"""`pmixed eval` and `pmixed sweep` on a tiny trained run: the outputs, the ledgers, the protocol."""

import json
import math
import subprocess
import sys

import pytest

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


def test_a_session_longer_than_the_held_out_positions_is_scored_on_them_and_charged_for_them(trained_run):
    """T > Q: the session's first Q queries, each at the T-query calibration, on the same Q
    positions as a shorter setup; the ledger is charged for the Q released, not for T."""
    from pmixed.eval.perplexity import run_evaluation
    from pmixed.eval.runner import config_setup, eval_blocks, load_runtime
    from pmixed.privacy.calibration import epsilon_after

    cfg, _ = trained_run
    ens, rt = load_runtime(cfg, progress=False)
    blocks = eval_blocks(ens, cfg)
    Q = blocks.shape[0] * (blocks.shape[1] - 1)
    long, short = config_setup(cfg, "long", query_budget=50 * Q), config_setup(cfg, "short", query_budget=Q)
    res = run_evaluation(rt, blocks, [long, short], progress=False, average=False)
    rows = {s["name"]: s for s in res.pmixed}
    assert rows["long"]["positions"] == rows["short"]["positions"] == Q
    assert rows["long"]["sessions_per_run"] == 1
    assert rows["long"]["epsilon_spent"] == pytest.approx(epsilon_after(long.params, Q, cfg.privacy.delta))
    assert rows["long"]["epsilon_spent"] < cfg.privacy.epsilon  # the rest of the session is not released
    assert rows["long"]["ppl_mean"] > rows["short"]["ppl_mean"]  # a budget spread over 50x the queries


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
    import csv

    cfg, cfg_path = trained_run
    sweep = cfg.output_dir / "sweep"
    out = subprocess.run([sys.executable, "-m", "pmixed", "sweep", "--config", str(cfg_path),
                          "--param", "epsilon", "--values", "2,8", "-q"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads((sweep / "sweep-epsilon.json").read_text())
    assert [s["epsilon"] for s in res["pmixed"]] == [2.0, 8.0]
    assert (sweep / "sweep-epsilon.png").is_file()
    assert len((sweep / "sweep-epsilon.csv").read_text().splitlines()) == 3
    assert "non-private diagnostic: mean lambda" in " ".join(out.stdout.split())

    # an alpha sweep: the CSV's alpha is the swept order (the projection's largest), and the
    # order the conversion attains epsilon at has its own column; the epsilon results stay
    out = subprocess.run([sys.executable, "-m", "pmixed", "sweep", "--config", str(cfg_path),
                          "--param", "alpha", "--values", "3,5", "-q"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    with (sweep / "sweep-alpha.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [(r["value"], r["alpha"]) for r in table] == [("3", "3"), ("5", "5")]
    assert all(2 <= int(r["epsilon_order"]) <= int(r["alpha"]) for r in table)
    assert all(float(r["lam_max"]) > 0 and float(r["tail"]) >= 1 for r in table)
    assert len((sweep / "sweep-epsilon.csv").read_text().splitlines()) == 3  # not overwritten
    with (sweep / "sweep.csv").open() as fh:  # all parameters swept so far
        merged = list(csv.DictReader(fh))
    assert sorted({r["param"] for r in merged}) == ["alpha", "epsilon"] and len(merged) == 4
    assert "nonprivate_mean_lambda" in merged[0]


def test_sweep_bad_value_is_refused_before_any_work(trained_run, tmp_path):
    cfg, cfg_path = trained_run
    for param, value, says in (("sample_rate", "1.5", "sample_rate=1.5"), ("members", "7", "members=7"),
                               ("alpha", "2.5", "alpha=2.5"), ("epsilon", "-1", "epsilon=-1")):
        out = subprocess.run([sys.executable, "-m", "pmixed", "sweep", "--config", str(cfg_path), "-o",
                              str(tmp_path / "none"), "-p", param, "--values", value, "-q"],
                             capture_output=True, text=True)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0] and "Traceback" not in out.stderr, out.stderr
        assert not (tmp_path / "none").exists()  # checked before the ensemble is even looked for


def test_eval_refuses_a_stale_ensemble_as_train_does(trained_run, tmp_path):
    """Issue 12 item 5: a changed [data] section: train refuses, and so does eval."""
    import shutil

    from pmixed.errors import EnsembleMismatch
    from pmixed.eval.runner import evaluate_config
    from pmixed.train.ensemble import train_ensemble

    cfg, _ = trained_run
    for i, change in enumerate(({"data__seed": 5}, {"data__eval_units": 2})):
        shutil.copytree(cfg.output_dir, tmp_path / f"out{i}")  # train must not touch the shared run
        stale = cfg.replace(run__output_dir=str(tmp_path / f"out{i}"), **change)
        with pytest.raises(EnsembleMismatch) as train_err:
            train_ensemble(stale, progress=False)
        assert "data partition differs" in str(train_err.value)
        with pytest.raises(EnsembleMismatch) as eval_err:
            evaluate_config(stale, out_dir=tmp_path / "x", progress=False)
        reason = str(train_err.value).split("(")[1].split(")")[0]  # e.g. "data partition differs"
        assert reason in str(eval_err.value) and "pmixed train ensemble` refuses" in str(eval_err.value)
    assert not (tmp_path / "x").exists()


def cli(capsys, *args):
    """``pmixed ARGS`` in-process through the real entry point: (exit code, stdout, stderr)."""
    from pmixed.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return ex.value.code, " ".join(out.out.split()), out.err


def test_eval_cli_quiet_labels_the_diagnostics_and_names_every_file(trained_run):
    cfg, cfg_path = trained_run
    out = subprocess.run([sys.executable, "-m", "pmixed", "eval", "--config", str(cfg_path), "-q"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # -q: no bars, no third-party warnings (transformers, Opacus, FutureWarning)
    said = " ".join(out.stdout.split())
    assert "PMixED" in said
    # issue 11 defect 5: the lambda statistics are labelled for what they are
    assert said.count("mean lambda") == 1
    assert "non-private diagnostic (functions of the private members, not covered by epsilon; do not publish): " \
           "mean lambda" in said
    written = said.split("wrote (")[1]
    for key in ("json", "csv", "md", "png"):
        assert str(cfg.output_dir / "eval" / f"eval.{key}") in written
    assert str(cfg.output_dir / "eval" / "eval-lambda.png") in written
    res = json.loads((cfg.output_dir / "eval" / "eval.json").read_text())
    s = res["pmixed"][0]
    assert not {"mean_lambda", "lambda_histogram", "binding_constraint", "empty_draw_fraction"} & set(s)
    diag = s["diagnostics_nonprivate"]
    assert diag["note"].startswith("non-private diagnostic") and 0 <= diag["mean_lambda"] <= 1
    assert sum(diag["lambda_histogram"]) > 0 and diag["binding_constraint"]


def test_generate_cli_prompt_past_the_context(trained_run, tmp_path, capsys):
    """Issue 12 item 1, the CLI side: a prompt that cannot fit is one line and exit 2 with nothing
    charged; --truncate-prompt cuts it from the left; generation stops at the context."""
    cfg, cfg_path = trained_run
    path = tmp_path / "ctx.ledger"
    long = "river ocean lake " * 40  # > 64 tokens, the tiny model's context
    code, out, err = cli(capsys, "generate", "-c", cfg_path, "--prompt", long, "--ledger", path, "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--truncate-prompt" in err
    with Ledger(path, epsilon=8.0, delta=1e-5) as led:
        assert led.charges() == 0
    code, out, err = cli(capsys, "generate", "-c", cfg_path, "--prompt", long, "--ledger", path, "-q",
                         "--truncate-prompt", "--max-new-tokens", 50, "--ignore-eos")  # unseeded: no early EOS
    assert code == 0, err
    n = int(out.split(" tokens, stopped: ")[0].split("(")[-1])
    assert "stopped: length" in out and 1 <= n < 50
    with Ledger(path) as led:
        assert sum(h.count for h in led.history()) == n


def test_generate_cli_prints_the_released_tokens_before_a_later_error(trained_run, tmp_path, capsys, monkeypatch):
    from pmixed.engine import Generation, PrivatePredictor
    from pmixed.errors import GenerationInterrupted

    cfg, cfg_path = trained_run

    def fails(self, prompt, **kw):
        partial = Generation(prompt=prompt, text=" lake pond", token_ids=[5, 6], epsilon_spent=0.5, stopped="length")
        raise GenerationInterrupted(partial, RuntimeError("boom")) from RuntimeError("boom")

    monkeypatch.setattr(PrivatePredictor, "generate", fails)
    code, out, err = cli(capsys, "generate", "-c", cfg_path, "--prompt", "river", "--ledger", tmp_path / "i", "-q")
    assert code == GenerationInterrupted.exit_code
    assert "river lake pond" in out and "2 tokens released before the error" in out
    assert len(err.strip().splitlines()) == 1 and "boom" in err


def test_generate_quiet_is_silent_on_stderr(trained_run):
    cfg, cfg_path = trained_run
    out = subprocess.run([sys.executable, "-m", "pmixed", "generate", "-c", str(cfg_path), "--prompt", "river",
                          "--max-new-tokens", "3", "--seed", "2", "--experiment", "-q"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "" and "3 tokens, stopped: length" in " ".join(out.stdout.split())


def test_long_step_is_announced_under_quiet(trained_run, capsys, monkeypatch):
    import dataclasses

    import pmixed.models.tiny_gpt2 as tg
    from pmixed.cli.evaluate import announce_long_steps

    cfg, _ = trained_run
    announce_long_steps(cfg)  # a local base: nothing to build
    assert capsys.readouterr().err == ""
    tiny = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, base="builtin:tiny-gpt2"))
    monkeypatch.setattr(tg, "is_built", lambda folder: False)
    announce_long_steps(tiny)  # a trained run to load (the fixture's): announced
    err = capsys.readouterr().err
    assert err.startswith("building the public base builtin:tiny-gpt2") and "expect about" in err and "min" in err


def test_generate_cli_charges_its_ledger_and_shows_the_budget(trained_run, tmp_path, capsys):
    cfg, cfg_path = trained_run
    path = tmp_path / "g.ledger"
    code, out, err = cli(capsys, "generate", "-c", cfg_path, "--prompt", "river", "--max-new-tokens", 5,
                         "--ledger", path, "-q", "--ignore-eos")
    assert code == 0, err
    with Ledger(path) as led:  # every released token was charged, one query each
        hist = led.history()
        assert [(h.count, h.label) for h in hist] == [(1, "generate")] * 5
        spent, left = led.epsilon_spent(), None
    assert f"ledger {path}: epsilon spent {spent:.4f} of 8," in out
    left = int(out.split("tokens left")[0].split()[-1])
    assert 0 < left < 93

    # status: the same figures, the history by label, the queries left at the config's cost
    code, out, err = cli(capsys, "privacy", "status", "--ledger", path, "--config", cfg_path)
    assert code == 0, err
    assert f"epsilon spent {spent:.6g} of limit 8" in out and "generate: 5 charges, 5 queries" in out
    assert out.endswith(f"T=93): {left}")


def test_generate_cli_exhausted_budget_exits_3_and_says_how_to_start_anew(trained_run, tmp_path, capsys):
    from pmixed.cli.privacy import queries_left
    from pmixed.mechanism.pmixed import PMixED
    from pmixed.privacy.accountant import RdpCharge

    cfg, cfg_path = trained_run
    path = tmp_path / "spent.ledger"
    with Ledger(path, epsilon=8.0, delta=1e-5) as led:
        rdp = PMixED.from_config(cfg.privacy, 3).query_rdp(led.orders)
        led.charge(RdpCharge(led.orders, rdp, count=queries_left(led, rdp), label="earlier"))
        assert queries_left(led, rdp) == 0
        before = led.charges()
    code, out, err = cli(capsys, "generate", "-c", cfg_path, "--prompt", "river", "--ledger", path, "-q")
    assert code == 3 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "budget exhausted" in lines[0] and "nothing was released" in lines[0]
    assert "new --ledger path" in lines[0] and f"delete {path}" in lines[0]
    with Ledger(path) as led:
        assert led.charges() == before


def test_generate_cli_ledger_of_another_budget_gives_the_cli_way(trained_run, tmp_path, capsys):
    cfg, cfg_path = trained_run
    path = tmp_path / "other.ledger"
    Ledger(path, epsilon=4.0, delta=1e-5).close()
    code, out, err = cli(capsys, "generate", "-c", cfg_path, "--prompt", "river", "--ledger", path)
    assert code == 4  # refused before any model is loaded (no progress bar either)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "different budget" in lines[0] and "new --ledger path" in lines[0]


def test_generate_cli_seed_needs_an_experiment_ledger(trained_run, tmp_path, capsys):
    """Issue 11 defect 4: a seeded generation (predictable draws and sampling) is never charged
    to a durable ledger; --experiment charges a fresh in-memory one."""
    cfg, cfg_path = trained_run
    default = cfg.output_dir / "ledgers" / "generate.ledger"
    existed = default.exists()
    for extra in ((), ("--ledger", tmp_path / "s.ledger")):
        code, out, err = cli(capsys, "generate", "-c", cfg_path, "--prompt", "river", "--seed", 1, *extra)
        assert code == 2 and "seed" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "generate", "-c", cfg_path, "--seed", 1, "--experiment", "--ledger", tmp_path / "e")
    assert code == 2 and "drop --ledger" in err
    assert not (tmp_path / "s.ledger").exists() and not (tmp_path / "e").exists()
    runs = []
    for _ in range(2):
        code, out, err = cli(capsys, "generate", "-c", cfg_path, "--prompt", "river", "--max-new-tokens", 4,
                             "--seed", 1, "--experiment", "-q")
        assert code == 0, err
        assert "in-memory experiment ledger: epsilon spent" in out
        runs.append(out)
    assert runs[0] == runs[1]  # seeded: reproducible
    assert default.exists() == existed  # nothing durable was written


def test_missing_ensemble_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pmixed", "eval", "--config", "configs/quick.toml",
                          "-o", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert out.returncode != 0
    assert "pmixed train ensemble" in out.stderr and "Traceback" not in out.stderr
    # a relative output_dir: the message says where it looked and from what (issue 12 item 8)
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "configs" / "quick.toml"
    out = subprocess.run([sys.executable, "-m", "pmixed", "eval", "--config", str(config), "-o", "nothing/here"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 6 and len(out.stderr.strip().splitlines()) == 1
    assert f"no ensemble in {tmp_path.resolve() / 'nothing' / 'here'}" in out.stderr
    assert "relative to the current directory" in out.stderr


def _figures(monkeypatch):
    """Keep every figure the report module saves (it closes them after saving)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    saved = []
    real = Figure.savefig

    def keep(self, *a, **kw):
        saved.append(self)
        return real(self, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", keep)
    return saved


def test_plots_zoom_label_and_tick_plainly(tmp_path, monkeypatch):
    """Issue 12 item 9: the bar chart's axis is where the models differ (not from 0); the epsilon
    sweep labels DP-SGD (a point at its epsilon); the members sweep has integer tick labels."""
    from pmixed.eval.report import bar_chart, sweep_plot

    saved = _figures(monkeypatch)
    rows = [{"model": m, "ppl": p, "std": s, "key": k} for m, p, s, k in
            (("public", 210.1, None, "public"), ("ft", 192.9, None, "finetune"), ("PMixED", 198.8, 0.3, "pmixed"))]
    bar_chart(rows, tmp_path / "bar.png")
    lo, hi = saved[-1].axes[0].get_xlim()
    assert 180 < lo < 192.9 and 210.1 < hi < 230

    result = {"models": {"public": {"ppl": 210.1}, "finetune": {"ppl": 192.9}, "dpsgd": {"ppl": 202.7}},
              "baseline_epsilon": {"dpsgd": 8.0}}

    def points(param, vals):
        return [{"sweep": {param: v}, "ppl_mean": 200.0 - i, "ppl_std": 0.1} for i, v in enumerate(vals)]

    sweep_plot(result, "epsilon", points("epsilon", [2.0, 4.0, 8.0]), tmp_path / "e.png")
    ax = saved[-1].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(x.startswith("DP-SGD eps=8") for x in labels)
    assert any(t.get_text().startswith("DP-SGD eps=8") for t in ax.texts)  # on the plot, not only the legend

    sweep_plot(result, "members", points("members", [8, 16, 32]), tmp_path / "m.png")
    ax = saved[-1].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "16", "32"]
