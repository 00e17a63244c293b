"""Post-processing and sampling of a released distribution: the constant-time version (pmixed's,
``mechanism.sampling``) against the sort-based one it replaced (tests/mechanism/test_sampling.py's
``sort_based`` with top-k by ``torch.topk``, as it was, and a binary-search sampler; their time
depends on the distribution), and against one steady serving step.

The released distribution is a float32 softmax of random logits (scale 3) widened to float64, as
the engine hands it on, over ``--vocab`` tokens. Each setting is timed in ONE run, the two
versions interleaved round by round, medians of ``--rounds`` rounds of ``--reps`` calls each.
The serving step for the ratio is ``--step-ms`` (a constant-work step per request, README:
tiny N = 32 at 8 streams is about 10 ms per request, SmolLM2 about 60 ms).

    python benchmarks/sampling_speed.py --vocab 49152
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests/

from tests.mechanism.test_sampling import sort_based  # noqa: E402

from pmixed.mechanism.sampling import postprocess  # noqa: E402
from pmixed.mechanism.subsample import sample_token  # noqa: E402

SETTINGS = [{}, {"temperature": 0.7}, {"top_k": 50}, {"top_p": 0.9}, {"temperature": 0.7, "top_k": 50, "top_p": 0.95}]


def binary_search_token(dist: torch.Tensor, generator: torch.Generator) -> int:
    cdf = torch.cumsum(dist, -1)
    u = torch.rand(1, generator=generator, dtype=torch.float64)
    return min(int(torch.searchsorted(cdf, u * cdf[-1], right=True).item()), dist.shape[-1] - 1)


def timed(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--step-ms", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    d = torch.softmax(torch.randn(args.vocab, generator=g) * 3, -1).double()
    gen = torch.Generator().manual_seed(1)
    print(f"vocab {args.vocab}, {args.rounds} rounds x {args.reps} calls, medians; serving step {args.step_ms} ms")
    print("setting | constant-time ms | sort-based ms | ratio | constant-time / step")
    res = {}
    for kw in SETTINGS:
        new = lambda kw=kw: sample_token(postprocess(d, **kw), gen)  # noqa: E731
        old = lambda kw=kw: binary_search_token(sort_based(d, selection="topk", **kw), gen)  # noqa: E731
        new(), old()  # kernels loaded
        a, b = [], []
        for r in range(args.rounds):
            for fn, acc in ((new, a), (old, b)) if r % 2 == 0 else ((old, b), (new, a)):
                acc.append(timed(fn, args.reps))
        ta, tb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
        print(f"{kw or 'defaults'} | {ta:.3f} | {tb:.3f} | {ta / tb:.2f}x | {ta / args.step_ms:.1%}")
        res[str(kw or "defaults")] = {"constant_ms": ta, "sort_based_ms": tb}
    return res


if __name__ == "__main__":
    main()
