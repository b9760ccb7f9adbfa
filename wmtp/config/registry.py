"""Every row of the table in one plain table: what it trains and what it needs.

A row is a method name. For each, this table says whether it is trained, which
heads it trains, which stage outputs its training reads besides the base model
and the training split, which `weighting:` knobs it reads, and the name of its
weight function in `wmtp.core.weights`. The workflow's rules, config validation,
the command line, the trainer and the report all read it, so adding a method is
one entry here, one weight function and one recipe (README: "Add a weighting
method").

Every weighted method (one whose weight function is not `uniform`) also has two
control rows, derived here from its entry so nothing is kept in sync by hand:
`<method>-shuffled` (its own weights permuted among the valid tokens of each
sequence) and `<method>-matched` (its own weights permuted across all valid tokens
of the optimizer step). They read the same inputs and knobs and train the same
heads; the permutation is `wmtp.core.weights.control_weights`. A control keeps the
method's mean and spread and removes which token gets which weight, so a method
that beats its controls owes that to the choice of tokens, not to reweighting as such.

Standard library only: the config and the Snakefile import it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

# Stage outputs a training may read besides the base model and the training split:
# the reference model's per-token CE table (refce stage) and the critic's value
# table of its seed (critic stage).
StageInput = Literal["refce", "values"]
# The controls of a weighted method (wmtp.core.weights.control_weights).
Control = Literal["shuffled", "matched"]
CONTROLS: tuple[Control, ...] = ("shuffled", "matched")


@dataclass(frozen=True)
class Method:
    """One row of the table."""

    name: str
    weight_function: str | None = None  # name in wmtp.core.weights; None: not trained
    heads: int | None = None  # heads trained, counted from head 0; None: all of the model's
    inputs: tuple[StageInput, ...] = ()
    knobs: tuple[str, ...] = ()  # the weighting knobs it reads
    control: Control | None = None  # a control row: `control_of`'s weights, permuted
    control_of: str | None = None  # the method whose weights a control row permutes

    @property
    def trained(self) -> bool:
        return self.weight_function is not None

    @property
    def weighted(self) -> bool:
        """Trained with weights that differ from token to token: the methods that
        have control rows (and whose weights are statistics of the optimizer step)."""
        return self.trained and self.weight_function != "uniform"

    @property
    def has_critic(self) -> bool:
        """Reads a critic's value table: its recipe carries a `critic:` section, and
        `strength: auto` (the critic's gate statistic) is defined for it."""
        return "values" in self.inputs


_NORMALISE = ("temperature", "eps", "w_max", "strength")
_RHO1 = ("rho1_mode", "rho1_base")

# The methods as written; METHODS adds each weighted one's control rows after it.
_WRITTEN: dict[str, Method] = {
    method.name: method
    for method in (
        Method("base"),  # not trained: the downloaded base model, evaluated as it is
        Method("baseline-mtp", "uniform"),
        Method(
            "critic-wmtp",
            "critic",
            inputs=("values",),
            knobs=(*_NORMALISE, "critic_scores", "critic_beta"),
        ),
        Method(
            "rho1-weighted",
            "rho1_weighted",
            inputs=("refce",),
            knobs=(*_NORMALISE, *_RHO1),
        ),
        Method(
            "rho1-tokenskip",
            "rho1_tokenskip",
            inputs=("refce",),
            knobs=("strength", *_RHO1, "skip_ratio"),
        ),
        Method("ntp", "uniform", heads=1),  # next-token fine-tuning: head 0 alone
    )
}


def controls(method: Method) -> tuple[Method, ...]:
    """The control rows of a weighted method: its entry with the control kind set
    (none for an untrained or uniform one)."""
    if not method.weighted or method.control is not None:
        return ()
    return tuple(
        replace(method, name=f"{method.name}-{kind}", control=kind, control_of=method.name)
        for kind in CONTROLS
    )


# Each method followed by its controls (the order of the rows everywhere).
METHODS: dict[str, Method] = {
    row.name: row for method in _WRITTEN.values() for row in (method, *controls(method))
}

BASE_ROW = "base"  # the untrained row
BASELINE = "baseline-mtp"  # the row every Δ of the report is taken against
ROWS: tuple[str, ...] = tuple(METHODS)
TRAINED: tuple[str, ...] = tuple(name for name, method in METHODS.items() if method.trained)


def method(name: str) -> Method:
    """The registry entry of `name`, or a ValueError listing the known rows."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; allowed: {', '.join(METHODS)}") from None


def trained_heads(name: str, n_heads: int) -> int:
    """Heads 0..n-1 that method `name` trains out of a model's `n_heads`."""
    heads = method(name).heads
    return n_heads if heads is None else min(heads, n_heads)


def needs(name: str, stage_input: StageInput) -> bool:
    """Whether method `name`'s training reads `stage_input`."""
    return stage_input in method(name).inputs
