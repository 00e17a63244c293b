"""Teacher-forced perplexity of the public model, the baselines and PMixED (the paper's protocol).

Protocol (REFERENCE.md section 3): T queries per run, each scored position one query; a fresh
budget (a fresh ledger) per run; several runs with fresh randomness; mean and spread.

One pass over the members serves every run and every mechanism setting (a sweep): per block the
engine keeps only the moments and target probabilities of the drawn (position, member) pairs
(mechanism/teacher_forcing.py); each run is then charged to its own ledger and only after the
charge is committed are its released probabilities computed.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pmixed.errors import DataError
from pmixed.eval.block_stats import block_stats
from pmixed.mechanism.teacher_forcing import binding_order, released_target_probs
from pmixed.privacy.acceptance import RenyiFilterRule
from pmixed.privacy.accountant import RdpCharge
from pmixed.privacy.calibration import DEFAULT_LAM_MAX, DEFAULT_TAIL, calibrate
from pmixed.privacy.ledger import Ledger
from pmixed.privacy.mixture_bound import pmixed_charge
from pmixed.privacy.params import MechanismParams
from pmixed.privacy.screening import AdaptiveParams, ScreenParams, calibrate_adaptive
from pmixed.privacy.tuning import SPENT_MECHANISM


@dataclass(frozen=True)
class Setup:
    """One PMixED configuration to evaluate (a point of a sweep)."""

    name: str
    params: MechanismParams
    epsilon: float
    delta: float
    queries: int
    alpha: int
    runs: int
    tail: float = 1.0
    sweep: dict = field(default_factory=dict, compare=False)  # {param: value} for sweeps
    adaptive: AdaptiveParams | None = None  # screened PMixED (section 11); params = its release
    spent: dict | None = field(default=None, compare=False)  # order -> RDP of an accounted tuning (section 12)

    @property
    def mechanism(self) -> str:
        return "pmixed" if self.adaptive is None else "adaptive"

    @property
    def members(self) -> int:
        return self.params.ensemble_size

    @property
    def sample_rate(self) -> float:
        return self.params.sample_rate


def make_setup(name: str, *, runs: int = 1, sweep: dict | None = None, **calibration: Any) -> Setup:
    """One evaluation setup: ``calibration`` holds ``calibrate``'s keywords (as
    ``PrivacyConfig.calibration_kwargs`` gives them; unset lam_max / tail: the library defaults)."""
    kw = {"alpha": None, "lam_max": DEFAULT_LAM_MAX, "tail": DEFAULT_TAIL,
          **{k: v for k, v in calibration.items() if v is not None or k == "alpha"}}
    cal = calibrate(**kw)
    return Setup(name, cal.params, kw["epsilon"], kw["delta"], kw["query_budget"], cal.alpha, runs,
                 kw["tail"], dict(sweep or {}), spent=kw.get("spent"))


def make_adaptive_setup(name: str, *, runs: int = 1, sweep: dict | None = None, queries: int,
                        **adaptive: Any) -> Setup:
    """One screened-PMixED setup over sessions of ``queries`` queries each; ``adaptive`` holds
    ``AdaptivePMixED``'s keywords (``PrivacyConfig.adaptive_kwargs``)."""
    kw = {"alpha": None, "lam_max": DEFAULT_LAM_MAX, "tail": DEFAULT_TAIL,
          **{k: v for k, v in adaptive.items() if v is not None or k == "alpha"}}
    screen = ScreenParams(kw["ensemble_size"], kw.pop("screen_threshold", 0.0), kw.pop("screen_weight", 0.0),
                          kw.pop("screen_epsilon", 0.0), kw.pop("screen_rate", 1.0))
    cal = calibrate_adaptive(screen=screen, **kw)
    return Setup(name, cal.params.release, kw["epsilon"], kw["delta"], queries, cal.order, runs,
                 kw["tail"], dict(sweep or {}), cal.params)


def _seed(*parts: Any) -> int:
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _draws(setup: Setup, run: int, B: int, T: int, n_total: int, seed: int, scored: int) -> torch.Tensor:
    """The run's Poisson draws over the first ``scored`` positions: bool [B, T, n_total]."""
    g = torch.Generator().manual_seed(_seed(seed, setup.name, run))
    flat = torch.zeros(B * T, n_total, dtype=torch.bool)
    u = torch.rand(scored, setup.members, generator=g, dtype=torch.float64)
    flat[:scored, : setup.members] = u < setup.sample_rate
    return flat.reshape(B, T, n_total)


def _fresh_ledger(ledger_dir: Path | None, name: str, s: Setup) -> Ledger:
    rule = RenyiFilterRule(s.adaptive.order) if s.adaptive is not None else None
    if s.spent is not None and rule is None:  # a tuned shape: its cost depended on the tuning's output
        rule = RenyiFilterRule(s.alpha)
    if ledger_dir is None:
        return Ledger(":memory:", epsilon=s.epsilon, delta=s.delta, rule=rule)
    path = ledger_dir / f"{name}.ledger"
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return Ledger(path, epsilon=s.epsilon, delta=s.delta, rule=rule)


def _ppl(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count) if count else float("nan")


@dataclass
class EvalResult:
    positions: int
    models: dict[str, dict[str, Any]]
    pmixed: list[dict[str, Any]]
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "positions": self.positions,
            "models": self.models,
            "pmixed": self.pmixed,
            "seconds": self.seconds,
        }


def run_evaluation(
    runtime: Any,
    blocks: torch.Tensor,
    setups: list[Setup],
    *,
    extras: tuple[str, ...] = (),
    seed: int = 0,
    ledger_dir: str | Path | None = None,
    progress: bool = True,
    chunk: int = 1,
    average: bool = True,
) -> EvalResult:
    """Score ``blocks`` [B, L] with the public model, the extra adapters, the non-private
    ensemble average (unless ``average=False``: then only the drawn member pairs are computed)
    and every PMixED setup (``runs`` runs each, fresh ledger per run)."""
    from tqdm.auto import tqdm

    B, L = blocks.shape
    T = L - 1
    Q = B * T
    N = runtime.n_members
    for s in setups:
        if s.members > N:
            raise DataError(f"setup {s.name!r} needs {s.members} members; the ensemble has {N}")
    # every setup is scored on the same positions: the largest budget T, or all Q positions when a
    # budget exceeds them (then the session's first Q queries, each at the T-query calibration: its
    # per-query utility estimated on Q positions; what the ledger is charged is the Q released)
    scored = min(Q, max([s.queries for s in setups], default=Q))
    masks = {(s.name, r): _draws(s, r, B, T, N, seed, scored) for s in setups for r in range(s.runs)}
    needed = torch.zeros(B, T, N, dtype=torch.bool)
    for m in masks.values():
        needed |= m
    if any(s.adaptive is not None and s.adaptive.screen.private for s in setups):
        needed[:] = True  # a private screen reads its round's test members, decided on the way
    k_max = max([s.params.max_order for s in setups], default=2)

    t0 = time.perf_counter()
    stats = []
    # per-position log-probabilities of the baselines [B, T]: every PPL is taken over the same
    # positions as the PMixED queries it is compared with
    logp: dict[str, list[torch.Tensor]] = {"public": [], **({"ensemble_avg": []} if average else {}),
                                           **{e: [] for e in extras}}
    for b in tqdm(range(B), desc="forward (public + members)", disable=not progress):
        st, extra_t, ens_t = block_stats(
            runtime,
            blocks[b], max_order=k_max, needed=needed[b], extras=extras, chunk=chunk, average=average
        )
        stats.append(st)
        logp["public"].append(torch.log(st.public_target))
        if average:
            logp["ensemble_avg"].append(torch.log(ens_t))
        for e, p in extra_t.items():
            logp[e].append(torch.log(p))
    t_forward = time.perf_counter() - t0

    flat = {name: torch.cat(v)[:scored] for name, v in logp.items()}
    models = {name: {"ppl": _ppl(-float(v.sum()), scored), "positions": scored} for name, v in flat.items()}
    t1 = time.perf_counter()
    out = []
    ledger_dir = Path(ledger_dir) if ledger_dir is not None else None
    if ledger_dir is not None:
        ledger_dir.mkdir(parents=True, exist_ok=True)
    for s in tqdm(setups, desc="PMixED runs", disable=not progress or len(setups) < 2):
        if s.adaptive is not None:
            out.append(_score_adaptive(s, stats, masks, B, T, scored, seed, ledger_dir))
            continue
        ppls, lam_means, empty, binding = [], [], [], {}
        lam_hist = torch.zeros(20, dtype=torch.long)  # lambda of every drawn pair, 20 bins on [0, 1]
        spent = []
        # every setup is scored on the same `scored` positions; a setup whose budget T is smaller
        # covers them in consecutive windows of T queries, each window a fresh budget (a session)
        windows = math.ceil(scored / s.queries)
        for r in range(s.runs):
            for w in range(windows):
                count = min(s.queries, scored - w * s.queries)
                # a fresh budget per run (the paper's protocol): a new ledger, charged before release
                name = f"{_safe(s.name)}-run{r:03d}" + (f"-w{w:03d}" if windows > 1 else "")
                with _fresh_ledger(ledger_dir, name, s) as ledger:
                    if s.spent is not None:  # the tuning was paid from this budget first
                        ledger.charge(RdpCharge(ledger.orders, tuple(s.spent.get(a, math.inf) for a in ledger.orders),
                                                label="accounted tuning", mechanism=SPENT_MECHANISM))
                    charge = pmixed_charge(s.params, count=count, orders=ledger.orders, label=s.name)
                    receipt = ledger.charge(charge)  # BudgetExhausted propagates: nothing released
                    spent.append(receipt.epsilon_spent)
            total, lam_sum, lam_n, n_empty = 0.0, 0.0, 0, 0
            for b in range(B):
                n_b = min(T, max(0, scored - b * T))  # scored positions in this block
                if n_b == 0:
                    break
                mask = masks[(s.name, r)][b, :n_b, : s.members]  # [n_b, n]
                probs, lam = released_target_probs(stats[b], masks[(s.name, r)][b, :, : s.members], s.params)
                total -= float(torch.log(probs[:n_b]).sum())
                drawn = ~torch.isnan(lam[:n_b])
                lam_sum += float(lam[:n_b][drawn].sum())
                lam_hist += torch.histc(lam[:n_b][drawn].float(), bins=20, min=0.0, max=1.0).long()
                lam_n += int(drawn.sum())
                n_empty += int((~mask.any(dim=1)).sum())
                for k, c in zip(*torch.unique(binding_order(stats[b], mask, s.params), return_counts=True)):
                    binding[int(k)] = binding.get(int(k), 0) + int(c)
            ppls.append(_ppl(total, scored))
            lam_means.append(lam_sum / lam_n if lam_n else float("nan"))
            empty.append(n_empty / scored)
        mean = sum(ppls) / len(ppls)
        std = math.sqrt(sum((p - mean) ** 2 for p in ppls) / (len(ppls) - 1)) if len(ppls) > 1 else 0.0
        out.append({
            "name": s.name,
            "sweep": s.sweep,
            "epsilon": s.epsilon,
            "delta": s.delta,
            "queries": s.queries,
            "members": s.members,
            "sample_rate": s.sample_rate,
            "alpha": s.alpha,
            "max_order": s.params.max_order,
            "lam_max": s.params.lam_max,
            "tail": s.tail,
            "radii": list(s.params.radii),
            "runs": s.runs,
            "ppl_mean": mean,
            "ppl_std": std,
            "ppl_runs": ppls,
            "positions": scored,
            "sessions_per_run": windows,
            "epsilon_spent": max(spent),
            "mean_lambda": sum(lam_means) / len(lam_means),
            "empty_draw_fraction": sum(empty) / len(empty),
            "lambda_histogram": lam_hist.tolist(),
            "binding_constraint": {("lam_max" if k == 1 else f"order {k}"): v for k, v in sorted(binding.items())},
        })
    t_mech = time.perf_counter() - t1
    return EvalResult(Q, models, out, {"forward": t_forward, "mechanism_and_ledger": t_mech})


def _score_adaptive(s: Setup, stats: list, masks: dict, B: int, T: int, scored: int, seed: int,
                    ledger_dir: Path | None) -> dict[str, Any]:
    """Screened PMixED over the scored positions, in order, in sessions of ``s.queries`` queries
    (a fresh budget under the Renyi filter each). Per position: open a round if none is open (one
    unit charged first; refused: this session's remaining queries get p_0 alone), run the screen
    (public entropy + the round's test members' scores), and at a private position the PMixED
    release with the run's independent Poisson draw (``masks``)."""
    from pmixed.errors import BudgetExhausted
    from pmixed.mechanism.screen import Screen, member_score

    p = s.adaptive
    n = s.members
    windows = math.ceil(scored / s.queries)
    ppls, spent, privates, units, answered = [], [], [], [], []
    for r in range(s.runs):
        g = torch.Generator().manual_seed(_seed(seed, s.name, r, "screen"))
        use = torch.zeros(B, T, n, dtype=torch.bool)  # the release draws actually used
        n_private = n_units = 0
        first_refused = []
        for w in range(windows):
            name = f"{_safe(s.name)}-run{r:03d}" + (f"-w{w:03d}" if windows > 1 else "")
            screen = Screen(p.screen, g)
            refused = None
            with _fresh_ledger(ledger_dir, name, s) as ledger:
                charge = None
                for i in range(w * s.queries, min(scored, (w + 1) * s.queries)):
                    b, t = divmod(i, T)
                    if not screen.is_open:
                        charge = charge or _unit_charge(p, ledger.orders, s.name)
                        try:
                            ledger.charge(charge)  # charged before anything of the round is used
                        except BudgetExhausted:
                            refused = i - w * s.queries
                            break
                        n_units += 1
                        screen.open_round()
                    st = stats[b]
                    scores = None
                    if p.screen.private:
                        scores = member_score(st.moments[t, screen.test_members, 0])
                    if screen.decide(float(st.public_entropy[t]), scores):
                        use[b, t] = masks[(s.name, r)][b, t, :n]
                        n_private += 1
                spent.append(ledger.epsilon_spent())
            first_refused.append(refused if refused is not None else min(s.queries, scored - w * s.queries))
        total = 0.0
        for b in range(B):
            n_b = min(T, max(0, scored - b * T))
            if n_b == 0:
                break
            probs, _ = released_target_probs(stats[b], use[b], p.release)
            total -= float(torch.log(probs[:n_b]).sum())
        ppls.append(_ppl(total, scored))
        privates.append(n_private / scored)
        units.append(n_units / windows)
        answered.append(sum(first_refused) / windows)
    mean = sum(ppls) / len(ppls)
    std = math.sqrt(sum((x - mean) ** 2 for x in ppls) / (len(ppls) - 1)) if len(ppls) > 1 else 0.0
    return {
        "name": s.name, "mechanism": "adaptive", "sweep": s.sweep, "epsilon": s.epsilon, "delta": s.delta,
        "queries": s.queries, "members": s.members, "sample_rate": s.sample_rate, "alpha": s.alpha,
        "filter_order": p.order, "max_order": s.params.max_order, "lam_max": s.params.lam_max, "tail": s.tail,
        "radii": list(s.params.radii), "private_queries": p.private_queries, "screen": p.screen.record(),
        "unit_rdp": p.unit_rdp(p.order), "runs": s.runs, "ppl_mean": mean, "ppl_std": std, "ppl_runs": ppls,
        "positions": scored, "sessions_per_run": windows, "epsilon_spent": max(spent),
        # released: the screen's bits are covered by the guarantee (section 11), so these are too
        "private_fraction": sum(privates) / len(privates),
        "units_per_session": sum(units) / len(units),
        "queries_before_stop": sum(answered) / len(answered),
    }


def _unit_charge(p: AdaptiveParams, orders, label: str):
    from pmixed.privacy.screening import adaptive_charge

    return adaptive_charge(p, 1, orders, label)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in name)
