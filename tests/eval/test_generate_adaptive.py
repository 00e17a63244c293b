"""``pmixed generate --mechanism adaptive`` (screened PMixED through a Renyi filter): one unit
charged per screen round, the ledger opened under the filter, the output naming the units
charged and left; a public screen (huge threshold) answers from the public model alone after one
unit; a ledger of another acceptance rule is refused in one line; the plain path unchanged."""

from __future__ import annotations

import tomllib

import pytest
import torch

from pmixed.privacy.ledger import MEMORY, Ledger
from tests.eval.test_evaluation import cli
from tests.train.helpers import write_toml


def _with(cfg_path, tmp_path, name, **privacy):
    data = tomllib.loads(cfg_path.read_text())
    data["privacy"].update(privacy)
    return write_toml(data, tmp_path / name)


@pytest.fixture(scope="module")
def runtime(trained_run):
    from pmixed.eval.runner import load_runtime

    return load_runtime(trained_run[0], progress=False)[1]


def _adaptive(cfg, n, **kw):
    from pmixed.mechanism.adaptive import AdaptivePMixED

    return AdaptivePMixED.from_config(cfg.privacy, n, **kw)


def test_generate_cli_adaptive_charges_one_unit_per_round(trained_run, tmp_path, capsys):
    """The config's default screen (threshold 0, public score = entropy >= 0) makes every token
    private: one unit, charged before its round, per token."""
    cfg, cfg_path = trained_run
    path = tmp_path / "a.ledger"
    code, out, err = cli(capsys, "generate", "-c", cfg_path, "--prompt", "river", "--max-new-tokens", 5,
                         "--ledger", path, "--mechanism", "adaptive", "-q", "--ignore-eos")
    assert code == 0, err
    m = _adaptive(cfg, 3)
    with Ledger.open(path) as led:
        assert led.rule == m.rule and led.rule.name == f"renyi-filter/alpha={m.order}"
        hist = led.history()
        assert [(h.count, h.label, h.mechanism) for h in hist] == [(1, "generate", "pmixed/adaptive")] * 5
        spent, left = led.epsilon_spent(), led.queries_left(m.charge(led.orders).rdp)
    assert spent == pytest.approx(m.epsilon_after(5), rel=1e-9)
    assert "5 tokens, stopped: length" in out
    assert f"(Renyi filter, order {m.order}): epsilon spent {spent:.4f} of 8;" in out
    assert "5 units charged by this generation (5 private answers, 0 screened public answers)" in out
    assert f"{left} units left at this config's cost" in out and left == m.max_units() - 5


def test_public_screen_answers_from_the_public_model_after_one_unit(trained_run, runtime, tmp_path, monkeypatch):
    """A threshold no score reaches: one unit for the whole generation, no member runs, and the
    tokens are the public model's sampling with the same seeded generator."""
    from pmixed.cli.evaluate import generate
    from pmixed.mechanism.subsample import sample_token
    from pmixed.models.runtime import PUBLIC

    cfg, cfg_path = trained_run
    from pmixed.config import load_config

    pub_cfg = load_config(_with(cfg_path, tmp_path, "public.toml", mechanism="adaptive", screen_threshold=1e9))
    rows = []
    real = type(runtime).decode

    def spy(self, groups, **kw):
        rows.extend(a for g in groups for a in g.adapters)
        return real(self, groups, **kw)

    monkeypatch.setattr(type(runtime), "decode", spy)
    res = generate(pub_cfg, "river", 8, 1.0, None, 7, runtime, experiment=True)
    monkeypatch.undo()
    assert set(rows) == {PUBLIC}  # no member ran
    assert res.mechanism == "adaptive" and res.charged == 1 and res.private_answers == 0
    assert res.stopped in ("length", "eos") and res.ledger_path is None
    m = _adaptive(pub_cfg, 3)
    assert res.epsilon_spent == pytest.approx(m.epsilon_after(1), rel=1e-9)
    assert res.queries_left == m.max_units() - 1
    # the same generator, the public model alone (full recomputation of each prefix)
    gen = torch.Generator().manual_seed(7)
    seq = list(runtime.tokenizer("river", add_special_tokens=False)["input_ids"])
    want = []
    for _ in range(len(res.token_ids)):
        p = runtime.probs(torch.tensor([seq]), [PUBLIC])[0, -1].double()
        tok = sample_token(p / p.sum(), gen)
        seq.append(tok)
        want.append(tok)
    assert res.token_ids == want


def test_generate_stops_when_the_next_unit_does_not_fit(trained_run, runtime):
    from dataclasses import replace

    from pmixed.cli.evaluate import generate
    from pmixed.engine import PrivatePredictor

    cfg, _ = trained_run
    m = _adaptive(cfg, 3)
    with Ledger(MEMORY, epsilon=8.0, delta=1e-5, rule=m.rule) as led:
        left = led.queries_left(m.charge(led.orders).rdp)
        led.charge(replace(m.charge(led.orders, "earlier"), count=left - 2))
        out = PrivatePredictor(runtime, m, led, generator=torch.Generator().manual_seed(0)).generate(
            "river", max_new_tokens=6, stop_at_eos=False)
        assert len(out.token_ids) == 2 and out.stopped == "budget" and out.queries_left == 0
        assert out.charged == 2 and out.filter_order == m.order
    with Ledger(MEMORY, epsilon=8.0, delta=1e-5) as best, pytest.raises(Exception, match="Renyi filter"):
        PrivatePredictor(runtime, m, best)  # the engine refuses a budget of another rule too
    # a seeded experiment (in-memory ledger): reproducible, nothing durable
    a = generate(cfg, "river", 4, 1.0, None, 3, runtime, experiment=True, mechanism="adaptive")
    b = generate(cfg, "river", 4, 1.0, None, 3, runtime, experiment=True, mechanism="adaptive")
    assert a.token_ids == b.token_ids and a.ledger_path is None and a.charged == len(a.token_ids)


def test_generate_cli_adaptive_refusals(trained_run, tmp_path, capsys):
    cfg, cfg_path = trained_run
    best = tmp_path / "best.ledger"
    Ledger(best, epsilon=8.0, delta=1e-5).close()  # written under the default rule, best-order
    code, out, err = cli(capsys, "generate", "-c", cfg_path, "--prompt", "river", "--ledger", best,
                         "--mechanism", "adaptive", "-q")
    lines = err.strip().splitlines()
    assert code == 4 and out == "" and len(lines) == 1
    assert "'best-order'" in lines[0] and "renyi-filter/alpha=" in lines[0] and "new --ledger path" in lines[0]
    with Ledger.open(best) as led:
        assert led.charges() == 0
    code, _, err = cli(capsys, "generate", "-c", cfg_path, "--mechanism", "screened", "--experiment")
    assert code == 2 and "mechanism" in err and len(err.strip().splitlines()) == 1
    # the budget is spent: exit 3, nothing released, the units left said
    from dataclasses import replace

    m = _adaptive(cfg, 3)
    spent = tmp_path / "spent.ledger"
    with Ledger(spent, epsilon=8.0, delta=1e-5, rule=m.rule) as led:
        led.charge(replace(m.charge(led.orders, "earlier"), count=led.queries_left(m.charge(led.orders).rdp)))
    code, out, err = cli(capsys, "generate", "-c", cfg_path, "--prompt", "river", "--ledger", spent,
                         "--mechanism", "adaptive", "-q")
    assert code == 3 and out == "" and "budget exhausted" in err and "0 units left" in err
    assert len(err.strip().splitlines()) == 1


def test_config_mechanism_is_the_default_and_the_plain_path_is_unchanged(trained_run, tmp_path, capsys):
    cfg, cfg_path = trained_run
    adaptive_cfg = _with(cfg_path, tmp_path, "adaptive.toml", mechanism="adaptive")
    code, out, err = cli(capsys, "generate", "-c", adaptive_cfg, "--prompt", "river", "--max-new-tokens", 3,
                         "--seed", 1, "--experiment", "-q")
    assert code == 0, err
    assert "3 units charged by this generation" in out and "Renyi filter" in out
    path = tmp_path / "plain.ledger"
    code, out, err = cli(capsys, "generate", "-c", adaptive_cfg, "--prompt", "river", "--max-new-tokens", 3,
                         "--ledger", path, "--mechanism", "pmixed", "-q", "--ignore-eos")
    assert code == 0, err
    assert "tokens left at this config's cost" in out and "units" not in out
    with Ledger.open(path) as led:
        assert led.rule.name == "best-order"
        assert [(h.count, h.mechanism) for h in led.history()] == [(1, "pmixed")] * 3


def test_generate_stops_at_eos_unless_told_not_to(trained_run, monkeypatch, capsys):
    """--ignore-eos keeps going past an end-of-text token (each token charged either way)."""
    cfg, cfg_path = trained_run
    from pmixed.models.ensemble import load_ensemble

    eos = load_ensemble(cfg.output_dir).tokenizer.eos_token_id
    monkeypatch.setattr("pmixed.engine.sample_token", lambda d, g=None: eos)  # every draw is EOS
    code, out, err = cli(capsys, "generate", "-c", cfg_path, "--prompt", "river", "--max-new-tokens", 3,
                         "--seed", 1, "--experiment", "-q")
    assert code == 0, err
    assert "1 tokens, stopped: eos" in " ".join(out.split())
    code, out, err = cli(capsys, "generate", "-c", cfg_path, "--prompt", "river", "--max-new-tokens", 3,
                         "--seed", 1, "--experiment", "-q", "--ignore-eos")
    assert code == 0, err
    assert "3 tokens, stopped: length" in " ".join(out.split())
