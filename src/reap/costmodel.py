"""The block-parallel build's cost model: how long each part of a rank's work takes, and the block ranges
that make all ranks finish together.

A rank r of `reap build --gpus N` holding blocks [a, b):
    ready_r   = startup + load(a, b)                       imports, AutoRound set-up, its blocks copied and read
    inputs_0  = ready_0 + calibration                      AutoRound's calibration pass gives block 0's inputs
    inputs_r  = max(ready_r, handed_{r-1})                 r > 0: the full-precision inputs of block a arrive
    handed_r  = inputs_r + forward(a, b)                   it runs its blocks in full precision for rank r + 1
    finish_r  = handed_r (inputs_r for the last) + tune(a, b) + save(a, b)
Every term is proportional to the blocks' parameters (shard headers), tuning to `fixed + per_iter * iters`
and the forward to the calibration tokens. `plan_ranges` picks the contiguous ranges that minimize the last
finish: later ranks get their inputs later (the full-precision passes of the ranges before them), so they
get fewer blocks, unless that pass is slow against tuning: then the first ranges shrink, to hand on sooner.
The constants are fitted from measured builds (docs/benchmarks.md, "The cost model"); only their ratios
shape the ranges, their values give the predicted wall time recorded beside the measured one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

REF_TOKENS = 64 * 512  # the calibration set the constants were measured with


@dataclass(frozen=True)
class Costs:
    """Seconds per billion block parameters (and fixed seconds) on one device kind."""

    startup_s: float  # imports, torch.distributed set-up, AutoRound set-up
    load_s_per_b: float  # reading a block from the shards into host memory
    calibration_s: float  # rank 0: AutoRound's calibration pass up to block 0's inputs
    forward_s_per_b: float  # one block in full precision over REF_TOKENS tokens (moved to the device and back)
    tune_fixed_s_per_b: float  # AutoRound per block beside its iterations: caching, wrapping, packing
    tune_iter_s_per_b: float  # one SignRound iteration
    save_s_per_b: float  # writing the packed block


# Fitted on one H200 and the 2-GPU kind with blocks of the 212B width (3.4-3.5 B parameters; docs/benchmarks.md,
# "The cost model"): tuning ~41.5 s per block at iters 50 and ~26 s at iters 20 (0.13 s per iteration and
# B parameters, 5.5 s per B beside them). The job's own phases, measured with two ranks on one H200
# (2026-12-04, blocks of ~0.95 B): ~20 s from launch to a rank ready to load (imports, torch.distributed,
# AutoRound set-up), the range view's copy and loading 2.2 s per B, AutoRound's calibration pass ~2 s; the
# full-precision pass with its samples as one batch 0.6 s per B at the 212B width (read 0.55 s, to the GPU
# 0.85 s, run 0.5-0.8 s a block of 3.5 B; benchmarks/fp_pass_profile.py; 1.85 s per B for blocks of 64
# experts).
GPU = Costs(
    startup_s=20.0,
    load_s_per_b=2.2,
    calibration_s=2.0,
    forward_s_per_b=0.6,
    tune_fixed_s_per_b=5.5,
    tune_iter_s_per_b=0.13,
    save_s_per_b=0.3,
)
# Fitted on the 2-core CPU machines with the 4-block demo model (~0.5 M parameters a block, one core per
# rank): 2.3 s to read 2 blocks, 0.55 s for their full-precision pass, ~3 s a block at iters 5 and ~4 s at
# iters 50 (32 x 128 tokens), most of it fixed per-module cost: per B the figures are large, the blocks tiny.
CPU = Costs(
    startup_s=9.0,
    load_s_per_b=2300.0,
    calibration_s=1.2,
    forward_s_per_b=550.0,
    tune_fixed_s_per_b=5800.0,
    tune_iter_s_per_b=44.0,
    save_s_per_b=50.0,
)


@dataclass(frozen=True)
class Rank:
    """One rank's planned range and predicted times (seconds from the launch)."""

    start: int
    stop: int
    ready_s: float
    inputs_s: float
    handed_s: float | None  # None for the last rank
    finish_s: float

    def record(self) -> dict[str, float | int | None]:
        return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _times(costs: Costs, iters: int, tokens: int):
    scale = tokens / REF_TOKENS
    tune_per_b = costs.tune_fixed_s_per_b + costs.tune_iter_s_per_b * iters
    return (
        lambda p: costs.startup_s + costs.load_s_per_b * p,  # ready
        lambda p: costs.forward_s_per_b * scale * p,  # forward
        lambda p: (tune_per_b + costs.save_s_per_b) * p,  # tune and save
    )


def simulate(ranges: list[tuple[int, int]], params_b: list[float], costs: Costs, iters: int, tokens: int) -> list[Rank]:
    """The predicted timeline of each rank for the given ranges (`params_b`: billions of parameters per block)."""
    ready, forward, tune = _times(costs, iters, tokens)
    out, handed = [], 0.0
    for r, (a, b) in enumerate(ranges):
        p = sum(params_b[a:b])
        ready_r = ready(p)
        inputs = ready_r + costs.calibration_s if r == 0 else max(ready_r, handed)
        last = r == len(ranges) - 1
        handed = inputs + forward(p)
        out.append(Rank(a, b, ready_r, inputs, None if last else handed, (inputs if last else handed) + tune(p)))
    return out


def plan_ranges(params_b: list[float], ranks: int, costs: Costs, iters: int, tokens: int) -> list[tuple[int, int]]:
    """Contiguous ranges, one per rank, each at least one block, minimizing the predicted wall time (the last
    rank's finish). Binary search on the wall time T; for a given T a dynamic programme finds whether the
    blocks can be covered with every rank finished by T, keeping for each prefix the earliest time its last
    rank hands on its outputs (earlier is always better for the ranks after it)."""
    n = len(params_b)
    if not 1 <= ranks <= n:
        raise ValueError(f"{ranks} ranks for {n} blocks")
    ready, forward, tune = _times(costs, iters, tokens)
    prefix = [0.0]
    for p in params_b:
        prefix.append(prefix[-1] + p)

    def feasible(limit: float) -> list[tuple[int, int]] | None:
        # best[r][j]: earliest hand-on time of rank r when ranks 0..r cover blocks [0, j), with its split point
        inf = float("inf")
        best = [[(inf, -1)] * (n + 1) for _ in range(ranks)]
        for r in range(ranks):
            last = r == ranks - 1
            for j in range(r + 1, n - (ranks - 1 - r) + 1):
                if last and j != n:
                    continue
                for i in range(r, j) if r else (0,):
                    prev = 0.0 if r == 0 else best[r - 1][i][0]
                    if prev == inf:
                        continue
                    p = prefix[j] - prefix[i]
                    inputs = ready(p) + costs.calibration_s if r == 0 else max(ready(p), prev)
                    handed = inputs + forward(p)
                    finish = (inputs if last else handed) + tune(p)
                    if finish <= limit and handed < best[r][j][0]:
                        best[r][j] = (handed, i)
        if best[-1][n][0] == inf:
            return None
        ranges, j = [], n
        for r in range(ranks - 1, -1, -1):
            i = best[r][j][1]
            ranges.append((i, j))
            j = i
        return ranges[::-1]

    even = [(n * k // ranks, n * (k + 1) // ranks) for k in range(ranks)]
    hi = max(r.finish_s for r in simulate(even, params_b, costs, iters, tokens))
    lo, plan = 0.0, even
    for _ in range(40):
        mid = (lo + hi) / 2
        found = feasible(mid)
        if found:
            plan, hi = found, mid
        else:
            lo = mid
        if hi - lo < 0.01 * hi:
            break
    return plan


def costs_for(device: str) -> Costs:
    """The constants of the device kind the ranks run on: "cpu", or a GPU."""
    return CPU if device == "cpu" else GPU
