"""Mutants of a reference solution: matched negatives for the critic.

A critic that only sees the base model's samples and the reference solutions
learns whatever tells those two apart; when the base model solves nothing, that
is style (the reference starts with `def`, the samples do not; references carry
comments, samples do not), not which tokens make code correct. Its deltas on
the references, the only text training weights, are then artifacts: on the
tiny default, the first token of every function name got a delta of -0.28 and
half the weight of other tokens, and the fine-tuned model miscopied names.

A mutant is the reference with one code token changed: a number, an operator,
or one occurrence of an identifier. It shares everything else with the
reference (length, comments, layout), so the only thing that can tell the
critic its reward (executed like any rollout) is the changed token; the value
then has to drop exactly where a solution goes wrong, and the deltas on the
reference itself land on the tokens that decide whether it passes.
"""

from __future__ import annotations

import builtins
import io
import keyword
import random
import tokenize

# Operator swaps that keep the program syntactically valid.
OPERATORS = {
    "+": "-",
    "-": "+",
    "*": "+",
    "//": "%",
    "%": "//",
    "/": "*",
    "<": ">",
    ">": "<",
    "<=": ">",
    ">=": "<",
    "==": "!=",
    "!=": "==",
    "+=": "-=",
    "-=": "+=",
}
_RESERVED = set(keyword.kwlist) | set(dir(builtins)) | {"self"}


def _candidates(code: str) -> list[tokenize.TokenInfo]:
    """The tokens a mutant may change (never a comment, string or keyword)."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, SyntaxError):
        return []
    if any(t.type == tokenize.ERRORTOKEN and t.string.strip() for t in tokens):
        return []  # not clean Python (e.g. an unterminated string): its tokens mean nothing
    keep = []
    for token in tokens:
        if token.type == tokenize.NUMBER and token.string.isdigit():
            keep.append(token)
        elif token.type == tokenize.OP and token.string in OPERATORS:
            keep.append(token)
        elif token.type == tokenize.NAME and token.string not in _RESERVED:
            keep.append(token)
    return keep


def _replacement(token: tokenize.TokenInfo, names: list[str], rng: random.Random) -> str:
    if token.type == tokenize.NUMBER:
        value = int(token.string)
        return str(value + rng.choice([d for d in (-2, -1, 1, 2, 3) if value + d >= 0]))
    if token.type == tokenize.OP:
        return OPERATORS[token.string]
    others = [n for n in names if n != token.string]
    return rng.choice(others) if others and rng.random() < 0.5 else token.string + rng.choice("xs")


def mutants(code: str, n: int, rng: random.Random) -> list[str]:
    """Up to `n` distinct mutants of `code`, each with one token changed (fewer if
    the code has few changeable tokens; none if it does not tokenize as Python)."""
    candidates = _candidates(code)
    if not candidates:
        return []
    lines = code.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    names = sorted({t.string for t in candidates if t.type == tokenize.NAME})
    out: list[str] = []
    for _ in range(4 * n):
        if len(out) == n:
            break
        token = rng.choice(candidates)
        begin = starts[token.start[0] - 1] + token.start[1]
        end = starts[token.end[0] - 1] + token.end[1]
        mutant = code[:begin] + _replacement(token, names, rng) + code[end:]
        if mutant != code and mutant not in out:
            out.append(mutant)
    return out
