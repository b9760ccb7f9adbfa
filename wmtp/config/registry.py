"""Every row of the table in one plain table: what it trains and what it needs.

A row is a method name. For each, this table says whether it is trained, which
heads it trains, which stage outputs its training reads besides the base model
and the training split, which `weighting:` knobs it reads, and the name of its
weight function in `wmtp.core.weights`. The workflow's rules, config validation,
the command line, the trainer and the report all read it, so adding a method is
one entry here, one weight function and one recipe (README: "Add a weighting
method").

Standard library only: the config and the Snakefile import it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Stage outputs a training may read besides the base model and the training split:
# the reference model's per-token CE table (refce stage) and the critic's value
# table of its seed (critic stage).
StageInput = Literal["refce", "values"]


@dataclass(frozen=True)
class Method:
    """One row of the table."""

    name: str
    weight_function: str | None = None  # name in wmtp.core.weights; None: not trained
    heads: int | None = None  # heads trained, counted from head 0; None: all of the model's
    inputs: tuple[StageInput, ...] = ()
    knobs: tuple[str, ...] = ()  # the weighting knobs it reads

    @property
    def trained(self) -> bool:
        return self.weight_function is not None

    @property
    def has_critic(self) -> bool:
        """Reads a critic's value table: its recipe carries a `critic:` section, and
        `strength: auto` (the critic's explained variance) is defined for it."""
        return "values" in self.inputs


_NORMALISE = ("temperature", "eps", "w_max", "strength")
_RHO1 = ("rho1_mode", "rho1_base")

METHODS: dict[str, Method] = {
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
