"""`pmixed eval` and `pmixed sweep` from a run config: load the trained ensemble and baselines,
build the held-out blocks, evaluate, write the outputs."""

from __future__ import annotations

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


def load_runtime(cfg: Any, *, progress: bool = True):
    """The trained ensemble + the baselines that exist, stacked on one base copy."""
    from pmixed.engine import EnsembleRuntime
    from pmixed.models.device import resolve_device
    from pmixed.models.ensemble import load_ensemble

    device = resolve_device(cfg.run.device)  # a configuration error first
    out = cfg.output_dir
    if not (out / "ensemble.json").is_file():
        raise EnsembleMismatch(f"no ensemble in {out}: run `pmixed train ensemble --config ...` first")
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


def main_setup(cfg: Any, queries: int) -> Setup:
    p = cfg.privacy
    return make_setup(
        f"pmixed eps={p.epsilon:g}",
        epsilon=p.epsilon,
        delta=p.delta,
        queries=min(p.queries, queries),
        ensemble_size=cfg.data.n_parts,
        sample_rate=p.sample_rate,
        alpha=p.alpha,
        lam_max=p.lam_max,
        tail=p.tail,
        runs=cfg.eval.runs,
    )


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
    return run_evaluation(
        runtime, blocks, setups, extras=tuple(runtime.extra_index), seed=cfg.eval.seed,
        ledger_dir=cfg.output_dir / "ledgers" / ledgers, progress=progress,
        average=cfg.eval.ensemble_average, chunk=cfg.eval.chunk_for(runtime.device.type),
    ).to_dict()


def evaluate_config(cfg: Any, *, out_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """`pmixed eval`: the table of the paper's comparison for this config."""
    from pmixed.eval.report import write_outputs
    from pmixed.models.records import baseline_mismatch

    t0 = time.perf_counter()
    ens, runtime = load_runtime(cfg, progress=progress)
    blocks = eval_blocks(ens, cfg)
    Q = blocks.shape[0] * (blocks.shape[1] - 1)
    setup = main_setup(cfg, Q)
    res = _evaluate(cfg, runtime, blocks, [setup], "eval", progress)
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


def sweep_setups(cfg: Any, params: list[str], queries_available: int, values: dict[str, list] | None = None) -> list[Setup]:
    p = cfg.privacy
    N = cfg.data.n_parts
    base = dict(epsilon=p.epsilon, delta=p.delta, queries=min(p.queries, queries_available),
                ensemble_size=N, sample_rate=p.sample_rate, alpha=p.alpha,
                lam_max=p.lam_max, tail=p.tail)
    grids = dict(SWEEPS)
    grids["members"] = sorted({max(1, N // 4), max(1, N // 2), N})
    grids["queries"] = sorted({q for q in (128, 256, 512, 1024, 2048, 4096, 8192) if q <= queries_available}
                              | {base["queries"]})
    grids["lam_max"] = [0.25, 0.5, 0.75, 0.9]
    grids["tail"] = [1.0, 3.0, 10.0, 30.0]
    grids.update(values or {})
    setups = []
    for param in params:
        if param not in grids:
            raise DataError(f"unknown sweep parameter {param!r}; choose from {sorted(grids)}")
        for v in grids[param]:
            kw = dict(base)
            key = {"members": "ensemble_size"}.get(param, param)
            kw[key] = int(v) if param in ("members", "queries", "alpha") else float(v)
            if param == "sample_rate" and kw["ensemble_size"] * kw["sample_rate"] < 0.5:
                continue
            try:
                setups.append(make_setup(f"{param}={v:g}", runs=cfg.eval.runs, sweep={param: v}, **kw))
            except Exception as err:  # an infeasible point (e.g. alpha too low) is reported, not fatal
                print(f"[sweep] skipping {param}={v}: {err}")
    return setups


def sweep_config(cfg: Any, params: list[str], *, values: dict[str, list] | None = None,
                 out_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """`pmixed sweep`: PMixED perplexity over epsilon, N, T, alpha, q (one pass over the members)."""
    from pmixed.eval.report import sweep_outputs

    t0 = time.perf_counter()
    ens, runtime = load_runtime(cfg, progress=progress)
    blocks = eval_blocks(ens, cfg)
    Q = blocks.shape[0] * (blocks.shape[1] - 1)
    setups = sweep_setups(cfg, params, Q, values)
    res = _evaluate(cfg, runtime, blocks, setups, "sweep", progress)
    res["config"] = cfg.source_path
    res["machine"] = machine()
    res["compute_dtype"] = str(runtime.dtype).removeprefix("torch.")
    res["note"] = ("members=N' uses the first N' members of the trained ensemble (the data of the "
                   "other parts is unused); all points share the same held-out blocks")
    res["seconds"]["total"] = time.perf_counter() - t0
    out_dir = out_dir or cfg.output_dir / "sweep"
    res["outputs"] = {k: str(v) for k, v in sweep_outputs(res, out_dir).items()}
    return res
