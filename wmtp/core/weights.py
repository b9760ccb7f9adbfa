"""Token-importance scores -> per-token loss weights.

Every tensor is `(B, S)` and indexed by the TARGET token j: `w[b, j]` weights
every head that predicts `x[b, j]`. `mask[b, j]` marks valid targets (solution
tokens and EOS); prompt and padding positions always get weight 0 and are never
counted in any statistic (mean, z-score, skip threshold).

Weights have mean 1 over the valid tokens of the batch, so a weighted loss stays
on the scale of plain cross-entropy, and they never carry gradient: every
function runs under `torch.no_grad()` on detached inputs and returns float32.
The trainer calls them once per optimizer step on the whole step (every rank,
every accumulation micro-batch, in a canonical order: `wmtp.core.step_weights`),
so "the batch" here is the optimizer step and a token's weight does not depend on
how the step is split.

A method's entry in `wmtp.config.registry` names its weight function here (a
module-level function `fn(mask, settings, *, ce_base, ce_ref, deltas)`), so
adding a method adds a function, not a branch; `algorithm_weights` looks it up
and adds the recipe's weight strength on top, and for a control row
(`<method>-shuffled`, `<method>-matched`) permutes the result (`control_weights`).
Strength `auto` (a method with a critic) is resolved by the caller from the
critic's gate statistic (wmtp.stages.critic_gate, wmtp.stages.value_table.auto_strength) and
passed in as a number.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from wmtp.config import registry
from wmtp.config.schema import WeightingSettings

WEIGHT_DTYPE = torch.float32
_SCALE_SEARCH_STEPS = 100  # bisection steps on log(c): the bracket (< 2000 wide) shrinks below 1e-26


def _check(scores: torch.Tensor, mask: torch.Tensor, name: str = "scores") -> torch.Tensor:
    """Validate shapes and return the mask as bool. Scores at invalid positions may
    be anything (NaN included); at valid ones they must be finite."""
    if scores.shape != mask.shape:
        raise ValueError(f"{name} {tuple(scores.shape)} and mask {tuple(mask.shape)} must have the same shape")
    mask = mask.detach().bool()
    if not torch.isfinite(scores.detach()[mask]).all():
        raise ValueError(f"{name} must be finite at every valid (mask=True) position")
    return mask


@torch.no_grad()
def normalize(
    scores: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 0.7,
    eps: float = 0.05,
    w_max: float = 3.0,
) -> torch.Tensor:
    """z-score over the batch's valid tokens -> softmax(z / T) -> mean 1 -> clip to [eps, w_max].

    "Rescale to mean 1 and clip, repeat until both hold" has a fixed point, reached
    here in one step: the weights are `clip(c * p, eps, w_max)`
    with `p = n * softmax(z / T)` and the single scale `c` for which their mean is
    1 (to float64 resolution). Unlike alternating rescale/clip, this keeps every unclipped
    token proportional to its softmax mass instead of flattening the ones first
    clipped to eps. Non-decreasing in the score; a positive affine change of the
    scores leaves z, hence the weights, unchanged. All-equal scores (zero std) and
    a single valid token give all ones; no valid token gives all zeros.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def logits(s: torch.Tensor) -> torch.Tensor:  # (n,) -> (n,)
        std = s.std(unbiased=False)
        return ((s - s.mean()) / std if std > 0 else torch.zeros_like(s)) / temperature

    return _softmax_weights(scores, mask, logits, eps, w_max)


@torch.no_grad()
def exp_weights(
    scores: torch.Tensor, mask: torch.Tensor, beta: float = 1.0, eps: float = 0.05, w_max: float = 3.0
) -> torch.Tensor:
    """exp(s / beta) over the batch's valid tokens, scaled to mean 1 and clipped to
    [eps, w_max] (the same one-scale fixed point as `normalize`).

    Unlike `normalize` the scores are not z-scored, so their scale counts: scores
    much smaller than beta give weights near 1 (a critic whose deltas are small
    hardly reweights), a score beta above another gives e times its weight.
    All-equal scores give all ones; no valid token gives all zeros."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return _softmax_weights(scores, mask, lambda s: s / beta, eps, w_max)


def _softmax_weights(
    scores: torch.Tensor,
    mask: torch.Tensor,
    logits: Callable[[torch.Tensor], torch.Tensor],
    eps: float,
    w_max: float,
) -> torch.Tensor:
    """n * softmax(logits(valid scores)) (mean 1), clipped to [eps, w_max] at mean 1;
    0 off the mask, all zeros when no token is valid."""
    if not 0 <= eps <= 1 <= w_max:
        raise ValueError(f"need 0 <= eps <= 1 <= w_max for a mean of 1, got eps={eps}, w_max={w_max}")
    mask = _check(scores, mask)
    weights = torch.zeros(scores.shape, dtype=WEIGHT_DTYPE, device=scores.device)
    n = int(mask.sum())
    if n == 0:
        return weights
    p = n * torch.softmax(logits(scores.detach()[mask].double()), dim=0)  # (n,) mean 1
    weights[mask] = _clip_to_mean_one(p, eps, w_max).to(WEIGHT_DTYPE)
    return weights


def _clip_to_mean_one(p: torch.Tensor, eps: float, w_max: float) -> torch.Tensor:
    """`clip(c * p, eps, w_max)` with the c > 0 that makes its mean 1 (p >= 0, float64).

    mean(clip(c p)) is continuous and non-decreasing in c, from eps (c -> 0) to
    w_max (c -> inf), so such a c exists whenever eps <= 1 <= w_max; bisection on
    log c over a bracket that surely contains it pins it to float64 resolution."""
    positive = p[p > 0]
    lo = math.log(max(eps, 1e-300) / positive.max().item()) - 1.0  # every weight <= eps: mean <= 1
    hi = math.log(w_max / positive.min().item()) + 1.0  # every weight >= w_max: mean >= 1
    for _ in range(_SCALE_SEARCH_STEPS):
        mid = 0.5 * (lo + hi)
        if (p * math.exp(mid)).clamp(eps, w_max).mean() < 1.0:
            lo = mid
        else:
            hi = mid
    return (p * math.exp(0.5 * (lo + hi))).clamp(eps, w_max)


def rho1_scores(ce_base: torch.Tensor, ce_ref: torch.Tensor, mode: str = "signed") -> torch.Tensor:
    """Rho-1's excess loss `ce_base - ce_ref` per target token (`mode="abs"`: its
    absolute value). High score = the model still does worse than the reference
    on a token the reference finds learnable, so that token deserves weight."""
    if ce_base.shape != ce_ref.shape:
        raise ValueError(f"ce_base {tuple(ce_base.shape)} and ce_ref {tuple(ce_ref.shape)} must have the same shape")
    excess = ce_base.detach() - ce_ref.detach()
    if mode == "signed":
        return excess
    if mode == "abs":
        return excess.abs()
    raise ValueError(f"unknown rho1 mode {mode!r}; allowed: 'signed', 'abs'")


@torch.no_grad()
def tokenskip(scores: torch.Tensor, mask: torch.Tensor, skip_ratio: float = 0.3) -> torch.Tensor:
    """Drop the floor(skip_ratio * n_valid) lowest-scoring valid tokens of the batch;
    the kept ones get n_valid / n_kept so the mean over valid tokens is 1.

    Only valid tokens are ranked (a threshold that counted padding would drop a
    batch-dependent share of real tokens); ties are broken by position so the
    result is deterministic."""
    if not 0 <= skip_ratio < 1:
        raise ValueError(f"skip_ratio must be in [0, 1), got {skip_ratio}")
    mask = _check(scores, mask)
    weights = torch.zeros(scores.shape, dtype=WEIGHT_DTYPE, device=scores.device)
    n = int(mask.sum())
    if n == 0:
        return weights
    # The tiny epsilon keeps float products like 0.29 * 100 = 28.999... from losing a token.
    n_drop = math.floor(skip_ratio * n + 1e-9)
    s = scores.detach()[mask].double()  # (n,)
    order = torch.argsort(s, stable=True)
    kept = torch.ones(n, dtype=WEIGHT_DTYPE, device=scores.device)
    kept[order[:n_drop]] = 0.0
    weights[mask] = kept * (n / (n - n_drop))
    return weights


@torch.no_grad()
def critic_deltas(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """delta_j = V_j - V_{j-1} along the sequence (V_{-1} = 0), 0 where mask is false.

    V_j is the value after seeing x_<=j, so delta_j is how much token j moved the
    expected reward: the critic's score of token j. For the first solution token
    V_{j-1} is V(s0), the value after the prompt, which the critic is trained on.
    (The critic stage writes these deltas into its value table, wmtp.stages.value_table;
    the trainer only reads them.)"""
    mask = _check(values, mask, name="values")
    v = values.detach().to(WEIGHT_DTYPE)  # (B, S)
    previous = torch.nn.functional.pad(v[..., :-1], (1, 0))  # (B, S): V_{j-1}, 0 at j = 0
    return torch.where(mask, v - previous, torch.zeros_like(v))


@torch.no_grad()
def strength(weights: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """w <- 1 + lam * (w - 1) on valid tokens, 0 elsewhere; lam in [0, 1].

    A convex mix of the weights and all-ones, so the mean stays 1 and the bounds
    [eps, w_max] (which contain 1) still hold. lam = 0 is baseline MTP."""
    if not 0 <= lam <= 1:
        raise ValueError(f"weight strength must be in [0, 1], got {lam}")
    mask = _check(weights, mask, name="weights")
    w = weights.detach().to(WEIGHT_DTYPE)
    return torch.where(mask, 1.0 + lam * (w - 1.0), torch.zeros_like(w))


class MissingInput(ValueError):
    """A weight function was called without a tensor its method reads;
    `algorithm_weights` names the method in the message."""

    def __init__(self, name: str) -> None:
        super().__init__(f"needs {name}")
        self.name = name


def _require(name: str, tensor: torch.Tensor | None) -> torch.Tensor:
    if tensor is None:
        raise MissingInput(name)
    return tensor


# The weight functions the registry names: fn(mask, settings, *, ce_base, ce_ref,
# deltas) -> (B, S) weights before the strength mix.


def uniform(mask, settings, *, ce_base=None, ce_ref=None, deltas=None) -> torch.Tensor:
    """1 on every valid token: plain (multi-token) cross-entropy."""
    return mask.detach().bool().to(WEIGHT_DTYPE)


def rho1_weighted(mask, settings, *, ce_base=None, ce_ref=None, deltas=None) -> torch.Tensor:
    """normalise(Rho-1 excess loss)."""
    scores = rho1_scores(_require("ce_base", ce_base), _require("ce_ref", ce_ref), mode=settings.rho1_mode)
    return normalize(scores, mask, settings.temperature, settings.eps, settings.w_max)


def rho1_tokenskip(mask, settings, *, ce_base=None, ce_ref=None, deltas=None) -> torch.Tensor:
    """Drop the lowest-scored share of the batch's tokens by Rho-1 excess loss."""
    scores = rho1_scores(_require("ce_base", ce_base), _require("ce_ref", ce_ref), mode=settings.rho1_mode)
    return tokenskip(scores, mask, settings.skip_ratio)


def critic(mask, settings, *, ce_base=None, ce_ref=None, deltas=None) -> torch.Tensor:
    """The critic's deltas V(j) - V(j-1) through normalise() or exp()."""
    scores = _require("deltas", deltas)
    if settings.critic_scores == "exp":
        return exp_weights(scores, mask, settings.critic_beta, settings.eps, settings.w_max)
    return normalize(scores, mask, settings.temperature, settings.eps, settings.w_max)


def weight_function(algorithm: str) -> Callable[..., torch.Tensor]:
    """The weight function `algorithm`'s registry entry names (a ValueError for an
    unknown or untrained row, or a name this module lacks)."""
    name = registry.method(algorithm).weight_function
    if name is None:
        raise ValueError(f"algorithm {algorithm!r} is not trained; trained: {', '.join(registry.TRAINED)}")
    function = globals().get(name)
    if not callable(function):
        raise ValueError(f"algorithm {algorithm!r}: wmtp.core.weights has no weight function {name!r}")
    return function


@dataclass(frozen=True)
class Draw:
    """What a control row's permutation is a function of: the training seed, the
    optimizer step (1-based) and the sample id of each row of the `(B, S)` batch.
    Nothing else (not the rank, the micro-batch or the process count), so a resumed
    or rerun training draws the same permutation and a control is split-invariant
    like its method."""

    seed: int
    step: int
    sample_ids: Sequence[str]


def _generator(*key: object) -> torch.Generator:
    """A CPU generator seeded by a hash of `key` (not Python's `hash`, which changes
    from process to process)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.no_grad()
def control_weights(weights: torch.Tensor, mask: torch.Tensor, kind: str, draw: Draw) -> torch.Tensor:
    """A method's `(B, S)` weights with the information of which token gets which
    weight removed, its values kept exactly.

    `shuffled`: each sequence's valid weights permuted among its own valid tokens
    (a permutation seeded by (seed, step, sample id)): every sequence keeps its own
    multiset of weights, hence its total weight, so what is tested is which token
    within the sequence is chosen.

    `matched`: all valid weights of the batch (the whole optimizer step, rows in
    the canonical order of `wmtp.core.step_weights`) permuted across all its valid
    tokens (seeded by (seed, step)). Weights "drawn at random from the step's own
    weight values", by a permutation rather than independent draws: the step's
    multiset of weights, so its mean (1), its spread, its clipped share and (for
    tokenskip) the exact number of dropped tokens, stay the method's, where draws
    with replacement would move each by chance. Unlike `shuffled`, weight also
    moves between sequences.

    Either way the mean over valid tokens stays 1 and the weights stay 0 off the mask.
    """
    mask = _check(weights, mask, name="weights")
    if len(draw.sample_ids) != mask.shape[0]:
        raise ValueError(f"{len(draw.sample_ids)} sample ids for a batch of {mask.shape[0]} rows")
    w = weights.detach().to(WEIGHT_DTYPE)
    out = torch.zeros_like(w)
    if kind == "shuffled":
        for b, sample_id in enumerate(draw.sample_ids):
            row = w[b][mask[b]]  # (n_b,)
            order = torch.randperm(row.numel(), generator=_generator(draw.seed, draw.step, sample_id))
            out[b][mask[b]] = row[order.to(row.device)]
        return out
    if kind == "matched":
        values = w[mask]  # (n,) row-major: the canonical order of the rows
        order = torch.randperm(values.numel(), generator=_generator(draw.seed, draw.step))
        out[mask] = values[order.to(values.device)]
        return out
    raise ValueError(f"unknown control {kind!r}; allowed: {', '.join(registry.CONTROLS)}")


@torch.no_grad()
def algorithm_weights(
    algorithm: str,
    mask: torch.Tensor,
    settings: WeightingSettings,
    *,
    ce_base: torch.Tensor | None = None,
    ce_ref: torch.Tensor | None = None,
    deltas: torch.Tensor | None = None,
    auto_strength: float | None = None,
    draw: Draw | None = None,
) -> torch.Tensor:
    """The `(B, S)` weights of `algorithm`, with `settings.strength` applied.

    A method reading the refce table needs `ce_base` (the model's head-0 CE per
    target token, detached) and `ce_ref`; one reading a value table needs the
    critic's `deltas` per target token; a uniform one needs none. `auto_strength` is
    the number that `settings.strength == "auto"` stands for (required then,
    ignored otherwise). A control row needs the `draw` its permutation is seeded by
    (ignored for any other row) and gets its method's weights, permuted
    (`control_weights`)."""
    function = weight_function(algorithm)
    control = registry.method(algorithm).control
    if control is not None and draw is None:
        raise ValueError(f"algorithm {algorithm!r} is a control: it needs the draw (seed, step, sample ids)")
    lam = settings.strength
    if lam == "auto":
        if auto_strength is None:
            raise ValueError("weighting.strength = 'auto' needs the critic's strength (auto_strength)")
        lam = auto_strength
    try:
        weights = function(mask, settings, ce_base=ce_base, ce_ref=ce_ref, deltas=deltas)
    except MissingInput as missing:
        raise ValueError(f"algorithm {algorithm!r} needs {missing.name}") from None
    weights = strength(weights, mask, lam)
    return weights if control is None else control_weights(weights, mask, control, draw)
