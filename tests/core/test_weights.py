"""Invariants of the token weights (their definition: docs/design.md)."""

from __future__ import annotations

import math

import pytest
import torch

from wmtp.config import registry
from wmtp.config.schema import WeightingSettings
from wmtp.core import weights as weights_module
from wmtp.core.weights import (
    Draw,
    algorithm_weights,
    control_weights,
    critic_deltas,
    exp_weights,
    normalize,
    rho1_scores,
    strength,
    tokenskip,
)


def random_batch(seed: int, shape=(3, 40), spread: float = 1.0, p_valid: float = 0.7):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(shape, generator=generator) * spread
    mask = torch.rand(shape, generator=generator) < p_valid
    mask[0, 0] = True  # at least one valid token
    return scores, mask


def assert_weight_invariants(weights, mask, eps=0.05, w_max=3.0):
    assert weights.dtype == torch.float32
    assert not weights.requires_grad
    assert torch.all(weights[~mask] == 0)
    valid = weights[mask]
    assert abs(valid.mean().item() - 1.0) < 1e-4
    assert valid.min().item() >= eps - 1e-6
    assert valid.max().item() <= w_max + 1e-6


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "temperature,eps,w_max,spread",
    [(0.7, 0.05, 3.0, 1.0), (0.1, 0.05, 3.0, 1.0), (0.3, 0.2, 1.5, 5.0), (2.0, 0.0, 10.0, 1.0)],
)
def test_normalize_mean_one_bounds_and_zero_on_invalid(seed, temperature, eps, w_max, spread):
    scores, mask = random_batch(seed, spread=spread)
    weights = normalize(scores, mask, temperature, eps, w_max)
    assert_weight_invariants(weights, mask, eps, w_max)
    assert weights[mask].std() > 0.01  # random scores really give unequal weights


def test_normalize_clipping_binds_and_mean_still_one():
    scores, mask = random_batch(0, shape=(4, 64))
    weights = normalize(scores, mask, temperature=0.1)  # very peaked softmax
    assert_weight_invariants(weights, mask)
    assert torch.isclose(weights[mask].max(), torch.tensor(3.0))
    assert torch.isclose(weights[mask].min(), torch.tensor(0.05))


@pytest.mark.parametrize("seed", range(3))
def test_normalize_monotonic_in_score(seed):
    scores, mask = random_batch(seed)
    weights = normalize(scores, mask, temperature=0.5)
    order = torch.argsort(scores[mask])
    assert torch.all(torch.diff(weights[mask][order]) >= -1e-6)


@pytest.mark.parametrize("scale,shift", [(3.0, 7.0), (0.01, -2.0), (250.0, 1e3)])
def test_normalize_invariant_to_positive_affine_change(scale, shift):
    scores, mask = random_batch(1)
    expected = normalize(scores, mask)
    assert torch.allclose(normalize(scores * scale + shift, mask), expected, atol=1e-5)


def test_normalize_ignores_invalid_positions_even_nan():
    scores, mask = random_batch(2)
    expected = normalize(scores, mask)
    garbage = scores.clone()
    garbage[~mask] = float("nan")
    assert torch.equal(normalize(garbage, mask), expected)
    garbage[~mask] = 1e9
    assert torch.equal(normalize(garbage, mask), expected)


def test_normalize_edge_cases():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.equal(normalize(torch.full((2, 3), 4.2), mask), mask.float())  # zero std
    single = torch.tensor([[False, True, False]])
    assert torch.equal(normalize(torch.tensor([[0.0, -5.0, 3.0]]), single), single.float())
    none = normalize(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(none, torch.zeros(2, 3))


# Hand-worked cases: the expected weights are derived on paper from the
# definition (z-score with the POPULATION std over the batch's valid tokens, softmax(z / T),
# mean 1, clip to [eps, w_max] with the rest rescaled), never from the implementation.
# Valid tokens are spread over two rows, with garbage at invalid positions, so a per-row
# z-score or a statistic that counts padding fails too.


def batch_of(valid_scores: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A (2, 6) batch holding `valid_scores` (in order) at its valid positions."""
    mask = torch.zeros(2, 6, dtype=torch.bool)
    positions = [(0, 1), (0, 2), (0, 4), (1, 0), (1, 3), (1, 5)][: len(valid_scores)]
    scores = torch.full((2, 6), 1e6)
    for (row, col), score in zip(positions, valid_scores, strict=True):
        mask[row, col] = True
        scores[row, col] = score
    return scores, mask


def test_normalize_pinned_two_levels_without_clipping():
    # scores 0, 0, 3, 3: mean 1.5, population std 1.5 (unbiased: sqrt 3), so z = -1, -1, 1, 1;
    # w_high / w_low = exp(2 / T) and w_low + w_high = 2 (mean 1 over 4 tokens):
    # w_low = 2 / (1 + exp(2 / 0.7)) = 0.10863, w_high = 1.89137, inside [0.05, 3].
    scores, mask = batch_of([0.0, 0.0, 3.0, 3.0])
    weights = normalize(scores, mask, temperature=0.7, eps=0.05, w_max=3.0)
    low = 2 / (1 + math.exp(2 / 0.7))
    assert low == pytest.approx(0.10863, abs=1e-5)
    assert weights[mask].tolist() == pytest.approx([low, low, 2 - low, 2 - low], rel=1e-6)
    assert torch.all(weights[~mask] == 0)


def test_normalize_pinned_ratios_are_exp_of_z_difference_over_t():
    # scores 1..5: mean 3, population variance 2 (unbiased: 2.5), z_i = (s_i - 3) / sqrt 2;
    # without clipping w_i / w_j = exp((z_i - z_j) / T) for every pair, and the mean is 1.
    # With T = 1: exp(z) sums to 7.87755, w = 5 exp(z) / 7.87755 = 0.15431, 0.31296, 0.63472, 1.28728, 2.61074.
    raw = [1.0, 2.0, 3.0, 4.0, 5.0]
    scores, mask = batch_of(raw)
    for temperature in (1.0, 2.5):
        weights = normalize(scores, mask, temperature=temperature, eps=0.05, w_max=3.0)[mask].double()
        z = [(s - 3.0) / math.sqrt(2.0) for s in raw]
        for i in range(5):
            for j in range(5):
                expected = math.exp((z[i] - z[j]) / temperature)
                assert (weights[i] / weights[j]).item() == pytest.approx(expected, rel=1e-5)
        assert weights.mean().item() == pytest.approx(1.0, abs=1e-6)
    at_one = normalize(scores, mask, temperature=1.0, eps=0.05, w_max=3.0)[mask]
    assert at_one.tolist() == pytest.approx([0.15431, 0.31296, 0.63472, 1.28728, 2.61074], abs=1e-5)


def test_normalize_pinned_clipping_at_both_bounds():
    # scores -1, 0, 0, 1: population std sqrt(1/2), z = -sqrt 2, 0, 0, sqrt 2; with T = 0.5
    # p = 4 softmax(z / T) = 0.0125, 0.2108, 0.2108, 3.566. Guess: the ends clip; then the
    # middles share 4 - 0.05 - 3 = 0.95, i.e. 0.475 each = c * 0.2108 with c = 2.253, and
    # check the guess: c * 0.0125 = 0.028 < eps, c * 3.566 = 8.03 > w_max. So:
    scores, mask = batch_of([-1.0, 0.0, 0.0, 1.0])
    weights = normalize(scores, mask, temperature=0.5, eps=0.05, w_max=3.0)
    assert weights[mask].tolist() == pytest.approx([0.05, 0.475, 0.475, 3.0], abs=1e-6)


def test_normalize_pinned_clipping_keeps_unclipped_ratios():
    # scores -6, -1, 0, 1, 6: mean 0, population variance 74/5, z = s / sqrt(14.8); T = 0.7:
    # p = 5 softmax(z / T) = 0.043, 0.275, 0.399, 0.579, 3.704. Only the top clips (to 3):
    # the other four share 5 - 3 = 2 in proportion to exp(z / T): 2 softmax over them
    # (check: the smallest, 2 * 0.043 / 1.296 = 0.066, stays above eps = 0.05).
    raw = [-6.0, -1.0, 0.0, 1.0, 6.0]
    scores, mask = batch_of(raw)
    weights = normalize(scores, mask, temperature=0.7, eps=0.05, w_max=3.0)[mask].tolist()
    e = [math.exp(s / math.sqrt(14.8) / 0.7) for s in raw[:4]]
    expected = [2 * x / sum(e) for x in e] + [3.0]
    assert expected[0] == pytest.approx(0.0664, abs=1e-4)
    assert weights == pytest.approx(expected, rel=1e-6)


def test_normalize_rejects_bad_input():
    scores, mask = random_batch(0)
    with pytest.raises(ValueError, match="same shape"):
        normalize(scores, mask[:, :-1])
    with pytest.raises(ValueError, match="eps"):
        normalize(scores, mask, eps=1.5)
    bad = scores.clone()
    bad[mask] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        normalize(bad, mask)


def test_rho1_scores_signed_and_abs():
    ce_base = torch.tensor([[2.0, 0.5, 1.0]])
    ce_ref = torch.tensor([[1.0, 1.5, 1.0]])
    assert torch.equal(rho1_scores(ce_base, ce_ref), torch.tensor([[1.0, -1.0, 0.0]]))
    assert torch.equal(rho1_scores(ce_base, ce_ref, mode="abs"), torch.tensor([[1.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="signed"):
        rho1_scores(ce_base, ce_ref, mode="square")


@pytest.mark.parametrize("skip_ratio", [0.0, 0.3, 0.29, 0.5, 0.9])
def test_tokenskip_drops_floor_of_lowest_and_mean_is_exactly_one(skip_ratio):
    scores, mask = random_batch(3, shape=(4, 25))
    weights = tokenskip(scores, mask, skip_ratio)
    n_valid = int(mask.sum())
    n_drop = math.floor(skip_ratio * n_valid + 1e-9)
    kept = weights[mask] > 0
    assert int((~kept).sum()) == n_drop
    assert torch.all(weights[~mask] == 0)
    assert torch.allclose(weights[mask][kept], torch.tensor(n_valid / (n_valid - n_drop)))
    assert abs(weights[mask].mean().item() - 1.0) < 1e-6
    if n_drop:
        assert scores[mask][~kept].max() <= scores[mask][kept].min()


def test_tokenskip_never_counts_padding():
    scores, mask = random_batch(4, shape=(2, 30))
    expected = tokenskip(scores, mask, 0.3)
    padded_scores = torch.cat([scores, torch.full((2, 20), -1e6)], dim=1)  # very low padding scores
    padded_mask = torch.cat([mask, torch.zeros(2, 20, dtype=torch.bool)], dim=1)
    weights = tokenskip(padded_scores, padded_mask, 0.3)
    assert torch.equal(weights[:, :30], expected)
    assert torch.all(weights[:, 30:] == 0)


def test_tokenskip_edge_cases():
    with pytest.raises(ValueError, match="skip_ratio"):
        tokenskip(torch.zeros(1, 3), torch.ones(1, 3), 1.0)
    assert torch.equal(tokenskip(torch.zeros(1, 3), torch.zeros(1, 3), 0.3), torch.zeros(1, 3))


def test_critic_deltas_matches_definition():
    values, mask = random_batch(5, shape=(2, 9))
    deltas = critic_deltas(values, mask)
    for b in range(2):
        for j in range(9):
            previous = values[b, j - 1] if j > 0 else 0.0
            expected = (values[b, j] - previous) if mask[b, j] else 0.0
            assert torch.isclose(deltas[b, j], torch.as_tensor(expected, dtype=torch.float32), atol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.25, 1.0])
def test_strength_keeps_mean_and_bounds(lam):
    scores, mask = random_batch(6)
    weights = normalize(scores, mask, temperature=0.2)
    mixed = strength(weights, mask, lam)
    assert_weight_invariants(mixed, mask)
    assert torch.allclose(mixed[mask], 1 + lam * (weights[mask] - 1))
    if lam == 0:
        assert torch.equal(mixed, mask.float())
    with pytest.raises(ValueError, match="strength"):
        strength(weights, mask, 1.5)


def test_weights_carry_no_gradient():
    scores, mask = random_batch(7)
    scores.requires_grad_(True)
    for weights in (
        normalize(scores, mask),
        tokenskip(scores, mask),
        critic_deltas(scores, mask),
        strength(scores, mask, 0.5),
        rho1_scores(scores, scores.detach() * 0.5),
    ):
        assert not weights.requires_grad


DRAW = Draw(seed=0, step=1, sample_ids=["a", "b", "c"])  # a control's permutation, for inputs()


def inputs(seed: int):
    scores, mask = random_batch(seed, shape=(3, 30))
    ce_base = scores.abs() + 1.0
    ce_ref = torch.rand(3, 30, generator=torch.Generator().manual_seed(seed)) * 2
    return mask, dict(ce_base=ce_base, ce_ref=ce_ref, deltas=critic_deltas(scores.cumsum(-1), mask))


@pytest.mark.parametrize("algorithm", registry.TRAINED)
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_algorithm_weights_invariants(algorithm, lam):
    mask, extra = inputs(8)
    settings = WeightingSettings(strength=lam)
    weights = algorithm_weights(algorithm, mask, settings, **extra, draw=DRAW)
    skip = registry.method(algorithm).weight_function == "rho1_tokenskip"
    w_max = 1 / (1 - settings.skip_ratio) if skip else settings.w_max
    eps = 1 - lam if skip else settings.eps
    assert_weight_invariants(weights, mask, eps=min(eps, settings.eps), w_max=w_max)


def close(a, b):
    return torch.allclose(a, b, atol=1e-6)


def test_algorithm_weights_use_each_setting():
    mask, extra = inputs(9)
    scores = rho1_scores(extra["ce_base"], extra["ce_ref"])
    settings = WeightingSettings(temperature=0.4, eps=0.1, w_max=2.5, strength=0.6)
    expected = strength(normalize(scores, mask, 0.4, 0.1, 2.5), mask, 0.6)
    assert close(algorithm_weights("rho1-weighted", mask, settings, **extra), expected)
    abs_settings = WeightingSettings(rho1_mode="abs")
    assert close(
        algorithm_weights("rho1-weighted", mask, abs_settings, **extra), normalize(scores.abs(), mask)
    )
    skip = WeightingSettings(skip_ratio=0.5)
    assert close(algorithm_weights("rho1-tokenskip", mask, skip, **extra), tokenskip(scores, mask, 0.5))
    critic = algorithm_weights("critic-wmtp", mask, WeightingSettings(), **extra)
    assert close(critic, normalize(extra["deltas"], mask))
    assert close(algorithm_weights("baseline-mtp", mask, WeightingSettings()), mask.float())


def test_algorithm_weights_errors():
    mask, extra = inputs(10)
    with pytest.raises(ValueError, match="unknown algorithm 'rho2'; allowed: base, baseline-mtp"):
        algorithm_weights("rho2", mask, WeightingSettings())
    with pytest.raises(ValueError, match="'base' is not trained; trained: baseline-mtp"):
        algorithm_weights("base", mask, WeightingSettings())
    with pytest.raises(ValueError, match="ce_ref"):
        algorithm_weights("rho1-weighted", mask, WeightingSettings(), ce_base=extra["ce_base"])
    with pytest.raises(ValueError, match="deltas"):
        algorithm_weights("critic-wmtp", mask, WeightingSettings())
    with pytest.raises(ValueError, match="auto_strength"):
        algorithm_weights("critic-wmtp", mask, WeightingSettings(strength="auto"), **extra)


@pytest.mark.parametrize("rho", [-0.7, 0.0, 0.35, 1.0, 1.4, None])
def test_auto_strength_scales_critic_weights_by_the_gate_statistic(rho):
    """strength: auto = clip(rho, 0, 1), rho the critic's gate statistic: a critic whose
    deltas rank lines no better than chance (rho <= 0, or not measurable) gives exactly
    the baseline's weights, a perfect one (rho >= 1) its full weights, one in between
    the convex mix."""
    from wmtp.stages.value_table import auto_strength

    mask, extra = inputs(11)
    lam = auto_strength(rho)
    auto = algorithm_weights(
        "critic-wmtp", mask, WeightingSettings(strength="auto"), **extra, auto_strength=lam
    )
    full = algorithm_weights("critic-wmtp", mask, WeightingSettings(strength=1.0), **extra)
    assert full[mask].std() > 0.3  # the full weights are far from flat
    if rho is None or rho <= 0:
        assert lam == 0.0 and torch.equal(auto, mask.float())
    elif rho >= 1:
        assert lam == 1.0 and torch.equal(auto, full)
    else:
        assert lam == rho
        assert close(auto[mask], 1 + rho * (full[mask] - 1))
    assert_weight_invariants(auto, mask)
    # an interval that reaches 0 gives 0 whatever rho: not told apart from noise
    assert auto_strength(rho, [0.0, 0.9]) == 0.0


def test_exp_weights_keep_the_scale_of_the_scores():
    """exp(s / beta) scaled to mean 1: small scores give weights near 1 (unlike
    normalize, which z-scores any spread up to the same strength), and the clip
    bounds and mean hold."""
    scores, mask = random_batch(12, shape=(3, 40))
    small = exp_weights(0.01 * scores, mask, beta=1.0)
    assert_weight_invariants(small, mask)
    assert (small[mask] - 1).abs().max() < 0.1
    assert normalize(0.01 * scores, mask)[mask].std() > 0.5
    large = exp_weights(scores, mask, beta=0.2, eps=0.1, w_max=5.0)
    assert_weight_invariants(large, mask, eps=0.1, w_max=5.0)
    valid = mask & (large > 0.1) & (large < 5.0)  # unclipped tokens: ratios are exp(ds / beta)
    i, j = torch.nonzero(valid)[:2]
    ratio = large[tuple(i)] / large[tuple(j)]
    assert float(ratio) == pytest.approx(
        math.exp(float(scores[tuple(i)] - scores[tuple(j)]) / 0.2), rel=1e-4
    )
    settings = WeightingSettings(critic_scores="exp", critic_beta=0.5)
    assert close(
        algorithm_weights("critic-wmtp", mask, settings, deltas=scores),
        exp_weights(scores, mask, 0.5, settings.eps, settings.w_max),
    )


def test_every_trained_method_names_a_weight_function_here():
    """The registry names each trained method's function; it is a module-level
    function of wmtp.core.weights and reads only knobs that exist."""
    knobs = set(WeightingSettings.model_fields)
    for name in registry.TRAINED:
        method = registry.method(name)
        assert callable(getattr(weights_module, method.weight_function)), name
        assert weights_module.weight_function(name) is getattr(weights_module, method.weight_function)
        assert set(method.knobs) <= knobs, name
    assert weights_module.weight_function("ntp") is weights_module.uniform


# ---- controls: the method's own weights, permuted -------------------------------------

WEIGHTED = [name for name in registry.TRAINED if registry.method(name).weighted]
BASE_METHODS = [name for name in WEIGHTED if registry.method(name).control is None]


def test_every_weighted_method_has_a_shuffled_and_a_matched_control():
    """Derived from the method's entry: same weight function, inputs, knobs, heads."""
    assert BASE_METHODS == ["critic-wmtp", "rho1-weighted", "rho1-tokenskip"]
    for name in BASE_METHODS:
        method = registry.method(name)
        for kind in registry.CONTROLS:
            control = registry.method(f"{name}-{kind}")
            assert (control.control, control.control_of) == (kind, name)
            for field in ("weight_function", "heads", "inputs", "knobs", "has_critic", "trained"):
                assert getattr(control, field) == getattr(method, field), (control.name, field)
    for name in ("baseline-mtp", "ntp", "base"):  # uniform or untrained: nothing to permute
        assert not any(row.startswith(f"{name}-") for row in registry.ROWS)
    assert len(registry.TRAINED) == 2 + 3 * len(BASE_METHODS)


def step_inputs(seed: int, rows: int = 6, seq: int = 50):
    """A step's worth of inputs: `rows` sequences with 20..seq valid tokens after a prompt."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, seq, dtype=torch.bool)
    for b in range(rows):
        start = int(torch.randint(1, 10, (1,), generator=generator))
        mask[b, start : start + int(torch.randint(20, seq - 10, (1,), generator=generator))] = True
    scores = torch.randn(rows, seq, generator=generator)
    extra = dict(ce_base=scores.abs() + 1.0, ce_ref=torch.rand(rows, seq, generator=generator) * 2,
                 deltas=critic_deltas(scores.cumsum(-1), mask))  # fmt: skip
    return mask, extra, [f"task-{seed}-{b}" for b in range(rows)]


def sorted_valid(weights, mask) -> torch.Tensor:
    return weights[mask].sort().values


@pytest.mark.parametrize("method", BASE_METHODS)
def test_shuffled_keeps_each_sequences_weights_and_moves_them(method):
    mask, extra, ids = step_inputs(1)
    settings = WeightingSettings(strength=1.0)
    draw = Draw(seed=3, step=7, sample_ids=ids)
    own = algorithm_weights(method, mask, settings, **extra)
    shuffled = algorithm_weights(f"{method}-shuffled", mask, settings, **extra, draw=draw)
    assert_weight_invariants(shuffled, mask, eps=0.0, w_max=1 / (1 - settings.skip_ratio) + 3)
    for b in range(mask.shape[0]):  # the same multiset, sequence by sequence
        assert torch.equal(sorted_valid(shuffled[b], mask[b]), sorted_valid(own[b], mask[b])), b
        assert not torch.equal(shuffled[b], own[b]), f"row {b} not permuted"
    moved = (shuffled != own)[mask].float().mean()  # tokenskip's two values: ~2 * 0.3 * 0.7
    assert moved > (0.3 if method == "rho1-tokenskip" else 0.8), "too few tokens got another weight"
    assert torch.all(shuffled[~mask] == 0)
    assert shuffled[mask].mean().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("method", BASE_METHODS)
def test_matched_keeps_the_steps_weights_and_moves_them_across_sequences(method):
    mask, extra, ids = step_inputs(2)
    settings = WeightingSettings(strength=1.0)
    draw = Draw(seed=3, step=7, sample_ids=ids)
    own = algorithm_weights(method, mask, settings, **extra)
    matched = algorithm_weights(f"{method}-matched", mask, settings, **extra, draw=draw)
    assert torch.equal(sorted_valid(matched, mask), sorted_valid(own, mask))  # the step's multiset
    assert torch.all(matched[~mask] == 0)
    assert matched[mask].mean().item() == pytest.approx(1.0, abs=1e-5)
    assert matched[mask].std().item() == pytest.approx(own[mask].std().item(), rel=1e-6)
    moved = (matched != own)[mask].float().mean()
    assert moved > (0.3 if method == "rho1-tokenskip" else 0.8), "too few tokens got another weight"
    per_row = [torch.equal(sorted_valid(matched[b], mask[b]), sorted_valid(own[b], mask[b]))
               for b in range(mask.shape[0])]  # fmt: skip
    # weights move between sequences, not only within them (tokenskip's two values can
    # leave a sequence as many zeros as it had by chance)
    assert not (all if method == "rho1-tokenskip" else any)(per_row), per_row
    if method == "rho1-tokenskip":  # exactly as many tokens dropped as the method drops
        assert int((matched[mask] == 0).sum()) == int((own[mask] == 0).sum()) > 0


@pytest.mark.parametrize("kind", registry.CONTROLS)
def test_controls_are_a_function_of_seed_step_and_sample_id_only(kind):
    """The same draw gives the same weights (resume, rerun); another step or seed
    another permutation. A shuffled sequence's permutation follows its sample id,
    not its row, so reordering the rows reorders the weights with them."""
    mask, extra, ids = step_inputs(3)
    own = algorithm_weights("rho1-weighted", mask, WeightingSettings(), **extra)

    def control(seed=3, step=7, rows=None, sample_ids=ids):
        rows = list(range(mask.shape[0])) if rows is None else rows
        draw = Draw(seed, step, [sample_ids[r] for r in rows])
        return control_weights(own[rows], mask[rows], kind, draw)

    first = control()
    assert torch.equal(first, control())
    assert not torch.equal(first, control(step=8))
    assert not torch.equal(first, control(seed=4))
    if kind == "shuffled":
        reversed_rows = list(reversed(range(mask.shape[0])))
        assert torch.equal(control(rows=reversed_rows), first[reversed_rows])
        renamed = [f"{i}x" for i in ids]
        assert not torch.equal(control(sample_ids=renamed), first)


def test_control_errors():
    mask, extra, ids = step_inputs(4)
    with pytest.raises(ValueError, match="'rho1-weighted-matched' is a control: it needs the draw"):
        algorithm_weights("rho1-weighted-matched", mask, WeightingSettings(), **extra)
    own = algorithm_weights("rho1-weighted", mask, WeightingSettings(), **extra)
    with pytest.raises(ValueError, match="unknown control 'sorted'; allowed: shuffled, matched"):
        control_weights(own, mask, "sorted", Draw(0, 1, ids))
    with pytest.raises(ValueError, match="5 sample ids for a batch of 6 rows"):
        control_weights(own, mask, "shuffled", Draw(0, 1, ids[:5]))
