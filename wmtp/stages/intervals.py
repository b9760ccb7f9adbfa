"""Intervals over trainings and problems: the pigeonhole (two-way) bootstrap.

A table cell is the mean of per-(seed, problem) values `v[s, p]`: pass@k of seed s's
trained model on problem p. Two sources of variation stand behind it, and a
claim that one method beats another must survive both:

- **between trainings**: another seed gives another data order, init and sampling
  stream, hence another model. Averaging seeds first and resampling problems
  only (what this report did before) treats the S trained models as the only
  ones there could be, so an effect of +10, -8, +7 points over three seeds looks
  like a sure +3.
- **between problems**: the benchmark is a finite sample of problems.

Seeds and problems are crossed (every seed is evaluated on every problem), so
each resample draws S seeds with replacement and, independently, P problems
with replacement, and takes the mean over the resampled grid: Owen's pigeonhole
bootstrap for crossed random effects (A. B. Owen, "The pigeonhole bootstrap",
Ann. Appl. Stat. 1(2), 2007), whose variance estimate is mildly conservative.
The same draws serve every row of a benchmark, so a row and the baseline are
compared on the same seeds (seed s of every row shares data order and sampling
seed) and the same problems: the difference is paired at both levels.

What it does not cover: other hyperparameters, data or base models. With few
seeds the seed level is coarse (3 seeds give 10 distinct seed multisets), and a
single seed leaves only the problem level; the report says how many seeds the
intervals rest on.

With several sampling temperatures (the paper's oracle protocol) each resample
picks, per row, the temperature with the best resampled score, so the interval
includes the optimism of choosing on the test set.

Standard library and numpy only (the report loads without torch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95  # every interval of the report


@dataclass(frozen=True)
class Resamples:
    """Bootstrap draws shared by every row of one benchmark.

    `seed_counts[b, s]` is how often seed s is drawn in resample b (each row sums
    to S), `problem_counts[b, p]` likewise for problems (each row sums to P). A
    resample's mean of `v` (S, P) is sum_s sum_p seed_counts[b, s] *
    problem_counts[b, p] * v[s, p] / (S P)."""

    seed_counts: np.ndarray  # (B, S)
    problem_counts: np.ndarray  # (B, P)

    @classmethod
    def draw(cls, n_seeds: int, n_problems: int, n_resamples: int, seed: int) -> Resamples:
        if n_seeds < 1 or n_problems < 1:
            raise ValueError(f"the bootstrap needs a seed and a problem, got {n_seeds} and {n_problems}")
        rng = np.random.default_rng(seed)
        seeds = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))
        problems = rng.integers(0, n_problems, size=(n_resamples, n_problems))
        return cls(_counts(seeds, n_seeds), _counts(problems, n_problems))

    @property
    def shape(self) -> tuple[int, int]:
        """(S, P): the grid the values must have."""
        return self.seed_counts.shape[1], self.problem_counts.shape[1]

    def means(self, values: np.ndarray) -> np.ndarray:
        """(B,) resampled means of `values` (S, P) or (T, S, P) -> (T, B)."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape[-2:] != self.shape:
            raise ValueError(f"values of shape {values.shape} for resamples of {self.shape} (seeds, problems)")
        n_seeds, n_problems = self.shape
        # (B, S) x (..., S, P) x (B, P) -> (..., B)
        weighted = np.einsum("bs,...sp->...bp", self.seed_counts, values)
        return np.einsum("...bp,bp->...b", weighted, self.problem_counts) / (n_seeds * n_problems)


def _counts(draws: np.ndarray, size: int) -> np.ndarray:
    """(B, n) index draws -> (B, size) counts."""
    counts = np.zeros((draws.shape[0], size), dtype=np.float64)
    np.add.at(counts, (np.arange(draws.shape[0])[:, None], draws), 1.0)
    return counts


@dataclass(frozen=True)
class Estimate:
    """A row's score on one metric: the point estimate, its resampled values and,
    with several candidate temperatures, the index of the one chosen."""

    value: float
    resampled: np.ndarray  # (B,)
    choice: int  # temperature index chosen on the full data (0 with a single one)
    per_seed: np.ndarray  # (S,) mean over problems of each seed, at the chosen temperature

    def interval(self, level: float = LEVEL) -> tuple[float, float]:
        return _percentiles(self.resampled, level)


def estimate(values: np.ndarray, resamples: Resamples) -> Estimate:
    """Score of per-(temperature, seed, problem) `values` (T, S, P) (or (S, P)).

    The point estimate takes the temperature with the best mean over the full
    grid; each resample takes the best of its own resampled means (an oracle
    choice made inside the resample, as the paper's protocol makes it on the test
    scores). Ties go to the first temperature."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 2:
        values = values[None]
    full = values.mean(axis=(1, 2))  # (T,)
    choice = int(np.argmax(full))
    resampled = resamples.means(values).max(axis=0)  # (B,)
    return Estimate(float(full[choice]), resampled, choice, values[choice].mean(axis=1))


@dataclass(frozen=True)
class Difference:
    """A row minus the baseline on one metric, paired over seeds and problems."""

    value: float
    low: float
    high: float
    per_seed: tuple[float, ...]  # seed s's difference, mean over problems

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def difference(row: Estimate, baseline: Estimate, level: float = LEVEL) -> Difference:
    """`row - baseline` with both estimates from the same `Resamples` (paired); each
    keeps its own temperature choice, per resample and on the full data."""
    if row.resampled.shape != baseline.resampled.shape:
        raise ValueError("a difference needs both estimates from the same resamples")
    low, high = _percentiles(row.resampled - baseline.resampled, level)
    per_seed = tuple(float(x) for x in row.per_seed - baseline.per_seed)
    return Difference(row.value - baseline.value, low, high, per_seed)


def _percentiles(resampled: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(resampled, [alpha, 1.0 - alpha])
    return float(low), float(high)
