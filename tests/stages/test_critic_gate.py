"""The critic's gate: rank agreement of a critic's per-line deltas with a fresh
Monte-Carlo estimate, and the lambda of `strength: auto` it gives."""

from __future__ import annotations

import numpy as np
import pytest

from wmtp.stages.critic_gate import gate_statistic, spearman
from wmtp.stages.value_table import auto_strength


def true_advantages(n_problems: int = 60, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-line advantages of problems of mixed difficulty (V(s0) from 0 to 1, the
    advantages of a problem summing to 1 - V(s0)), and a fresh Monte-Carlo estimate
    of each: K = 8 pass rates at every boundary, differenced."""
    rng = np.random.default_rng(seed)
    truth, fresh = [], []
    for _ in range(n_problems):
        lines = int(rng.integers(3, 9))
        v0 = rng.uniform(0, 1)
        share = rng.dirichlet(np.full(lines, 0.3))  # a few lines carry most of it
        values = np.concatenate([[v0], v0 + np.cumsum(share) * (1 - v0)])
        estimated = rng.binomial(8, np.clip(values, 0, 1)) / 8
        estimated[-1] = 1.0  # the gold's own reward, executed once
        truth.append(np.diff(values))
        fresh.append(np.diff(estimated))
    return truth, fresh


def lam(gate: dict) -> float:
    return auto_strength(gate["value"], gate["interval"])


def test_deltas_that_are_the_truth_pass_the_gate():
    truth, fresh = true_advantages()
    gate = gate_statistic(truth, fresh, n_resamples=300, seed=0)
    # the fresh estimate's own noise (K = 8) attenuates rho below 1: a conservative lambda
    assert gate["value"] > 0.5 and gate["interval"][0] > 0.4
    assert gate["interval"][0] <= gate["value"] <= gate["interval"][1]
    assert gate["n_problems"] == 60 and gate["n_lines"] == sum(len(t) for t in truth)
    assert gate["top_line_agreement"] > 0.35  # a random critic's: ~ 1 / mean lines (0.17)
    assert lam(gate) == pytest.approx(gate["value"]) and lam(gate) > 0
    assert gate == gate_statistic(truth, fresh, n_resamples=300, seed=0)  # seeded


def test_constant_random_and_difficulty_only_critics_get_lambda_zero():
    truth, fresh = true_advantages()
    constant = [np.zeros_like(t) for t in truth]
    gate = gate_statistic(constant, fresh, n_resamples=300, seed=0)
    assert gate["value"] is None and lam(gate) == 0.0
    rng = np.random.default_rng(1)
    noise = [rng.normal(size=len(t)) for t in truth]
    gate = gate_statistic(noise, fresh, n_resamples=300, seed=0)
    assert abs(gate["value"]) < 0.2 and gate["interval"][0] <= 0 and lam(gate) == 0.0
    assert gate["top_line_agreement"] < 0.25
    # A critic that knows only how hard each problem is (its advantage spread evenly
    # over the lines) ranks no line above another: no rho, lambda 0, though pooled
    # raw (as explained variance of returns was) it would look informative.
    difficulty = [np.full(len(t), t.sum() / len(t)) for t in truth]
    assert spearman(np.concatenate(difficulty), np.concatenate(fresh)) > 0.2
    gate = gate_statistic(difficulty, fresh, n_resamples=300, seed=0)
    assert gate["value"] is None and lam(gate) == 0.0


def test_a_reversed_critic_gets_lambda_zero_and_one_line_problems_are_left_out():
    truth, fresh = true_advantages()
    gate = gate_statistic([-t for t in truth], fresh, n_resamples=300, seed=0)
    assert gate["value"] < -0.5 and lam(gate) == 0.0
    before = gate_statistic(truth, fresh, n_resamples=50, seed=0)
    gate = gate_statistic([*truth, np.array([0.7])], [*fresh, np.array([1.0])], n_resamples=50, seed=0)
    assert gate["n_problems"] == 60 and gate["value"] == before["value"]  # one line: nothing to rank
    assert gate["n_top_line_problems"] == before["n_top_line_problems"] + 1
    with pytest.raises(ValueError, match="gate problem 0: 2 predicted vs 3"):
        gate_statistic([np.zeros(2)], [np.zeros(3)], n_resamples=10, seed=0)
    assert auto_strength(0.5, [-0.1, 0.9]) == 0.0 and auto_strength(1.3, [0.2, 1.0]) == 1.0


def test_the_stage_gives_lambda_zero_without_an_interval():
    """One gate problem has a rho (its lines ranked) but no interval over problems:
    the stage's lambda is 0, not rho."""
    from wmtp.config.schema import CriticSettings
    from wmtp.stages.critic import gate
    from wmtp.stages.critic_mc import Estimate

    truth = np.array([0.0, 0.6, 0.4])
    fresh = Estimate([np.array([0.0, 0.0, 0.6, 1.0])], 3, 12, 0)
    settings = CriticSettings(gate_resamples=20)
    record, head, lam = gate([truth], fresh, None, settings, 0)
    assert record["value"] == pytest.approx(1.0) and record["interval"] is None and head is None
    assert lam == 0.0
    truths, fresh_deltas = true_advantages()
    fresh = Estimate([np.concatenate([[0.0], np.cumsum(f)]) for f in fresh_deltas], 0, 0, 0)
    record, head, lam = gate(truths, fresh, [np.zeros_like(t) for t in truths], settings, 0)
    assert lam == 0.0 < record["value"] and head["value"] is None  # the smaller of the two gates'
