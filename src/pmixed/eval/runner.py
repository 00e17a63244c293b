"""`pmixed eval` and `pmixed sweep` from a run config: load the trained ensemble and baselines,
build the held-out blocks, evaluate, write the outputs."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from pmixed.errors import DataError, EnsembleMismatch
from pmixed.eval.perplexity import Setup, make_setup, run_evaluation

SWEEPS: dict[str, list[float]] = {
    # the paper's ablation grids (REFERENCE.md section 3), N and T adapted to the config
    "epsilon": [2.0, 4.0, 6.0, 8.0, 10.0],
    "alpha": [3, 4, 5, 6],
    "sample_rate": [0.02, 0.03, 0.05, 0.1, 0.25, 0.5],
}


def machine() -> dict[str, Any]:
    import os

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def load_runtime(cfg: Any, *, progress: bool = True, checked: bool = False):
    """The trained ensemble + the baselines that exist, stacked on one base copy. ``checked``:
    the caller has just run ``check_ensemble_matches(cfg)`` (it prepares the data to hash the
    partition, which need not happen twice)."""
    from pmixed.models.device import resolve_device
    from pmixed.models.ensemble import load_ensemble
    from pmixed.models.runtime import EnsembleRuntime

    device = resolve_device(cfg.run.device)  # a configuration error first
    out = cfg.output_dir
    if not (out / "ensemble.json").is_file():
        raise EnsembleMismatch(f"no ensemble in {out.resolve()} (run.output_dir {cfg.run.output_dir!r}"
                               f"{_relative_note(cfg)}): run `pmixed train ensemble --config ...` first")
    if not checked:
        check_ensemble_matches(cfg)  # the config's [data] / [lora] / [train] / base are the ensemble's
    ens = load_ensemble(out, device=device, progress=progress)
    if cfg.eval.dtype != "model":  # after the hash checks: the inference precision ([eval] dtype)
        from pmixed.models.loading import parse_dtype

        ens.base_model.to(parse_dtype(cfg.eval.dtype))
    extras = {}
    for name in BASELINES:
        if name == "dpsgd_unit" and not cfg.dpsgd_unit.enabled:
            continue
        folder = out / name
        if (folder / "adapter_model.safetensors").is_file():
            extras[name] = folder
    runtime = EnsembleRuntime.from_ensemble(ens, extras)
    return ens, runtime


def _relative_note(cfg: Any) -> str:
    if Path(cfg.run.output_dir).expanduser().is_absolute():
        return ""
    return ", relative to the current directory"


def check_ensemble_matches(cfg: Any) -> None:
    """Refuse an ensemble that ``pmixed train ensemble`` with ``cfg`` would refuse: the same
    settings hash and the same reasons (train/ensemble.py's check), computed from the manifest
    before any weights are loaded. The config's base is compared by name, dtype and (for
    builtin:tiny-gpt2) its [public_pretrain] section; the weights themselves are checked
    against the manifest when the ensemble is loaded."""
    from types import SimpleNamespace

    from pmixed.train.common import prepare_data, read_json, settings_sha256
    from pmixed.train.ensemble import _check_compatible, _settings

    manifest = read_json(cfg.output_dir / "ensemble.json")
    entry = manifest.get("base_model", {})
    same_base = (entry.get("name") == cfg.model.base and entry.get("dtype", "float32") == cfg.model.dtype
                 and (cfg.model.base != "builtin:tiny-gpt2"
                      or entry.get("public_pretrain") == dataclasses.asdict(cfg.public_pretrain)))
    base = SimpleNamespace(
        weights_sha256=entry.get("weights_sha256") if same_base else "the config's base differs",
        tokenizer_sha256=manifest.get("tokenizer", {}).get("sha256"),
    )
    partition_sha = prepare_data(cfg).partition_sha256
    try:
        settings = _settings(cfg, base, partition_sha)
        _check_compatible(manifest, settings_sha256(settings), base, partition_sha, cfg, settings)
    except EnsembleMismatch as err:
        raise EnsembleMismatch(
            f"{err} (`pmixed train ensemble` refuses this config for the same reason; evaluating "
            f"the old ensemble would report another configuration's numbers)") from None


def eval_blocks(ens: Any, cfg: Any) -> torch.Tensor:
    """Held-out units' texts -> ``n_blocks`` blocks of ``block_size`` tokens [B, L] (seeded choice)."""
    from pmixed.data.blocks import tokenize_blocks

    records = ens.eval_records()
    if not records:
        raise DataError("the ensemble has no held-out evaluation records (data.eval_units = 0?)")
    e = cfg.eval
    blocks = tokenize_blocks([r.text for r in records], ens.tokenizer, e.block_size, drop_last=True)
    if blocks.shape[0] < e.n_blocks:
        raise DataError(
            f"held-out units give {blocks.shape[0]} blocks of {e.block_size} tokens; eval.n_blocks "
            f"= {e.n_blocks} needs more held-out data (raise data.eval_units or lower eval.n_blocks)"
        )
    g = torch.Generator().manual_seed(e.seed)
    pick = torch.randperm(blocks.shape[0], generator=g)[: e.n_blocks].sort().values
    return blocks[pick]


def config_setup(cfg: Any, name: str, *, sweep: dict | None = None, **overrides: Any) -> Setup:
    """The evaluation setup of ``cfg``'s [privacy] (``PrivacyConfig.calibration_kwargs``, the one
    mapping from the config to the mechanism), ``overrides`` by calibrate's names."""
    kw = cfg.privacy.calibration_kwargs(overrides.pop("ensemble_size", cfg.data.n_parts), **overrides)
    return make_setup(name, runs=cfg.eval.runs, sweep=sweep, **kw)


def adaptive_setup(cfg: Any, name: str, *, queries: int, sweep: dict | None = None, **overrides: Any) -> Setup:
    """The screened-PMixED setup of ``cfg``'s [privacy] (``PrivacyConfig.adaptive_kwargs``) over
    sessions of ``queries`` queries; ``overrides`` by AdaptivePMixED's names."""
    from pmixed.eval.perplexity import make_adaptive_setup

    kw = cfg.privacy.adaptive_kwargs(overrides.pop("ensemble_size", cfg.data.n_parts), **overrides)
    return make_adaptive_setup(name, runs=cfg.eval.runs, sweep=sweep, queries=queries, **kw)


def main_setups(cfg: Any, queries: int) -> list[Setup]:
    """Plain PMixED from the config; with ``privacy.mechanism = "adaptive"`` also the screened
    mechanism, on the same positions and runs (the comparison of docs/privacy.md section 11)."""
    T = min(cfg.privacy.queries, queries)
    setups = [config_setup(cfg, f"pmixed eps={cfg.privacy.epsilon:g}", query_budget=T)]
    if cfg.privacy.mechanism == "adaptive":
        setups.append(adaptive_setup(cfg, f"adaptive eps={cfg.privacy.epsilon:g}", queries=T))
    return setups


def queries_available(cfg: Any) -> int:
    """Scored positions of the evaluation: ``n_blocks`` blocks of ``block_size`` tokens."""
    return cfg.eval.n_blocks * (cfg.eval.block_size - 1)


#: the non-private diagnostics of a PMixED evaluation: functions of the private members (and of
#: the hidden draws) that no epsilon covers; kept apart from the released figures
NONPRIVATE_KEYS = ("mean_lambda", "empty_draw_fraction", "lambda_histogram", "binding_constraint")
NONPRIVATE_NOTE = ("non-private diagnostic: functions of the private members and of the hidden draws, not "
                   "covered by epsilon; for tuning on held-out data, do not publish")


def split_nonprivate(res: dict[str, Any]) -> dict[str, Any]:
    """Move each PMixED summary's lambda statistics under ``diagnostics_nonprivate``."""
    for s in res.get("pmixed", []):
        diag = {k: s.pop(k) for k in NONPRIVATE_KEYS if k in s}
        s["diagnostics_nonprivate"] = {"note": NONPRIVATE_NOTE, **diag}
    return res


# adapters evaluated next to PMixED when trained (dpsgd_unit: when [dpsgd_unit] enabled, too)
BASELINES = ("finetune", "dpsgd", "dpsgd_unit")


def _dpsgd_epsilon(cfg: Any, name: str = "dpsgd") -> float | None:
    path = cfg.output_dir / name / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text()).get("epsilon")
    return None


def _evaluate(cfg: Any, runtime: Any, blocks: torch.Tensor, setups: list[Setup], ledgers: str,
              progress: bool) -> dict[str, Any]:
    """run_evaluation with the config's [eval] settings; fresh ledgers under ledgers/<ledgers>."""
    return split_nonprivate(run_evaluation(
        runtime, blocks, setups, extras=tuple(runtime.extra_index), seed=cfg.eval.seed,
        ledger_dir=cfg.output_dir / "ledgers" / ledgers, progress=progress,
        average=cfg.eval.ensemble_average, chunk=cfg.eval.chunk_for(runtime.device.type),
    ).to_dict())


def evaluate_config(cfg: Any, *, out_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """`pmixed eval`: the table of the paper's comparison for this config."""
    from pmixed.eval.report import write_outputs
    from pmixed.models.records import baseline_mismatch

    t0 = time.perf_counter()
    ens, runtime = load_runtime(cfg, progress=progress)
    blocks = eval_blocks(ens, cfg)
    Q = blocks.shape[0] * (blocks.shape[1] - 1)
    res = _evaluate(cfg, runtime, blocks, main_setups(cfg, Q), "eval", progress)
    for s in res["pmixed"]:
        s["shape_source"] = cfg.privacy.shape_source()
    res["dpsgd_epsilon"] = _dpsgd_epsilon(cfg)
    res["baseline_epsilon"] = {name: _dpsgd_epsilon(cfg, name) for name in ("dpsgd", "dpsgd_unit")}
    res["unit_name"] = cfg.data.unit
    res["baseline_warnings"] = {name: why for name in runtime.extra_index
                                if (why := baseline_mismatch(cfg, name))}
    res["config"] = cfg.source_path
    res["machine"] = machine()
    res["compute_dtype"] = str(runtime.dtype).removeprefix("torch.")
    res["seconds"]["total"] = time.perf_counter() - t0
    out_dir = out_dir or cfg.output_dir / "eval"
    res["outputs"] = {k: str(v) for k, v in write_outputs(res, out_dir, dpsgd_epsilon=res["dpsgd_epsilon"]).items()}
    return res


SWEEP_PARAMS = ("epsilon", "members", "queries", "alpha", "sample_rate", "lam_max", "tail",
                "private_queries", "screen_threshold")
_CALIBRATE_NAME = {"members": "ensemble_size", "queries": "query_budget"}
ADAPTIVE_ONLY = ("private_queries", "screen_threshold")


def _check_sweep_value(cfg: Any, param: str, v: float) -> int | float:
    """A sweep value as the config field it stands for, validated as that field (one line
    naming the parameter and the value)."""
    from pmixed.errors import ConfigError

    where = f"sweep {param}={v:g}"
    if param in ("members", "queries", "alpha", "private_queries"):
        if not float(v).is_integer():
            raise ConfigError(where, "must be an integer")
        v = int(v)
    if param == "members":
        if not 1 <= v <= cfg.data.n_parts:
            raise ConfigError(where, f"must lie in 1..{cfg.data.n_parts} (the trained ensemble's N)")
        return v
    field = "queries" if param == "queries" else param
    try:
        dataclasses.replace(cfg.privacy, **{field: v})  # [privacy]'s own checks
    except ConfigError as err:
        raise ConfigError(where, str(err)) from None
    return v


def sweep_setups(cfg: Any, params: list[str], queries_available: int, values: dict[str, list] | None = None) -> list[Setup]:
    """The setups of the sweep, all validated and calibrated before any work: an unknown
    parameter, a value the config would refuse or a point that cannot be calibrated is a
    ConfigError naming it. Points of the default grids that do not fit this config (too few
    members drawn, an infeasible order) are skipped with a note."""
    from pmixed.errors import ConfigError

    p = cfg.privacy
    N = cfg.data.n_parts
    T = min(p.queries, queries_available)
    grids: dict[str, list] = dict(SWEEPS)
    grids["members"] = sorted({max(1, N // 4), max(1, N // 2), N})
    grids["queries"] = sorted({q for q in (128, 256, 512, 1024, 2048, 4096, 8192) if q <= queries_available} | {T})
    grids["lam_max"] = [0.25, 0.5, 0.75, 0.9]
    grids["tail"] = [1.0, 3.0, 10.0, 30.0]
    adaptive = p.mechanism == "adaptive"
    K = p.queries if p.private_queries is None else p.private_queries
    grids["private_queries"] = sorted({max(1, K // 4), max(1, K // 2), K})
    grids["screen_threshold"] = [p.screen_threshold + d for d in (-1.0, -0.5, 0.0, 0.5, 1.0)]
    given = values or {}
    setups = []
    for param in params:
        if param not in grids:
            raise ConfigError("param", f"unknown sweep parameter {param!r}; choose from {', '.join(SWEEP_PARAMS)}")
        explicit = param in given
        vals = [_check_sweep_value(cfg, param, v) for v in (given[param] if explicit else grids[param])]
        if explicit and not vals:
            raise ConfigError("values", "no values given")
        if param in ADAPTIVE_ONLY and not adaptive:
            raise ConfigError("param", f"{param} is a parameter of privacy.mechanism = \"adaptive\" (--mechanism adaptive)")
        for v in vals:
            over = {_CALIBRATE_NAME.get(param, param): v}
            if "query_budget" not in over:
                over["query_budget"] = T
            if not explicit and param == "sample_rate" and N * v < 0.5:
                continue  # under half a member drawn per query on average
            try:
                if adaptive:  # the screened point, and plain PMixED's beside it (same draws' positions)
                    if param not in ADAPTIVE_ONLY:
                        setups.append(config_setup(cfg, f"{param}={v:g}", sweep={param: v}, **over))
                    queries = over.pop("query_budget")
                    if param == "queries" and p.private_queries is None:
                        over["private_queries"] = queries  # private_queries unset: = queries
                    setups.append(adaptive_setup(cfg, f"adaptive {param}={v:g}", queries=queries,
                                                 sweep={param: v}, **over))
                    continue
                setups.append(config_setup(cfg, f"{param}={v:g}", sweep={param: v}, **over))
            except ConfigError as err:
                if explicit:
                    raise ConfigError(f"sweep {param}={v:g}", str(err)) from None
                print(f"[sweep] skipping {param}={v}: {err}")
            except ValueError as err:  # calibration: no feasible mechanism at this point
                if explicit:
                    raise ConfigError(f"sweep {param}={v:g}", f"cannot be calibrated: {err}") from None
                print(f"[sweep] skipping {param}={v}: {err}")
    if not setups:
        raise ConfigError("param", "no sweep point fits this config")
    return setups


def sweep_config(cfg: Any, params: list[str], *, values: dict[str, list] | None = None,
                 out_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """`pmixed sweep`: PMixED perplexity over epsilon, N, T, alpha, q (one pass over the members)."""
    from pmixed.eval.report import sweep_outputs

    t0 = time.perf_counter()
    setups = sweep_setups(cfg, params, queries_available(cfg), values)  # every value checked before any work
    ens, runtime = load_runtime(cfg, progress=progress)
    blocks = eval_blocks(ens, cfg)
    res = _evaluate(cfg, runtime, blocks, setups, "sweep", progress)
    res["baseline_epsilon"] = {name: _dpsgd_epsilon(cfg, name) for name in ("dpsgd", "dpsgd_unit")}
    res["config"] = cfg.source_path
    res["machine"] = machine()
    res["compute_dtype"] = str(runtime.dtype).removeprefix("torch.")
    res["note"] = ("members=N' uses the first N' members of the trained ensemble (the data of the "
                   "other parts is unused); all points share the same held-out blocks")
    res["seconds"]["total"] = time.perf_counter() - t0
    out_dir = out_dir or cfg.output_dir / "sweep"
    res["outputs"] = {k: str(v) for k, v in sweep_outputs(res, out_dir).items()}
    return res
