"""Evaluation metrics: pass@k, MBPP exact match."""

from __future__ import annotations

import ast
import io
import re
import tokenize

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with n samples of which c passed (Chen et al.
    2021): 1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i),
    which never forms the huge binomials. 1.0 when every size-k subset holds a pass
    (n - c < k)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} is undefined with only n={n} samples")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """Drop docstrings (a leading string expression of a module, class or function)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return tree


def _without_comments(code: str) -> str:
    try:
        tokens = tokenize.generate_tokens(io.StringIO(code).readline)
        return tokenize.untokenize(t for t in tokens if t.type != tokenize.COMMENT)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return re.sub(r"#[^\n]*", "", code)


def normalise_code(code: str) -> str:
    """Canonical form for exact match: the AST dump without docstrings (comments and
    formatting vanish in parsing); unparsable code falls back to its text without
    comments, whitespace collapsed."""
    code = code.replace("\r\n", "\n").strip()
    try:
        return ast.dump(_strip_docstrings(ast.parse(code)))
    except SyntaxError:
        return " ".join(_without_comments(code).split())


def exact_match(code: str, reference: str) -> bool:
    """MBPP exact match: the completion equals the reference up to formatting,
    comments and docstrings."""
    return normalise_code(code) == normalise_code(reference)
