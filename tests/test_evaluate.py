"""Metrics against hand-computed values, and the evaluation loop without a model."""

from __future__ import annotations

import math

import pytest

from wmtp.evaluate import exact_match, pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (10, 0, 1, 0.0),
        (10, 3, 1, 0.3),  # pass@1 is the pass fraction
        (10, 10, 10, 1.0),
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (4, 2, 3, 1.0),  # n - c < k: every 3-subset holds a pass
        (200, 1, 100, 0.5),
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_binomials_and_rejects_bad_input():
    for n, c, k in [(20, 5, 3), (50, 7, 10), (9, 1, 8)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)


def test_exact_match_ignores_formatting_comments_and_docstrings():
    reference = "def f(a, b):\r\n    return a + b"
    assert exact_match('def f(a,b):\n    """Add."""\n    # sum\n    return (a + b)\n', reference)
    assert not exact_match("def f(a, b):\n    return b + a\n", reference)
    assert not exact_match("def g(a, b):\n    return a + b\n", reference)


def test_exact_match_falls_back_to_text_when_unparsable():
    broken = "def f(a, b)\n    return a +   b  # comment"
    assert exact_match(broken, "def f(a, b)\n  return a + b")
    assert not exact_match(broken, "def f(a, b)\n  return a - b")
