"""Run configuration: frozen dataclasses validated at construction, loaded from TOML at the edge.

Every section is a small frozen dataclass whose ``__post_init__`` checks its fields and raises
:class:`~pmixed.errors.ConfigError` naming the offending field (``lora.r: must be >= 1``). A TOML
table with a field the dataclass does not know is refused with the list of allowed fields, so a
typo never silently falls back to a default.

``load_config(path)`` reads a TOML file into a :class:`RunConfig`; ``config_from_dict`` does the
same from an already parsed mapping (tests, programmatic use); ``RunConfig.to_dict()`` gives the
plain-JSON form written into manifests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmixed.errors import ConfigError

__all__ = [
    "RunSection",
    "ModelConfig",
    "PublicPretrainConfig",
    "DataConfig",
    "LoraSettings",
    "TrainConfig",
    "DPSGDConfig",
    "DPSGDUnitConfig",
    "PrivacyConfig",
    "EvalConfig",
    "RunConfig",
    "load_config",
    "config_from_dict",
    "DTYPES",
]

DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------- checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


def _int(name: str, v: Any, *, lo: int | None = None, hi: int | None = None) -> None:
    if not _is_int(v):
        raise ConfigError(name, f"must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise ConfigError(name, f"must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ConfigError(name, f"must be <= {hi}, got {v}")


def _num(
    name: str,
    v: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> None:
    if not _is_num(v) or not math.isfinite(float(v)):
        raise ConfigError(name, f"must be a finite number, got {v!r}")
    if gt is not None and not v > gt:
        raise ConfigError(name, f"must be > {gt}, got {v}")
    if ge is not None and not v >= ge:
        raise ConfigError(name, f"must be >= {ge}, got {v}")
    if lt is not None and not v < lt:
        raise ConfigError(name, f"must be < {lt}, got {v}")
    if le is not None and not v <= le:
        raise ConfigError(name, f"must be <= {le}, got {v}")


def _str(name: str, v: Any, *, nonempty: bool = True) -> None:
    if not isinstance(v, str):
        raise ConfigError(name, f"must be a string, got {v!r}")
    if nonempty and not v.strip():
        raise ConfigError(name, "must not be empty")


def _bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ConfigError(name, f"must be true or false, got {v!r}")


def _choice(name: str, v: Any, choices: tuple[str, ...]) -> None:
    if v not in choices:
        raise ConfigError(name, f"must be one of {', '.join(choices)}; got {v!r}")


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class RunSection:
    """``[run]``: where artefacts go, the master seed and the device.

    ``device``: ``auto`` (a GPU when CUDA is available, under torchrun the rank's own; else the
    CPU), ``cpu``, ``cuda`` or ``cuda:<i>`` (resolved by :mod:`pmixed.models.device`). Where a run
    computes changes no setting that a saved ensemble or baseline is matched on.
    """

    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        _str("run.output_dir", self.output_dir)
        _int("run.seed", self.seed, lo=0)
        _str("run.device", self.device)
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            raise ConfigError("run.device", f"unknown device {self.device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:<i>'")


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the shared base (also the public model p_0).

    ``base`` is ``builtin:tiny-gpt2`` (a small GPT-2 trained from scratch on the public corpus,
    see ``[public_pretrain]``), ``builtin:smollm2-135m`` (the offline SmolLM2 asset), or any
    Hugging Face hub name / local folder of a causal LM.
    """

    base: str = "builtin:tiny-gpt2"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        _str("model.base", self.base)
        if self.base.startswith("builtin:") and self.base not in BUILTIN_MODELS:
            raise ConfigError(
                "model.base", f"unknown builtin {self.base!r}; known: {', '.join(BUILTIN_MODELS)}"
            )
        _choice("model.dtype", self.dtype, DTYPES)
        _choice("model.attn_implementation", self.attn_implementation, ("eager", "sdpa"))


BUILTIN_MODELS = ("builtin:tiny-gpt2", "builtin:smollm2-135m")


@dataclass(frozen=True)
class PublicPretrainConfig:
    """``[public_pretrain]``: how ``builtin:tiny-gpt2`` is built (tokenizer + from-scratch GPT-2).

    Only public data may be used here (the model is p_0, the public model). Training stops at
    ``steps`` optimiser steps or after ``epochs`` passes over the training blocks, whichever comes
    first (``epochs`` may be fractional).
    """

    corpus: str = "builtin:brown"
    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    n_positions: int = 512
    block_size: int = 128
    steps: int = 600
    epochs: float = 1.0
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    batch_size: int = 16
    heldout_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        p = "public_pretrain."
        _str(p + "corpus", self.corpus)
        _int(p + "vocab_size", self.vocab_size, lo=260)
        _int(p + "n_layer", self.n_layer, lo=1)
        _int(p + "n_head", self.n_head, lo=1)
        _int(p + "n_embd", self.n_embd, lo=1)
        if self.n_embd % self.n_head:
            raise ConfigError(
                p + "n_embd", f"must be divisible by n_head={self.n_head}, got {self.n_embd}"
            )
        _int(p + "block_size", self.block_size, lo=2)
        _int(p + "n_positions", self.n_positions, lo=self.block_size)
        _int(p + "steps", self.steps, lo=1)
        _num(p + "epochs", self.epochs, gt=0)
        _num(p + "lr", self.lr, gt=0)
        _int(p + "warmup_steps", self.warmup_steps, lo=0)
        _num(p + "weight_decay", self.weight_decay, ge=0)
        _int(p + "batch_size", self.batch_size, lo=1)
        _num(p + "heldout_fraction", self.heldout_fraction, gt=0, lt=1)
        _int(p + "seed", self.seed, lo=0)

    def fingerprint(self) -> str:
        """Short hash naming the cache folder: any change of settings builds a new model."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: the private data and how it is split into N parts by privacy unit.

    ``eval_units`` is either a fraction in [0, 1) of the units or an integer count of units held
    out (whole units) for evaluation; they never enter any part.
    """

    source: str = "builtin:sotu"
    unit: str | None = None
    text_column: str = "text"
    split: str = "train"
    n_parts: int = 8
    eval_units: float | int = 0.1
    seed: int = 0
    block_size: int = 128
    limit: int | None = None

    def __post_init__(self) -> None:
        _str("data.source", self.source)
        if self.unit is not None:
            _str("data.unit", self.unit)
        _str("data.text_column", self.text_column)
        _str("data.split", self.split)
        _int("data.n_parts", self.n_parts, lo=1)
        if _is_int(self.eval_units):
            _int("data.eval_units", self.eval_units, lo=0)
        else:
            _num("data.eval_units", self.eval_units, ge=0, lt=1)
        _int("data.seed", self.seed, lo=0)
        _int("data.block_size", self.block_size, lo=2)
        if self.limit is not None:
            _int("data.limit", self.limit, lo=1)


@dataclass(frozen=True)
class LoraSettings:
    """``[lora]``: the adapter shape shared by every member and by both baselines."""

    r: int = 4
    alpha: float = 32
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("c_attn",)

    def __post_init__(self) -> None:
        _int("lora.r", self.r, lo=1)
        _num("lora.alpha", self.alpha, gt=0)
        _num("lora.dropout", self.dropout, ge=0, lt=1)
        tm = self.target_modules
        if isinstance(tm, str) or not isinstance(tm, (tuple, list)) or not tm:
            raise ConfigError(
                "lora.target_modules", f"must be a non-empty list of names, got {tm!r}"
            )
        for m in tm:
            _str("lora.target_modules", m)
        object.__setattr__(self, "target_modules", tuple(tm))


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: non-private fine-tuning of each member (and of the ``finetune`` baseline)."""

    epochs: float = 15
    lr: float = 2e-4
    weight_decay: float = 0.01
    batch_size: int = 8
    max_steps: int | None = None
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    log_every: int = 10
    finetune_lr: float | None = None  # the fine-tune baseline's learning rate; None: ``lr``

    def __post_init__(self) -> None:
        _num("train.epochs", self.epochs, gt=0)
        _num("train.lr", self.lr, gt=0)
        _num("train.weight_decay", self.weight_decay, ge=0)
        _int("train.batch_size", self.batch_size, lo=1)
        if self.max_steps is not None:
            _int("train.max_steps", self.max_steps, lo=1)
        _int("train.warmup_steps", self.warmup_steps, lo=0)
        if self.grad_clip is not None:
            _num("train.grad_clip", self.grad_clip, gt=0)
        _int("train.log_every", self.log_every, lo=1)
        if self.finetune_lr is not None:
            _num("train.finetune_lr", self.finetune_lr, gt=0)


@dataclass(frozen=True)
class DPSGDConfig:
    """``[dpsgd]``: the DP-SGD baseline (Opacus) on all private blocks together.

    ``batch_size`` is the logical (expected Poisson) batch; ``physical_batch_size`` bounds memory.
    Opacus calibrates the noise multiplier to reach (``epsilon``, ``delta``) after ``epochs``.
    """

    epsilon: float = 8.0
    delta: float = 1e-5
    batch_size: int = 256
    physical_batch_size: int = 16
    max_grad_norm: float = 1.0
    epochs: float = 15
    lr: float = 2e-4
    weight_decay: float = 0.01
    max_steps: int | None = None
    accountant: str = "rdp"
    grad_sample_mode: str = "hooks"

    def __post_init__(self) -> None:
        _num("dpsgd.epsilon", self.epsilon, gt=0)
        _num("dpsgd.delta", self.delta, gt=0, lt=1)
        _int("dpsgd.batch_size", self.batch_size, lo=1)
        _int("dpsgd.physical_batch_size", self.physical_batch_size, lo=1)
        _num("dpsgd.max_grad_norm", self.max_grad_norm, gt=0)
        _num("dpsgd.epochs", self.epochs, gt=0)
        _num("dpsgd.lr", self.lr, gt=0)
        _num("dpsgd.weight_decay", self.weight_decay, ge=0)
        if self.max_steps is not None:
            _int("dpsgd.max_steps", self.max_steps, lo=1)
        _choice("dpsgd.accountant", self.accountant, ("rdp", "prv", "gdp"))
        _choice("dpsgd.grad_sample_mode", self.grad_sample_mode, ("hooks", "functorch"))


@dataclass(frozen=True)
class DPSGDUnitConfig:
    """``[dpsgd_unit]``: DP-SGD at the privacy unit (user-level DP-SGD, McMahan et al. 2018).

    Off unless ``enabled``. Each step Poisson-samples *units* (a speech, a sender: the
    ``[data] unit``) at rate ``units_per_step / n_units``; each drawn unit contributes one
    gradient (its mean loss over up to ``blocks_per_unit`` of its blocks) clipped to
    ``max_grad_norm``; Gaussian noise; Opacus' accountant. The same unit as PMixED's parts.
    """

    enabled: bool = False
    epsilon: float = 8.0
    delta: float = 1e-5
    units_per_step: float = 8.0  # expected number of units drawn per step
    blocks_per_unit: int = 4
    max_grad_norm: float = 1.0
    steps: int = 10
    lr: float = 2e-3
    weight_decay: float = 0.0
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        _bool("dpsgd_unit.enabled", self.enabled)
        _num("dpsgd_unit.epsilon", self.epsilon, gt=0)
        _num("dpsgd_unit.delta", self.delta, gt=0, lt=1)
        _num("dpsgd_unit.units_per_step", self.units_per_step, gt=0)
        _int("dpsgd_unit.blocks_per_unit", self.blocks_per_unit, lo=1)
        _num("dpsgd_unit.max_grad_norm", self.max_grad_norm, gt=0)
        _int("dpsgd_unit.steps", self.steps, lo=1)
        _num("dpsgd_unit.lr", self.lr, gt=0)
        _num("dpsgd_unit.weight_decay", self.weight_decay, ge=0)
        _choice("dpsgd_unit.accountant", self.accountant, ("rdp", "prv", "gdp"))


@dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]``: the prediction-time budget of PMixED.

    ``queries`` is T, the number of next-token predictions the budget must cover; ``sample_rate``
    is q, the Poisson rate at which each member is drawn per query; ``alpha`` is the Renyi order
    (integer >= 2) or ``None`` to let the planner choose.
    """

    epsilon: float = 8.0
    delta: float = 1e-5
    queries: int = 1024
    sample_rate: float = 0.03
    alpha: int | None = None
    lam_max: float | None = None  # cap on each member's mixing weight; None: the library default
    tail: float | None = None  # radius shape (docs/privacy.md eq. K1); None: the library default
    # screened PMixED (docs/privacy.md section 11): mechanism = "adaptive" answers a query from the
    # public model alone unless the screen's score (public entropy in nats + screen_weight x the
    # test members' mean divergence score, noised) reaches screen_threshold; private_queries is
    # the number of private answers (screen rounds) the budget is calibrated for (default:
    # queries), spent through a Renyi filter at order alpha (chosen from the config when unset)
    mechanism: str = "pmixed"
    private_queries: int | None = None
    screen_threshold: float = 0.0
    screen_weight: float = 0.0
    screen_epsilon: float = 0.0
    screen_rate: float = 1.0
    # an accounted tuning's result (`pmixed tune` writes <output_dir>/tune/tune.json): the shape
    # (lam_max, tail, alpha) and the tuning's RDP curve, which the calibration composes with the
    # T queries (docs/privacy.md section 12); the shape fields must then be left unset
    tuning: str | None = None

    def __post_init__(self) -> None:
        if self.tuning is not None:
            if not isinstance(self.tuning, str) or not self.tuning:
                raise ConfigError("privacy.tuning", f"must be the path of a tune.json, got {self.tuning!r}")
            given = [f for f in ("lam_max", "tail", "alpha") if getattr(self, f) is not None]
            if given:
                raise ConfigError("privacy.tuning", f"sets the shape; leave {', '.join(given)} unset")
            if self.mechanism != "pmixed":
                raise ConfigError("privacy.tuning", "tunes plain PMixED's shape; privacy.mechanism must be \"pmixed\"")
        if self.mechanism not in MECHANISMS:
            raise ConfigError("privacy.mechanism", f"must be one of {', '.join(MECHANISMS)}, got {self.mechanism!r}")
        if self.private_queries is not None:
            _int("privacy.private_queries", self.private_queries, lo=1)
        _num("privacy.screen_threshold", self.screen_threshold)
        _num("privacy.screen_weight", self.screen_weight, ge=0)
        _num("privacy.screen_epsilon", self.screen_epsilon, ge=0)
        _num("privacy.screen_rate", self.screen_rate, gt=0, le=1)
        if self.screen_weight > 0 and not self.screen_epsilon > 0:
            raise ConfigError("privacy.screen_epsilon", "must be > 0 when screen_weight > 0 (a private score needs noise)")
        if self.lam_max is not None:
            _num("privacy.lam_max", self.lam_max, gt=0, le=1)
        if self.tail is not None:
            _num("privacy.tail", self.tail, ge=1)
        _num("privacy.epsilon", self.epsilon, gt=0)
        _num("privacy.delta", self.delta, gt=0, lt=1)
        _int("privacy.queries", self.queries, lo=1)
        _num("privacy.sample_rate", self.sample_rate, gt=0, le=1)
        if self.alpha is not None:
            _int("privacy.alpha", self.alpha, lo=2)

    def calibration_kwargs(self, ensemble_size: int, **overrides: Any) -> dict[str, Any]:
        """The one mapping from ``[privacy]`` to ``pmixed.privacy.calibration.calibrate``'s
        keywords (unset lam_max / tail: the library defaults). ``overrides`` replace fields by
        their calibrate name (a sweep point: ``epsilon=4``, ``query_budget=256``, ...); an
        override of None means "unset" exactly as in the config."""
        from pmixed.privacy.calibration import DEFAULT_LAM_MAX, DEFAULT_TAIL

        kw: dict[str, Any] = {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "query_budget": self.queries,
            "ensemble_size": ensemble_size,
            "sample_rate": self.sample_rate,
            "alpha": self.alpha,
            "lam_max": self.lam_max,
            "tail": self.tail,
        }
        if self.tuning is not None:
            kw.update(self.tuned())
        kw = _with_overrides(kw, overrides, "calibration")
        if kw["lam_max"] is None:
            kw["lam_max"] = DEFAULT_LAM_MAX
        if kw["tail"] is None:
            kw["tail"] = DEFAULT_TAIL
        return kw

    def tuned(self) -> dict[str, Any]:
        """What ``privacy.tuning``'s file fixes: lam_max, tail, alpha and ``spent`` (order -> the
        tuning's RDP, composed with the T queries by the calibration). ConfigError when the file is
        missing or not a tune.json."""
        rec = self.tuning_record()
        try:
            spent = dict(zip((float(a) for a in rec["spent"]["orders"]),
                             (math.inf if r == "inf" else float(r) for r in rec["spent"]["rdp"]), strict=True))
            return {"lam_max": float(rec["lam_max"]), "tail": float(rec["tail"]), "alpha": int(rec["alpha"]),
                    "spent": spent}
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError("privacy.tuning", f"{self.tuning} is not a tune.json written by `pmixed tune`: {err!r}") from None

    def tuning_record(self) -> dict[str, Any]:
        """The whole tune.json ``privacy.tuning`` names ("tuning": the tuner's parameters, which the
        serving ledger must carry; "seeded": chosen with a seed, so not a private release)."""
        path = Path(self.tuning)
        try:
            rec = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError("privacy.tuning", f"no such file: {path} (run `pmixed tune` first)") from None
        except (OSError, ValueError) as err:
            raise ConfigError("privacy.tuning", f"{path} is not a tune.json written by `pmixed tune`: {err!r}") from None
        if not isinstance(rec, dict):
            raise ConfigError("privacy.tuning", f"{path} is not a tune.json written by `pmixed tune`")
        return rec

    def shape_source(self) -> str:
        """How the radius shape (lam_max, tail, alpha) was chosen, for tables: "accounted tuning"
        (``privacy.tuning``: `pmixed tune`, its cost charged), "default rule" (all three unset: the
        data-independent rule of privacy/calibration.py), "config" (all set by the user: say how
        they chose them), or which ones each."""
        if self.tuning is not None:
            return "accounted tuning"
        unset = [f for f in ("lam_max", "tail", "alpha") if getattr(self, f) is None]
        if len(unset) == 3:
            return "default rule"
        if not unset:
            return "config"
        return f"config, {'/'.join(unset)} by the default rule"

    def adaptive_kwargs(self, ensemble_size: int, **overrides: Any) -> dict[str, Any]:
        """The one mapping from ``[privacy]`` to ``pmixed.AdaptivePMixED``'s keywords
        (screened PMixED); ``overrides`` by those names (``private_queries=256``, ...)."""
        kw = self.calibration_kwargs(ensemble_size)
        kw.pop("query_budget")
        kw.update({
            "private_queries": self.queries if self.private_queries is None else self.private_queries,
            "screen_threshold": self.screen_threshold,
            "screen_weight": self.screen_weight,
            "screen_epsilon": self.screen_epsilon,
            "screen_rate": self.screen_rate,
        })
        return _with_overrides(kw, overrides, "adaptive")


def _with_overrides(kw: dict[str, Any], overrides: dict[str, Any], what: str) -> dict[str, Any]:
    """``kw`` updated with ``overrides``, each of which must name one of its keys."""
    unknown = set(overrides) - set(kw)
    if unknown:
        raise TypeError(f"unknown {what} keyword(s): {sorted(unknown)}")
    return {**kw, **overrides}


#: ``privacy.mechanism``: plain PMixED, or screened PMixED through a Renyi filter (section 11)
MECHANISMS = ("pmixed", "adaptive")


@dataclass(frozen=True)
class EvalConfig:
    """``[eval]``: teacher-forced evaluation on held-out units.

    ``runs`` repetitions (different mechanism seeds), each over ``n_blocks`` blocks of
    ``block_size`` tokens (each position is one query: ``n_blocks * block_size`` should match
    ``privacy.queries`` for the paper's protocol).

    ``ensemble_average = false`` drops the non-private ensemble-average row: the members then run
    only where some run draws them (``EnsembleRuntime.block_stats(average=False)``), which is
    faster when q * runs is small (e.g. the paper's q = 0.03).

    ``member_chunk``: members per batched forward (0: automatic, 1 on the CPU, where batching
    does not pay, and 16 on a GPU). Only speed and memory depend on it, not a number.

    ``dtype``: the precision of the inference forwards of ``pmixed eval``, ``sweep``, ``generate``
    and the demo: ``model`` (what the ensemble was trained in) or one of ``float32``,
    ``bfloat16``, ``float16``. The base and the stacked adapters are cast after their hashes are
    checked; probabilities are still taken in float32 and the mechanism runs in float64, so the
    guarantee is unchanged (the ball is enforced on whatever member distribution is computed).
    """

    runs: int = 32
    n_blocks: int = 2
    block_size: int = 512
    seed: int = 0
    ensemble_average: bool = True
    member_chunk: int = 0
    dtype: str = "model"

    def __post_init__(self) -> None:
        _bool("eval.ensemble_average", self.ensemble_average)
        _int("eval.runs", self.runs, lo=1)
        _int("eval.n_blocks", self.n_blocks, lo=1)
        _int("eval.block_size", self.block_size, lo=2)
        _int("eval.seed", self.seed, lo=0)
        _int("eval.member_chunk", self.member_chunk, lo=0)
        _choice("eval.dtype", self.dtype, ("model", *DTYPES))

    def chunk_for(self, device_type: str) -> int:
        """Members per batched forward on a device of this type (``cpu``, ``cuda``)."""
        return self.member_chunk or (1 if device_type == "cpu" else 16)


# ----------------------------------------------------------------------------- the whole run


_SECTIONS: dict[str, type] = {
    "run": RunSection,
    "model": ModelConfig,
    "public_pretrain": PublicPretrainConfig,
    "data": DataConfig,
    "lora": LoraSettings,
    "train": TrainConfig,
    "dpsgd": DPSGDConfig,
    "dpsgd_unit": DPSGDUnitConfig,
    "privacy": PrivacyConfig,
    "eval": EvalConfig,
}


@dataclass(frozen=True)
class RunConfig:
    """A whole run: one frozen dataclass per TOML table."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    public_pretrain: PublicPretrainConfig = field(default_factory=PublicPretrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpsgd: DPSGDConfig = field(default_factory=DPSGDConfig)
    dpsgd_unit: DPSGDUnitConfig = field(default_factory=DPSGDUnitConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source_path: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(name, f"must be a {cls.__name__}")
        if self.data.block_size > self._max_positions_hint():
            raise ConfigError(
                "data.block_size",
                f"must be <= public_pretrain.n_positions={self.public_pretrain.n_positions} "
                "for builtin:tiny-gpt2",
            )

    def _max_positions_hint(self) -> int:
        if self.model.base == "builtin:tiny-gpt2":
            return self.public_pretrain.n_positions
        return 1 << 30

    @property
    def output_dir(self) -> Path:
        return Path(os.path.expanduser(self.run.output_dir))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (tuples become lists)."""
        out = {}
        for name in _SECTIONS:
            d = dataclasses.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return out

    def replace(self, **sections: Any) -> RunConfig:
        """Return a copy with whole sections or ``section__field=value`` entries replaced."""
        new = {name: getattr(self, name) for name in _SECTIONS}
        for key, value in sections.items():
            if "__" in key:
                sec, fld = key.split("__", 1)
                if sec not in _SECTIONS:
                    raise ConfigError(sec, f"unknown section; allowed: {', '.join(_SECTIONS)}")
                new[sec] = _build_section(sec, {**_section_dict(new[sec]), fld: value})
            else:
                if key not in _SECTIONS:
                    raise ConfigError(key, f"unknown section; allowed: {', '.join(_SECTIONS)}")
                new[key] = value
        return RunConfig(**new, source_path=self.source_path)


def _section_dict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _build_section(name: str, table: Any) -> Any:
    cls = _SECTIONS[name]
    if not isinstance(table, Mapping):
        raise ConfigError(name, f"must be a table, got {type(table).__name__}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"{name}.{key}", f"unknown field; allowed fields: {', '.join(allowed)}"
            )
    kwargs = dict(table)
    if name == "lora" and "target_modules" in kwargs and isinstance(kwargs["target_modules"], list):
        kwargs["target_modules"] = tuple(kwargs["target_modules"])
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any], *, source_path: str | None = None) -> RunConfig:
    """Build a :class:`RunConfig` from a parsed mapping; unknown tables or fields are refused."""
    if not isinstance(data, Mapping):
        raise ConfigError("<root>", "must be a table")
    for key in data:
        if key not in _SECTIONS:
            raise ConfigError(key, f"unknown table; allowed tables: {', '.join(_SECTIONS)}")
    sections = {name: _build_section(name, data[name]) for name in _SECTIONS if name in data}
    return RunConfig(**sections, source_path=source_path)


def load_run_config(path: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None = None) -> RunConfig:
    """:func:`load_config`, with ``run.output_dir`` overridden when ``output_dir`` is given (CLI -o)."""
    cfg = load_config(path)
    return cfg if output_dir is None else cfg.replace(run__output_dir=str(output_dir))


def load_config(path: str | os.PathLike[str]) -> RunConfig:
    """Read a TOML file into a validated :class:`RunConfig`.

    A relative ``run.output_dir`` stays relative to the current directory (as the CLI user
    expects when running ``pmixed train ... --config configs/quick.toml`` from the project root).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", f"file not found: {p}")
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("config", f"{p} is not valid TOML: {err}") from err
    return config_from_dict(data, source_path=str(p))
