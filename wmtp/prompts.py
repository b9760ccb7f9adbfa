"""Prompt formats shared by training and evaluation.

Training and evaluation must format a problem identically, or fine-tuning
teaches a format that evaluation never shows. Everything that turns an MBPP-style
problem into model text lives here.
"""

from __future__ import annotations

# Generation stops at any of these (or EOS): the model has finished the function
# and starts writing tests, a new docstring or a main block.
STOP_SEQUENCES: tuple[str, ...] = ('\n"""', "\nassert", "\nif __name__", "\nprint(", "\n# Test", "\n\n\n")


def mbpp_prompt(text: str, first_test: str) -> str:
    """MBPP prompt: the problem statement and the first test in a docstring, so the
    model knows the function name and signature (Austin et al. 2021, DESIGN.md 5)."""
    return f'"""\n{text.strip()}\n{first_test.strip()}\n"""\n'


def mbpp_solution(code: str) -> str:
    """The training target for an MBPP row: its reference code, newline-terminated
    (EOS is appended by the tokenising code)."""
    return code.replace("\r\n", "\n").strip("\n") + "\n"


def truncate_at_stop(completion: str, stops: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """Cut a completion at the earliest stop sequence (the stop text is dropped)."""
    cut = len(completion)
    for stop in stops:
        index = completion.find(stop)
        if index != -1:
            cut = min(cut, index)
    return completion[:cut]
