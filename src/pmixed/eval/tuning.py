"""`pmixed tune`: the accounted choice of a PMixED shape on the held-out units (docs/privacy.md,
section 12; the math is privacy/tuning.py, eqs. (H1)-(H3)).

The tuning set is the config's held-out units (in no part): per unit, its first block of
``eval.block_size`` tokens, of which only the last ``per_unit`` scored positions are queried (the
tokens before them are their context, from the same unit). One teacher-forced pass of the
members over those blocks gives every candidate's released probability of the true next token
for any draw; a trial then draws its candidate, the Poisson draws and the hit of each position
(the sampled token equals the target with exactly the released probability of the target: the
same law as sampling the token and comparing), adds Laplace noise of scale per_unit / eps_s to
the hit count and keeps the best. The whole tuning is charged to the ledger before the first
trial; only the chosen shape and its noisy count are returned (the number of trials and the
other trials' counts would void eq. (H3)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pmixed.errors import ConfigError, DataError
from pmixed.mechanism.screen import laplace
from pmixed.mechanism.subsample import poisson_mask, uniforms
from pmixed.mechanism.teacher_forcing import released_target_probs
from pmixed.privacy.accountant import DEFAULT_ORDERS, check_orders
from pmixed.privacy.calibration import calibrate
from pmixed.privacy.tuning import TuneParams, expected_trials, sample_trials, tuning_charge

#: The default candidates: every (tail, lam_max) of the default-rule study's grid.
TAILS = (1.0, 3.0, 10.0, 30.0)
LAM_MAX = (0.25, 0.5, 0.75, 0.9)
#: The common orders K tried for the candidates when the config leaves alpha unset.
ALPHAS = (3, 4, 6, 8, 12, 16)


@dataclass(frozen=True)
class Candidate:
    label: str
    lam_max: float
    tail: float
    calibration: Any  # privacy.calibration.Calibration for the deployment's (epsilon, delta, T)


@dataclass(frozen=True)
class TuneResult:
    """What `pmixed tune` releases: the chosen candidate, the noisy statistic the choice is a
    function of, and the tuning's charge. ``statistic`` names it: "noisy_hit_rate" for trials (the
    best trial's noisy hit count over the public nominal count U m of tuning queries, eq. (H1)),
    "noisy_cap_share" for the cap statistic (the Laplace release of eq. (H4))."""

    chosen: Candidate
    released: float
    params: Any  # privacy.tuning.TuneParams (trials) or BindParams (cap statistic)
    epsilon_spent: float  # the ledger's epsilon after the tuning's charge
    statistic: str = "noisy_hit_rate"

    def record(self) -> dict[str, Any]:
        return {"lam_max": self.chosen.lam_max, "tail": self.chosen.tail, "label": self.chosen.label,
                "alpha": self.chosen.calibration.params.max_order, self.statistic: self.released,
                "tuning": self.params.record(), "epsilon_spent": self.epsilon_spent}


def candidates(cfg: Any, tails: Sequence[float] = TAILS, lam_maxes: Sequence[float] = LAM_MAX,
               alpha: int | None = None) -> list[Candidate]:
    """Every (tail, lam_max) calibrated for the config's target (its q; the order ``alpha``, else
    the config's, else each candidate's best); a point that cannot be calibrated is a ConfigError
    naming it."""
    out = []
    for t in tails:
        for lm in lam_maxes:
            over = {"lam_max": lm, "tail": t, **({} if alpha is None else {"alpha": alpha})}
            kw = cfg.privacy.calibration_kwargs(cfg.data.n_parts, **over)
            try:
                cal = calibrate(**kw)
            except ConfigError as err:
                raise ConfigError(f"tune candidate tail={t:g} lam_max={lm:g}", str(err)) from None
            out.append(Candidate(f"tail={t:g} lam_max={lm:g}", float(lm), float(t), cal))
    if not out:
        raise ConfigError("candidates", "at least one tail and one lam_max are needed")
    return out


def plan(cfg: Any, units: int, per_unit: int, score_epsilon: float, eta: float, gamma: float,
         tails: Sequence[float] = TAILS, lam_maxes: Sequence[float] = LAM_MAX,
         orders: Sequence[float] = DEFAULT_ORDERS) -> tuple[list[Candidate], TuneParams]:
    """The candidates at one common order K (every candidate's curve (R3) is finite up to its own
    K only, and (H2) takes the worst candidate: a common K keeps the tuning's curve finite there)
    and the tuner's parameters. K is the config's alpha, else the one of ALPHAS that leaves the
    serving calibration the largest mean scale after the tuning's charge: a function of the
    config alone (public), never of data. ConfigError when no order pays for the tuning and the
    config's T queries."""
    from pmixed.privacy.calibration import scale_of

    alphas = [cfg.privacy.alpha] if cfg.privacy.alpha is not None else list(ALPHAS)
    best = None
    for a in alphas:
        try:
            cands = candidates(cfg, tails, lam_maxes, int(a))
        except ConfigError:
            continue
        params = TuneParams(tuple(c.calibration.params for c in cands), units, per_unit, score_epsilon, eta, gamma)
        spent = dict(zip(orders, params.curve(orders)))
        scales = []
        for c in cands:
            try:
                scales.append(scale_of(serving_calibration(cfg, c, spent).params))
            except ConfigError:
                scales.append(0.0)
        mean = sum(scales) / len(scales)
        if mean > 0 and (best is None or mean > best[0]):
            best = (mean, cands, params)
    if best is None:
        raise ConfigError("tune", f"at epsilon {cfg.privacy.epsilon:g} no order in {alphas} pays for the tuning "
                                  f"({units} units x {per_unit} positions, E[trials] {expected_trials(eta, gamma):.2f}) "
                                  f"and {cfg.privacy.queries} queries after it: lower --positions-per-unit or "
                                  "privacy.queries, or raise --gamma")
    return best[1], best[2]


def held_out_units(cfg: Any) -> int:
    """U, the number of held-out units of the trained run (public: the partition's), read from
    its held-out records without loading any model; 0 when there are none."""
    from pmixed.models.ensemble import eval_records_path, read_eval_records

    return len({r.unit for r in read_eval_records(eval_records_path(Path(cfg.output_dir)))})


def unit_blocks(ens: Any, block_size: int, context: int | None = None) -> list[torch.Tensor]:
    """Per held-out unit (sorted by unit name, a public order), the first ``block_size`` tokens of
    its texts (fewer when the unit holds fewer, never more than the model's ``context``): [L_u]
    int64 each."""
    if context is not None:
        block_size = min(block_size, context)
    from pmixed.data.blocks import tokenize_blocks

    records = ens.eval_records()
    if not records:
        raise DataError("the ensemble has no held-out units to tune on (data.eval_units = 0?)")
    by_unit: dict[str, list[str]] = {}
    for r in records:
        by_unit.setdefault(r.unit, []).append(r.text)
    out = []
    for unit in sorted(by_unit):
        ids = tokenize_blocks(by_unit[unit], ens.tokenizer, 1)[:block_size, 0]  # [<= L]: no padding
        out.append(ids)
    return out


def tuning_stats(runtime: Any, blocks: list[torch.Tensor], per_unit: int, max_order: int, chunk: int = 1):
    """The members' statistics at each unit's last ``per_unit`` scored positions: a list of
    (BlockStats, scored position indices [m_u]) (units of under two tokens give nothing)."""
    from pmixed.eval.block_stats import block_stats

    out = []
    for block in blocks:
        T = block.shape[0] - 1
        if T < 1:
            continue
        pos = torch.arange(max(0, T - per_unit), T)
        needed = torch.zeros(T, runtime.n_members, dtype=torch.bool)
        needed[pos] = True
        st = block_stats(runtime, block, max_order=max_order, needed=needed, chunk=chunk, average=False).stats
        out.append((st, pos))
    return out


def run_trial(stats: list, cand: Candidate, score_epsilon: float, per_unit: int,
              generator: torch.Generator | None) -> float:
    """One trial of eq. (H2): the hit count of one PMixED answer per tuning position with the
    candidate, plus Lap(per_unit / score_epsilon)."""
    params = cand.calibration.params
    hits = 0
    for st, pos in stats:
        T = st.public_target.shape[0]
        mask = torch.zeros(T, params.ensemble_size, dtype=torch.bool)
        mask[pos] = poisson_mask(params.ensemble_size, params.sample_rate, len(pos), generator)
        probs, _ = released_target_probs(st, mask, params)  # [T]
        hits += int((uniforms((len(pos),), generator) < probs[pos]).sum())
    return hits + laplace(per_unit / score_epsilon, generator)


def tune(runtime: Any, blocks: list[torch.Tensor], cands: list[Candidate], params: TuneParams, ledger: Any, *,
         generator: torch.Generator | None = None, chunk: int = 1, stats: list | None = None) -> TuneResult:
    """The accounted tuner (``plan`` gives ``cands`` and ``params``): charge (H3) to ``ledger``
    (BudgetExhausted: nothing runs), then K ~ D_{eta,gamma} trials, each a uniformly drawn
    candidate; the best noisy count wins (ties: the first). ``generator`` only for experiments
    (otherwise every draw is from the OS CSPRNG)."""
    if params.units != len(blocks) or params.candidates != tuple(c.calibration.params for c in cands):
        raise ValueError("params were planned for other candidates or another number of units")
    per_unit, score_epsilon = params.per_unit, params.score_epsilon
    ledger.charge(tuning_charge(params, ledger.orders))  # charged before any trial runs
    if stats is None:
        stats = tuning_stats(runtime, blocks, per_unit, max(c.calibration.params.max_order for c in cands), chunk)
    K = sample_trials(float(uniforms((1,), generator)[0]), params.eta, params.gamma)
    best: tuple[float, Candidate] | None = None
    for _ in range(K):
        cand = cands[int(uniforms((1,), generator)[0] * len(cands))]
        score = run_trial(stats, cand, score_epsilon, per_unit, generator)
        if best is None or score > best[0]:
            best = (score, cand)
    score, cand = best
    return TuneResult(cand, score / params.positions, params, ledger.epsilon_spent())


def serving_calibration(cfg: Any, chosen: Candidate, spent: dict[float, float]) -> Any:
    """The chosen shape at its order calibrated for the config's T queries on top of ``spent``
    (order -> RDP already charged, the tuning included; eq. (C1) over everything)."""
    kw = cfg.privacy.calibration_kwargs(cfg.data.n_parts, lam_max=chosen.lam_max, tail=chosen.tail,
                                        alpha=chosen.calibration.params.max_order)
    return calibrate(**kw, spent=spent)


# ---------------------------------------------------------------------------------------------
# the cap-statistic tuner (eq. (H4)): one number of sensitivity 1/N, on public positions

#: The seed of the public positions: text sampled from the public model alone, so the positions
#: depend on no private data whatever the seed (a constant keeps them reproducible).
PUBLIC_SEED = 0


def start_token(tokenizer: Any) -> int:
    """The token public texts start from: the tokenizer's BOS, else its EOS, else 0."""
    tok = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return tok or 0


@torch.no_grad()
def public_blocks(runtime: Any, n_blocks: int, block_size: int, start_token: int, seed: int = PUBLIC_SEED) -> torch.Tensor:
    """``n_blocks`` texts of ``block_size`` tokens [n, L] int64 (CPU) sampled from the public model
    alone (the runtime's public row, temperature 1) from ``start_token``: public positions."""
    from pmixed.models.runtime import PUBLIC

    if n_blocks < 1 or block_size < 2:
        raise ConfigError("public_blocks", f"need at least one block of two tokens, got {n_blocks} x {block_size}")
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n_blocks, 1), int(start_token), dtype=torch.long)
    for _ in range(block_size - 1):  # the prefix is recomputed: a few hundred short forwards, once
        p = runtime.probs(x, [PUBLIC] * n_blocks)[:, -1].double().cpu()  # [n, V]
        x = torch.cat([x, torch.multinomial(p, 1, generator=g)], dim=1)
    return x


def cap_shares(runtime: Any, blocks: torch.Tensor, reference: Any) -> torch.Tensor:
    """b_i of eq. (H4) for every member: the share of the public positions of ``blocks`` [n, L] at
    which member i's mixing weight (P1) under ``reference`` (MechanismParams) reaches its cap
    lam_max. [N] float64 in [0, 1]; member i's value reads member i's adapter only: each member
    runs in a forward of its own (chunk 1), so that no other member's rows share its batch, whose
    rounding could move a weight across the cap and b_i with it."""
    from pmixed.eval.block_stats import block_stats
    from pmixed.mechanism.projection import lambdas_from_moments

    K = reference.max_order
    hits = torch.zeros(runtime.n_members, dtype=torch.float64)
    count = 0
    for block in blocks:
        mom = block_stats(runtime, block, max_order=K, chunk=1).stats.moments  # [T, N, K-1]
        lam = lambdas_from_moments(mom, reference)  # [T, N]; an invalid row has lam 0 (never at the cap)
        hits += (lam >= reference.lam_max * (1.0 - 1e-6)).double().sum(dim=0)
        count += lam.shape[0]
    return hits / count


def bind_plan(cfg: Any, positions: int, score_epsilon: float, orders: Sequence[float] = DEFAULT_ORDERS):
    """The cap-statistic tuner's parameters and its three candidates, all calibrated for the
    config's target on top of the tuning's own curve (H4) at one order (the reference's): the
    reference is the default rule's shape, the candidates its tail with lam_max low, the
    reference's or high. A function of the config alone. ConfigError when what is left cannot pay
    for the config's T queries."""
    from pmixed.privacy.calibration import DEFAULT_LAM_MAX, DEFAULT_TAIL
    from pmixed.privacy.tuning import BindParams, laplace_rdp

    orders = check_orders(orders)
    spent = {a: laplace_rdp(a, score_epsilon) for a in orders}
    N = cfg.data.n_parts

    def cal(lam_max: float, alpha: int | None = None):
        kw = cfg.privacy.calibration_kwargs(N, lam_max=lam_max, tail=DEFAULT_TAIL,
                                            **({} if alpha is None else {"alpha": alpha}))
        try:
            return calibrate(**kw, spent=spent)
        except ConfigError as err:
            raise ConfigError("tune", f"at epsilon {cfg.privacy.epsilon:g} the cap statistic (eps_s {score_epsilon:g}) "
                                      f"leaves too little for {cfg.privacy.queries} queries with lam_max {lam_max:g}: "
                                      f"{err}") from None

    ref = cal(DEFAULT_LAM_MAX)  # the config's order, else the reference's best: public
    params = BindParams(N, positions, float(score_epsilon), ref.params)
    # every candidate at the reference's order: the serving cost depends on the tuning's output,
    # so the serving ledger's Renyi filter works at one order fixed before the tuning (section 12)
    cands = {lm: (ref if lm == DEFAULT_LAM_MAX else cal(lm, ref.alpha)) for lm in params.caps}
    cands = {lm: Candidate(f"tail={DEFAULT_TAIL:g} lam_max={lm:g}", lm, DEFAULT_TAIL, c) for lm, c in cands.items()}
    return params, cands


def tune_bind(runtime: Any, blocks: torch.Tensor, params: Any, cands: dict[float, Candidate], ledger: Any, *,
              generator: torch.Generator | None = None, shares: torch.Tensor | None = None) -> TuneResult:
    """The cap-statistic tuner (``bind_plan`` gives ``params`` and ``cands``): charge (H4) to
    ``ledger`` first (BudgetExhausted: nothing runs), then the members' mean cap share on the
    public ``blocks`` plus Lap(1 / (N eps_s)) picks lam_max. ``generator`` only for experiments."""
    from pmixed.privacy.tuning import bind_charge

    if blocks.shape[0] * (blocks.shape[1] - 1) != params.positions:
        raise ValueError("params were planned for another number of public positions")
    ledger.charge(bind_charge(params, ledger.orders))  # charged before any member runs
    if shares is None:
        shares = cap_shares(runtime, blocks, params.reference)
    noisy = float(shares.mean()) + laplace(params.noise_scale, generator)
    return TuneResult(cands[params.choose(noisy)], noisy, params, ledger.epsilon_spent(), "noisy_cap_share")
