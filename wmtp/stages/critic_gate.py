"""The critic's gate: do the table's per-line deltas agree with fresh Monte-Carlo ones?

critic-wmtp trains with normalise(delta), a z-score of the deltas followed by a
softmax: what reaches the loss is which lines the deltas rank above which. So
the gate compares rankings. On the gate problems the critic's per-line deltas
(the ones the value table holds) are set against a second Monte-Carlo estimate
of the same advantages made from other samples (another sampling seed), and the
statistic is Spearman's rank correlation over every (problem, line) pair, each
side centred on its problem's mean delta first.

Why centred: a problem's deltas sum to (gold reward - V(s0)), so the lines of a
problem the base cannot start get large deltas in any estimate. Pooled raw, a
critic that knows only which problems are hard (the same delta on every line of
a problem) would earn a high rho without ranking a single line, the flaw of the
explained variance of returns. Centred, that critic has nothing left to rank
(all zeros, no rho), and what is compared is which lines of a problem matter
more than its others. Problems with one line have nothing to rank and are left
out (`n_problems` counts the rest).

Why this statistic, and why it can stand for lambda (`strength: auto`):
- Two independent noisy estimates of the same advantages correlate less than
  either does with the truth (the fresh estimate's own noise attenuates the
  correlation), so rho is a conservative measure of how well the table's ranking
  matches the base model's true per-line advantages; a constant or random
  critic gets rho ~ 0 whatever the problems' difficulty.
- lambda = clip(rho, 0, 1) when the bootstrap interval of rho (problems
  resampled with replacement, the unit that was sampled) lies above 0, else 0:
  weights move away from 1 only as far as the deltas are shown to rank lines
  the way fresh estimates do, and not at all when that cannot be told from noise.

Reported beside it: the share of gate problems whose line with the largest
|delta| is also the fresh estimate's (among problems where the fresh deltas are
not all 0), and the number of lines and problems behind rho.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

STATISTIC = "spearman_within_problem"
CONFIDENCE = 0.95
TIE_TOLERANCE = 1e-9  # deltas are rewards' differences, in [-1, 1]


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Rank correlation with average ranks for ties; None when either side is constant
    (or has fewer than two values), where no ranking exists."""
    if len(x) < 2:
        return None
    rx = pd.Series(x).rank(method="average").to_numpy()
    ry = pd.Series(y).rank(method="average").to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def top_line_agreement(predicted: Sequence[np.ndarray], fresh: Sequence[np.ndarray]) -> tuple[float | None, int]:
    """Share of problems whose largest-|delta| line is the same in both estimates
    (ties: the first such line), over problems where the fresh deltas are not all 0."""
    hits, n = 0, 0
    for p, f in zip(predicted, fresh, strict=True):
        if not len(f) or not np.abs(f).max() > 0:
            continue
        n += 1
        hits += int(np.argmax(np.abs(p)) == np.argmax(np.abs(f)))
    return (hits / n if n else None), n


def centred(deltas: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each problem's line deltas minus their mean (module docstring: why). Rounding
    residue (|x| < TIE_TOLERANCE: equal deltas whose mean is not exact in floating
    point) is set to 0, so equal deltas stay tied instead of being ranked by noise."""
    out = []
    for d in deltas:
        c = np.asarray(d, dtype=float) - np.mean(d)
        out.append(np.where(np.abs(c) < TIE_TOLERANCE, 0.0, c))
    return out


def gate_statistic(
    predicted: Sequence[np.ndarray], fresh: Sequence[np.ndarray], *, n_resamples: int, seed: int
) -> dict:
    """Spearman's rho between the critic's per-line deltas and fresh ones (one array
    per gate problem, the same lines on both sides), each centred on its problem's
    mean, with a percentile bootstrap interval over problems, and the top-line
    agreement. JSON-ready."""
    if len(predicted) != len(fresh):
        raise ValueError(f"{len(predicted)} predicted vs {len(fresh)} fresh gate problems")
    for i, (p, f) in enumerate(zip(predicted, fresh, strict=True)):
        if len(p) != len(f):
            raise ValueError(f"gate problem {i}: {len(p)} predicted vs {len(f)} fresh line deltas")
    agreement, n_top = top_line_agreement(predicted, fresh)
    ranked = [i for i, p in enumerate(predicted) if len(p) > 1]
    predicted, fresh = centred([predicted[i] for i in ranked]), centred([fresh[i] for i in ranked])
    pooled_p = np.concatenate(predicted) if predicted else np.array([])
    pooled_f = np.concatenate(fresh) if fresh else np.array([])
    rho = spearman(pooled_p, pooled_f)
    interval = None
    if rho is not None and len(predicted) > 1:
        rng = np.random.default_rng([seed, 19])
        draws = []
        for _ in range(n_resamples):
            chosen = rng.integers(0, len(predicted), len(predicted))
            value = spearman(
                np.concatenate([predicted[i] for i in chosen]), np.concatenate([fresh[i] for i in chosen])
            )
            draws.append(np.nan if value is None else value)
        draws = np.asarray(draws)
        if np.isfinite(draws).any():
            tail = 100 * (1 - CONFIDENCE) / 2
            interval = [float(v) for v in np.nanpercentile(draws, [tail, 100 - tail])]
    return {
        "statistic": STATISTIC,
        "value": rho,
        "interval": interval,
        "confidence": CONFIDENCE,
        "n_resamples": n_resamples,
        "n_lines": int(len(pooled_p)),
        "n_problems": len(predicted),
        "top_line_agreement": agreement,
        "n_top_line_problems": n_top,
    }
