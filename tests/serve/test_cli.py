"""``pmixed keys`` and ``pmixed serve``: key administration, one-line start-up failures, and the
real command serving on loopback until SIGTERM."""

from __future__ import annotations

import tomllib

import httpx
import openai
import pytest

from pmixed.cli import main
from tests.serve.conftest import start_serve, stop_serve
from tests.train.helpers import write_toml


def run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ex:
        main(argv)
    out = capsys.readouterr()
    return ex.value.code, out.out, out.err


def test_keys_create_list_revoke_reset(tmp_path, capsys):
    kf = str(tmp_path / "keys.db")
    code, out, err = run(["keys", "create", "alice", "--keys", kf, "--quota", "50", "--period", "60"], capsys)
    assert code == 0 and out.strip().startswith("pmx-") and "shown only now" in err
    secret = out.strip()
    code, out, _ = run(["keys", "create", "ops", "--admin", "--quota", "0", "--keys", kf], capsys)
    assert code == 0
    code, out, _ = run(["keys", "list", "--keys", kf], capsys)
    assert code == 0 and "alice" in out and "ops" in out and secret not in out and "active" in out
    from pmixed.serve.keys import KeyStore

    store = KeyStore(kf)
    assert store.get("alice").quota == 50 and store.get("ops").quota is None and store.get("ops").admin
    store.reserve(store.get("alice").id, 20)
    assert run(["keys", "reset", "alice", "--keys", kf], capsys)[0] == 0
    assert store.get("alice").used == 0
    code, out, _ = run(["keys", "revoke", "alice", "--keys", kf], capsys)
    assert code == 0 and "revoked" in out and store.authenticate(secret) is None
    code, _, err = run(["keys", "revoke", "nobody", "--keys", kf], capsys)
    assert code == 2 and err.count("\n") == 1 and "no key" in err
    code, _, err = run(["keys", "list", "--keys", str(tmp_path / "none.db")], capsys)
    assert code == 2 and "no key file" in err and err.count("\n") == 1
    code, _, err = run(["keys", "list"], capsys)
    assert code == 2 and "--keys" in err


def _with(cfg_path, tmp_path, name, **changes):
    data = tomllib.loads(cfg_path.read_text())
    for key, value in changes.items():
        sec, fld = key.split("__")
        data[sec][fld] = value
    return write_toml(data, tmp_path / name)


def test_serve_startup_failures_are_one_line(serve_run, tmp_path, capsys):
    cfg, cfg_path = serve_run
    kf = tmp_path / "keys.db"
    code, _, err = run(["serve", "--config", str(cfg_path), "--keys", str(kf)], capsys)
    assert code == 2 and "no key file" in err and err.count("\n") == 1
    from pmixed.serve.keys import KeyStore

    KeyStore(kf).create("c")
    bad_n = _with(cfg_path, tmp_path, "n4.toml", data__n_parts=4)  # the ensemble has 3 members
    code, _, err = run(["serve", "--config", str(bad_n), "--keys", str(kf)], capsys)
    assert code == 6 and err.startswith("error: ") and err.count("\n") == 1
    junk = tmp_path / "junk.ledger"
    junk.write_bytes(b"this is not a ledger" * 200)
    code, _, err = run(["serve", "--config", str(cfg_path), "--keys", str(kf), "--ledger", str(junk)], capsys)
    assert code == 4 and err.startswith("error: ") and err.count("\n") == 1
    code, _, err = run(["serve", "--config", str(cfg_path), "--keys", str(kf), "--mode", "fast"], capsys)
    assert code == 2 and "mode" in err
    code, _, err = run(["serve", "--config", str(cfg_path), "--keys", str(kf), "--dtype", "float8"], capsys)
    assert code == 2 and "dtype" in err and err.count("\n") == 1
    code, _, err = run(["serve", "--config", str(cfg_path), "--keys", str(kf), "--prefill-tokens", "1"], capsys)
    assert code == 2 and "prefill_tokens" in err and err.count("\n") == 1


def test_pmixed_serve_command_on_loopback(serve_run, tmp_path):
    cfg, cfg_path = serve_run
    from pmixed.privacy.ledger import Ledger, record_count
    from pmixed.serve.keys import KeyStore

    kf, ledger = tmp_path / "keys.db", tmp_path / "serve.ledger"
    _, key = KeyStore(kf).create("c")
    proc, url = start_serve(cfg_path, kf, ledger, "--mode", "drawn", "--dtype", "bfloat16", "--prefill-tokens", "2")
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)
        r = c.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        p = httpx.get(url + "/v1/privacy", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()
        assert p["mode"] == "drawn" and p["unit"] == "user"
    finally:
        err = stop_serve(proc)
    assert proc.returncode == 0, err
    assert "serving 'tiny'" in err and "forwards in bfloat16" in err and "hi" not in err.replace("http", "").replace("chat", "")
    with Ledger(ledger) as led:
        assert sum(record_count(rec) for rec in led.history()) == r.usage.completion_tokens


def test_serve_pays_a_tuning_its_ledger_lacks_before_serving(serve_run, tmp_path, capsys):
    """privacy.tuning chosen with an experiment's in-memory ledger: `pmixed serve` charges the
    tuning to its own ledger at start-up, before any token, and says so."""
    import shutil

    from pmixed.privacy.ledger import Ledger
    from pmixed.privacy.tuning import BIND_MECHANISM
    from pmixed.serve.keys import KeyStore

    cfg, cfg_path = serve_run
    code, out, err = run(["tune", "--config", str(cfg_path), "--experiment", "-q", "--public-blocks", "2"], capsys)
    assert code == 0, err
    tune_json = tmp_path / "tune.json"
    shutil.copy(cfg.output_dir / "tune" / "tune.json", tune_json)
    tuned = tmp_path / "tuned.toml"
    tuned.write_text(cfg_path.read_text().replace("[privacy]", f"[privacy]\ntuning = \"{tune_json}\"", 1))
    keys, ledger = tmp_path / "keys.db", tmp_path / "serve.ledger"
    KeyStore(keys).create("c")
    proc, _ = start_serve(tuned, keys, ledger)
    err = stop_serve(proc)
    assert proc.returncode == 0, err
    assert "charged now, before anything is served" in err
    with Ledger(ledger) as led:
        assert [h.mechanism for h in led.history()] == [BIND_MECHANISM]  # the default tuner's charge
