"""Intervals over seeds and problems (wmtp.stages.intervals), on synthetic grids
whose truth the test knows, and through the report on synthetic evaluation files."""

from __future__ import annotations

import numpy as np
import pytest

from wmtp.stages import intervals

P = 400  # problems, as in the example


def _grid(rate: np.ndarray, rng: np.random.Generator, n: int = 10) -> np.ndarray:
    """(S, P) per-problem pass@1 of S trained models with per-(seed, problem) success
    probabilities `rate`, estimated from n samples each."""
    return rng.binomial(n, rate) / n


def _rows(effects_pp: list[float], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(baseline, method) grids: problems of varied difficulty, the method's success
    probability shifted by effects_pp[s] points in seed s."""
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(0.1, 0.7, size=P)
    base = _grid(np.tile(difficulty, (len(effects_pp), 1)), rng)
    shifted = np.clip(difficulty[None, :] + np.array(effects_pp)[:, None] / 100, 0, 1)
    return base, _grid(shifted, rng)


def _difference(effects_pp: list[float], n_resamples: int = 2000) -> intervals.Difference:
    base, method = _rows(effects_pp)
    draws = intervals.Resamples.draw(len(effects_pp), P, n_resamples, seed=1)
    return intervals.difference(intervals.estimate(method, draws), intervals.estimate(base, draws))


def test_a_seed_dependent_effect_gives_an_interval_that_includes_zero():
    # the case: +10, -8, +7 points over 400 problems. Averaging seeds first and
    # resampling problems only said about +3 [+2, +4], "excludes 0".
    diff = _difference([10, -8, 7])
    assert diff.value == pytest.approx(0.03, abs=0.02)
    assert diff.low < 0 < diff.high and not diff.excludes_zero
    assert [round(100 * d) for d in diff.per_seed] == pytest.approx([10, -8, 7], abs=3)


@pytest.mark.parametrize("effects", [[-12, 9, 4], [6, -7, 3], [15, -10, -2, 8]])
def test_other_seed_dependent_effects_include_zero(effects):
    assert not _difference(effects).excludes_zero


def test_a_consistent_effect_of_a_few_points_excludes_zero():
    diff = _difference([4, 3, 5])
    assert diff.excludes_zero and 0 < diff.low < 0.04 < diff.high
    assert all(d > 0 for d in diff.per_seed)


def test_the_same_effect_from_averaging_seeds_only_would_exclude_zero():
    """The old interval (problems only, seeds averaged first) on the seed-dependent
    case: the control that shows the new test above is not trivially wide."""
    base, method = _rows([10, -8, 7])
    problems_only = intervals.Resamples.draw(1, P, 2000, seed=1)
    diff = intervals.difference(
        intervals.estimate(method.mean(axis=0, keepdims=True), problems_only),
        intervals.estimate(base.mean(axis=0, keepdims=True), problems_only),
    )
    assert diff.excludes_zero


def test_resampled_mean_matches_indexing_by_hand():
    values = np.arange(6, dtype=float).reshape(2, 3)  # (S=2, P=3)
    draws = intervals.Resamples(np.array([[2.0, 0.0], [1.0, 1.0]]), np.array([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]))
    # resample 0: seed 0 twice, problems 1, 2, 2 -> mean of [1, 2, 2]
    # resample 1: seeds 0 and 1, problem 0 thrice -> mean of [0, 3]
    assert draws.means(values) == pytest.approx([5 / 3, 1.5])


def test_draws_are_seeded_and_sum_to_their_sizes():
    a, b = intervals.Resamples.draw(3, 7, 50, seed=4), intervals.Resamples.draw(3, 7, 50, seed=4)
    assert (a.seed_counts == b.seed_counts).all() and (a.problem_counts == b.problem_counts).all()
    assert (a.seed_counts.sum(axis=1) == 3).all() and (a.problem_counts.sum(axis=1) == 7).all()
    assert not (a.problem_counts == intervals.Resamples.draw(3, 7, 50, seed=5).problem_counts).all()


def test_pairing_makes_a_constant_shift_a_point():
    rng = np.random.default_rng(0)
    base = rng.uniform(size=(3, 50))
    draws = intervals.Resamples.draw(3, 50, 500, seed=0)
    diff = intervals.difference(intervals.estimate(base + 0.1, draws), intervals.estimate(base, draws))
    assert (diff.value, diff.low, diff.high) == pytest.approx((0.1, 0.1, 0.1))


def test_oracle_temperature_is_chosen_inside_each_resample():
    """Two temperatures of pure noise around the same rate: the full-data choice picks
    the luckier one, and every resample picks its own luckier one, so the resampled
    scores are never below either temperature's resampled mean."""
    rng = np.random.default_rng(3)
    values = rng.binomial(1, 0.5, size=(2, 3, 60)).astype(float)  # (T, S, P)
    draws = intervals.Resamples.draw(3, 60, 300, seed=2)
    found = intervals.estimate(values, draws)
    per_t = draws.means(values)  # (T, B)
    assert found.choice == int(np.argmax(values.mean(axis=(1, 2))))
    assert found.resampled == pytest.approx(per_t.max(axis=0))
    assert (per_t.argmax(axis=0) != found.choice).any()  # some resamples choose the other one


def test_shape_mismatch_is_refused():
    draws = intervals.Resamples.draw(2, 5, 10, seed=0)
    with pytest.raises(ValueError, match="seeds, problems"):
        draws.means(np.zeros((3, 5)))
