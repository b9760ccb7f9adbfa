"""`tiny-mbpp`: a program-synthesis benchmark in MBPP's format, generated on the machine.

Problems are instances of ~30 families of small Python functions (arithmetic with
constants, string and list operations, conditionals, loops). Each instance draws
its constant, function name, parameter name, phrasing and test inputs from a
seeded `random.Random`, so the test split holds new instances of the families
seen in training, never copies. Tests are asserts whose expected values come from
running the reference solution, and the generator re-runs every solution against
its asserts before returning (correct by construction, checked anyway).

Training solutions carry noisy comments (random words, one chance per line):
tokens that are unpredictable and useless for solving the problem, the kind a
token weighting should learn to down-weight. Test references are clean.

Everything is a pure function of the seed: no hash randomisation, no set order.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from wmtp.data.prompts import mbpp_prompt, mbpp_solution
from wmtp.infra.atomic import atomic_file

MBPP_COLUMNS = ("task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list")

# Words of the noisy comments and of string test inputs. A fixed tuple: the
# benchmark must not depend on anything installed on the machine.
WORDS = (
    "apple river stone cloud paper green quick silver window garden music yellow "
    "orange pencil summer winter bridge candle dragon forest guitar island jacket "
    "kettle lemon marble needle ocean pepper rabbit saddle tiger velvet wagon "
    "anchor basket cactus dollar engine feather glove hammer igloo jungle koala "
    "ladder mirror napkin oyster puzzle quartz rocket spoon tunnel umbrella violin "
    "walnut yogurt zebra banana carpet donkey eagle falcon ginger harbor "
    "maybe later again never often still though whatever somehow anyway"
).split()
INT_PARAMS = ("n", "x", "num", "a", "value", "k")
LIST_PARAMS = ("nums", "xs", "lst", "items", "arr", "values")
STR_PARAMS = ("s", "text", "word", "string", "st")
SUFFIXES = ("", "", "", "_fn", "_func", "_value", "_it", "_val")


@dataclass(frozen=True)
class Problem:
    """One generated problem before its tests are computed."""

    family: str
    text: str
    code: str
    name: str
    inputs: tuple[tuple, ...]  # argument tuples; three of them become the asserts


def _ints(rng: random.Random, lo: int = -20, hi: int = 50) -> tuple[tuple, ...]:
    return tuple((rng.randint(lo, hi),) for _ in range(3))


def _lists(rng: random.Random, lo: int = -9, hi: int = 20) -> tuple[tuple, ...]:
    return tuple(([rng.randint(lo, hi) for _ in range(rng.randint(2, 6))],) for _ in range(3))


def _strs(rng: random.Random) -> tuple[tuple, ...]:
    return tuple((rng.choice(WORDS),) for _ in range(3))


def _name(rng: random.Random, stems: tuple[str, ...]) -> str:
    return rng.choice(stems) + rng.choice(SUFFIXES)


def _int_fn(stems, texts, body, lo=2, hi=19, inputs=_ints) -> Callable[[random.Random], tuple]:
    """A family `f(x) -> expression of x and a constant c`; `body` formats with p and c."""

    def make(rng: random.Random) -> tuple:
        c, p = rng.randint(lo, hi), rng.choice(INT_PARAMS)
        code = f"def {{name}}({p}):\n    return {body.format(p=p, c=c)}\n"
        return rng.choice(texts).format(c=c), code, _name(rng, stems), inputs(rng)

    return make


def _plain_fn(stems, texts, params, lines, inputs) -> Callable[[random.Random], tuple]:
    """A family without a constant; `lines` is the body with `{p}` for the parameter."""

    def make(rng: random.Random) -> tuple:
        p = rng.choice(params)
        body = "".join(f"    {line.format(p=p)}\n" for line in lines)
        return rng.choice(texts), f"def {{name}}({p}):\n{body}", _name(rng, stems), inputs(rng)

    return make


def _const_fn(stems, texts, params, lines, inputs, lo=2, hi=9) -> Callable[[random.Random], tuple]:
    """A family with a constant c in a multi-line body (`{p}` and `{c}` placeholders)."""

    def make(rng: random.Random) -> tuple:
        c, p = rng.randint(lo, hi), rng.choice(params)
        body = "".join(f"    {line.format(p=p, c=c)}\n" for line in lines)
        return (
            rng.choice(texts).format(c=c),
            f"def {{name}}({p}):\n{body}",
            _name(rng, stems),
            inputs(rng),
        )

    return make


def _char_fn(stems, texts, lines) -> Callable[[random.Random], tuple]:
    """A string family parametrised by a letter ch."""

    def make(rng: random.Random) -> tuple:
        ch, p = rng.choice("aeinorst"), rng.choice(STR_PARAMS)
        body = "".join(f"    {line.format(p=p, ch=ch)}\n" for line in lines)
        return (
            rng.choice(texts).format(ch=ch),
            f"def {{name}}({p}):\n{body}",
            _name(rng, stems),
            _strs(rng),
        )

    return make


FAMILIES: dict[str, Callable[[random.Random], tuple]] = {
    "add": _int_fn(
        ("add_const", "plus", "add_to", "increase"),
        (
            "Write a function to add {c} to a number.",
            "Write a function that returns a number plus {c}.",
        ),
        "{p} + {c}",
    ),
    "sub": _int_fn(
        ("sub_const", "minus", "subtract", "decrease"),
        (
            "Write a function to subtract {c} from a number.",
            "Write a function that returns a number minus {c}.",
        ),
        "{p} - {c}",
    ),
    "mul": _int_fn(
        ("multiply", "times", "scale", "mul_const"),
        (
            "Write a function to multiply a number by {c}.",
            "Write a function that returns {c} times a number.",
        ),
        "{p} * {c}",
    ),
    "mod": _int_fn(
        ("remainder", "mod_const", "modulo", "rest"),
        ("Write a function to find the remainder of a number divided by {c}.",),
        "{p} % {c}",
        lo=2,
        hi=11,
        inputs=lambda r: _ints(r, 0, 99),
    ),
    "divisible": _int_fn(
        ("is_divisible", "divides", "check_divisible", "is_multiple"),
        ("Write a function to check whether a number is divisible by {c}.",),
        "{p} % {c} == 0",
        lo=2,
        hi=9,
        inputs=lambda r: _ints(r, 0, 60),
    ),
    "greater": _int_fn(
        ("is_greater", "above", "check_greater", "exceeds"),
        ("Write a function to check whether a number is greater than {c}.",),
        "{p} > {c}",
        lo=-5,
        hi=30,
    ),
    "affine": _int_fn(
        ("linear", "affine", "double_plus", "transform"),
        ("Write a function to multiply a number by {c} and add one.",),
        "{p} * {c} + 1",
    ),
    "square": _plain_fn(
        ("square", "sq", "square_num", "power_two"),
        ("Write a function to find the square of a number.",),
        INT_PARAMS,
        ("return {p} * {p}",),
        _ints,
    ),
    "absolute": _plain_fn(
        ("absolute", "abs_value", "magnitude", "distance_zero"),
        ("Write a function to find the absolute value of a number.",),
        INT_PARAMS,
        ("if {p} < 0:", "    return -{p}", "return {p}"),
        _ints,
    ),
    "sum_to": _plain_fn(
        ("sum_to", "sum_upto", "triangle", "total_upto"),
        ("Write a function to find the sum of the numbers from 1 to n.",),
        INT_PARAMS,
        ("total = 0", "for i in range(1, {p} + 1):", "    total += i", "return total"),
        lambda r: _ints(r, 0, 30),
    ),
    "sign": _plain_fn(
        ("sign", "sign_word", "describe_sign", "classify"),
        ("Write a function to return 'positive', 'negative' or 'zero' for a number.",),
        INT_PARAMS,
        (
            "if {p} > 0:",
            "    return 'positive'",
            "if {p} < 0:",
            "    return 'negative'",
            "return 'zero'",
        ),
        _ints,
    ),
    "squares": _plain_fn(
        ("squares", "square_list", "square_all", "list_squares"),
        ("Write a function to return the list of squares of a list.",),
        LIST_PARAMS,
        ("return [v * v for v in {p}]",),
        _lists,
    ),
    "sum_list": _plain_fn(
        ("sum_list", "list_sum", "total", "add_all"),
        ("Write a function to find the sum of a list.",),
        LIST_PARAMS,
        ("total = 0", "for v in {p}:", "    total += v", "return total"),
        _lists,
    ),
    "max_list": _plain_fn(
        ("max_list", "largest", "biggest", "find_max"),
        ("Write a function to find the largest number in a list.",),
        LIST_PARAMS,
        ("best = {p}[0]", "for v in {p}:", "    if v > best:", "        best = v", "return best"),
        _lists,
    ),
    "min_list": _plain_fn(
        ("min_list", "smallest", "find_min", "lowest"),
        ("Write a function to find the smallest number in a list.",),
        LIST_PARAMS,
        ("best = {p}[0]", "for v in {p}:", "    if v < best:", "        best = v", "return best"),
        _lists,
    ),
    "evens": _plain_fn(
        ("evens", "even_numbers", "filter_even", "keep_even"),
        ("Write a function to return the even numbers of a list.",),
        LIST_PARAMS,
        ("return [v for v in {p} if v % 2 == 0]",),
        _lists,
    ),
    "odds": _plain_fn(
        ("odds", "odd_numbers", "filter_odd", "keep_odd"),
        ("Write a function to return the odd numbers of a list.",),
        LIST_PARAMS,
        ("return [v for v in {p} if v % 2 == 1]",),
        _lists,
    ),
    "product": _plain_fn(
        ("product", "list_product", "multiply_all", "prod"),
        ("Write a function to find the product of a list.",),
        LIST_PARAMS,
        ("result = 1", "for v in {p}:", "    result *= v", "return result"),
        _lists,
    ),
    "reverse_list": _plain_fn(
        ("reverse_list", "reversed_list", "flip", "backwards"),
        ("Write a function to reverse a list.",),
        LIST_PARAMS,
        ("return {p}[::-1]",),
        _lists,
    ),
    "add_each": _const_fn(
        ("add_each", "shift_all", "add_to_all", "increase_all"),
        ("Write a function to add {c} to every element of a list.",),
        LIST_PARAMS,
        ("return [v + {c} for v in {p}]",),
        _lists,
    ),
    "count_greater": _const_fn(
        ("count_greater", "count_above", "num_greater", "how_many_above"),
        ("Write a function to count the elements of a list greater than {c}.",),
        LIST_PARAMS,
        ("count = 0", "for v in {p}:", "    if v > {c}:", "        count += 1", "return count"),
        _lists,
    ),
    "remove_value": _const_fn(
        ("remove_value", "drop_value", "without", "filter_out"),
        ("Write a function to remove every {c} from a list.",),
        LIST_PARAMS,
        ("return [v for v in {p} if v != {c}]",),
        lambda r: _lists(r, 0, 9),
    ),
    "count_vowels": _plain_fn(
        ("count_vowels", "vowel_count", "num_vowels", "vowels"),
        ("Write a function to count the vowels in a string.",),
        STR_PARAMS,
        (
            "count = 0",
            "for ch in {p}:",
            "    if ch in 'aeiou':",
            "        count += 1",
            "return count",
        ),
        _strs,
    ),
    "reverse_str": _plain_fn(
        ("reverse_string", "reverse_str", "backwards_str", "flip_string"),
        ("Write a function to reverse a string.",),
        STR_PARAMS,
        ("return {p}[::-1]",),
        _strs,
    ),
    "upper": _plain_fn(
        ("to_upper", "upper_case", "shout", "capitalize_all"),
        ("Write a function to convert a string to upper case.",),
        STR_PARAMS,
        ("return {p}.upper()",),
        _strs,
    ),
    "first_last": _plain_fn(
        ("first_last", "ends", "first_and_last", "edge_chars"),
        ("Write a function to return the first and last character of a string.",),
        STR_PARAMS,
        ("return {p}[0] + {p}[-1]",),
        _strs,
    ),
    "palindrome": _plain_fn(
        ("is_palindrome", "palindrome", "check_palindrome", "same_backwards"),
        ("Write a function to check whether a string is a palindrome.",),
        STR_PARAMS,
        ("return {p} == {p}[::-1]",),
        lambda r: tuple((r.choice(("level", "noon", "kayak", r.choice(WORDS))),) for _ in range(3)),
    ),
    "repeat": _const_fn(
        ("repeat", "repeat_string", "times_string", "echo"),
        ("Write a function to repeat a string {c} times.",),
        STR_PARAMS,
        ("return {p} * {c}",),
        _strs,
        lo=2,
        hi=4,
    ),
    "count_char": _char_fn(
        ("count_char", "char_count", "count_letter", "letter_count"),
        ("Write a function to count how many times the letter '{ch}' appears in a string.",),
        ("return {p}.count('{ch}')",),
    ),
    "has_char": _char_fn(
        ("has_letter", "contains", "has_char", "includes"),
        ("Write a function to check whether a string contains the letter '{ch}'.",),
        ("return '{ch}' in {p}",),
    ),
    "replace_char": _char_fn(
        ("replace_letter", "mask_letter", "hide_char", "star_letter"),
        ("Write a function to replace every '{ch}' in a string with '*'.",),
        ("return {p}.replace('{ch}', '*')",),
    ),
}


def make_problem(family: str, rng: random.Random) -> Problem:
    text, code, name, inputs = FAMILIES[family](rng)
    return Problem(family, text, code.format(name=name), name, inputs)


def run_reference(problem: Problem) -> list[str]:
    """The three asserts of a problem, with expected values from running its code.

    `exec` here runs our own generated source (trusted, no user input), never
    model output; model samples go through `wmtp.sandbox.runner`.
    """
    namespace: dict = {}
    exec(problem.code, namespace)  # noqa: S102 - trusted generated code
    function = namespace[problem.name]
    tests = []
    for args in problem.inputs:
        call = f"{problem.name}({', '.join(repr(a) for a in args)})"
        tests.append(f"assert {call} == {function(*args)!r}")
    return tests


def check_solution(code: str, tests: list[str]) -> None:
    """Raise if `code` does not pass `tests` (the generator's self-check)."""
    namespace: dict = {}
    exec(code + "\n" + "\n".join(tests), namespace)  # noqa: S102 - trusted generated code


def add_noise(code: str, rng: random.Random, prob: float) -> str:
    """Give each line, with probability `prob`, a comment of 2-4 random words: either
    at the end of the line or as a line of its own above it (same indentation)."""
    out = []
    for line in code.rstrip("\n").split("\n"):
        if rng.random() < prob:
            comment = "# " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
            if rng.random() < 0.5:
                line = f"{line}  {comment}"
            else:
                indent = line[: len(line) - len(line.lstrip())]
                out.append(indent + comment)
        out.append(line)
    return "\n".join(out) + "\n"


def _key(problem: Problem) -> tuple[str, str]:
    return problem.text, problem.code


def sample_problems(n: int, rng: random.Random, exclude: set[tuple[str, str]]) -> list[Problem]:
    """`n` distinct problems, families in round-robin (balanced splits), none whose
    (text, code) is in `exclude`; `exclude` is extended with the new keys."""
    families = list(FAMILIES)
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct tiny-mbpp problems; ask for fewer")
        problem = make_problem(families[len(problems) % len(families)], rng)
        if _key(problem) in exclude:
            continue
        exclude.add(_key(problem))
        problems.append(problem)
    return problems


def _rows(
    problems: list[Problem], first_id: int, noise_rng: random.Random | None, prob: float
) -> pd.DataFrame:
    rows = []
    for offset, problem in enumerate(problems):
        tests = run_reference(problem)
        code = problem.code if noise_rng is None else add_noise(problem.code, noise_rng, prob)
        check_solution(problem.code, tests)
        check_solution(code, tests)
        rows.append(
            {
                "task_id": first_id + offset,
                "text": problem.text,
                "code": code,
                "test_list": tests,
                "test_setup_code": "",
                "challenge_test_list": [],
            }
        )
    return pd.DataFrame(rows, columns=list(MBPP_COLUMNS))


SPLIT_IDS = {"test": 1, "validation": 50001, "train": 100001}  # first task id of each split


def make_tiny_mbpp(
    n_train: int, n_test: int, seed: int, noise_comment_prob: float, n_validation: int = 100
) -> dict[str, pd.DataFrame]:
    """The train, validation and test splits (MBPP columns, MBPP's split names).

    Problems are drawn test first, then train, then validation, each split excluding
    every (text, code) drawn before: the test split of a seed stays the same whatever
    the other sizes are, the train split whatever `n_validation` is, and validation
    holds new instances of the same families, for tuning off the test split. Only
    train solutions carry noise comments. Task ids start at `SPLIT_IDS`."""
    if not 0 <= noise_comment_prob <= 1:
        raise ValueError(f"noise_comment_prob must be in [0, 1], got {noise_comment_prob}")
    if min(n_train, n_test, n_validation) < 1:
        raise ValueError(
            "need at least one problem per split, got "
            f"n_train={n_train}, n_test={n_test}, n_validation={n_validation}"
        )
    if n_test >= SPLIT_IDS["validation"] - SPLIT_IDS["test"] or n_validation >= SPLIT_IDS["train"] - SPLIT_IDS["validation"]:
        raise ValueError("tiny-mbpp splits of 50000 problems or more would share task ids")
    seen: set[tuple[str, str]] = set()
    test = sample_problems(n_test, random.Random(f"tiny-mbpp-test-{seed}"), seen)
    train = sample_problems(n_train, random.Random(f"tiny-mbpp-train-{seed}"), seen)
    validation = sample_problems(n_validation, random.Random(f"tiny-mbpp-validation-{seed}"), seen)
    noise_rng = random.Random(f"tiny-mbpp-noise-{seed}")
    return {
        "train": _rows(train, SPLIT_IDS["train"], noise_rng, noise_comment_prob),
        "validation": _rows(validation, SPLIT_IDS["validation"], None, 0.0),
        "test": _rows(test, SPLIT_IDS["test"], None, 0.0),
    }


def write_parquet(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write one split atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return path


def write_splits(
    out_dir: str | Path, n_train: int, n_test: int, seed: int, noise_comment_prob: float,
    n_validation: int = 100,
) -> dict[str, Path]:  # fmt: skip
    """Write `{split}.parquet` for every split (atomically) into `out_dir`."""
    splits = make_tiny_mbpp(n_train, n_test, seed, noise_comment_prob, n_validation)
    return {name: write_parquet(frame, Path(out_dir) / f"{name}.parquet") for name, frame in splits.items()}


def corpus_documents(n: int, seed: int, statement_prob: float = 0.7) -> list[str]:
    """Pretraining documents: clean functions of the same families followed by a few
    asserts or prints, as in ordinary code files; with probability `statement_prob`
    a comment above the function states what it does. Never the docstring prompt
    format with the test before the code: the base model learns the functions,
    the statements and to reuse a name, not the task format that fine-tuning
    teaches."""
    rng = random.Random(f"tiny-corpus-{seed}")
    families = list(FAMILIES)
    docs = []
    for i in range(n):
        problem = make_problem(families[i % len(families)], rng)
        tests = run_reference(problem)
        if rng.random() < 0.5:
            tests = [t.replace("assert ", "print(", 1).split(" == ")[0] + ")" for t in tests]
        header = f"# {problem.text}\n" if rng.random() < statement_prob else ""
        docs.append(header + problem.code + "\n" + "\n".join(tests[: rng.randint(1, 3)]) + "\n")
    return docs


def prompt_documents(n: int, seed: int, noise_comment_prob: float = 0.0) -> list[tuple[str, str]]:
    """(prompt, solution) text pairs in the fine-tuning format, from a pool of their
    own seed: clean ones are the reference model's high-quality data, noisy ones
    let the tokenizer learn the comment words."""
    rng = random.Random(f"tiny-prompts-{seed}")
    families = list(FAMILIES)
    pairs = []
    for i in range(n):
        problem = make_problem(families[i % len(families)], rng)
        tests = run_reference(problem)
        code = (
            add_noise(problem.code, rng, noise_comment_prob) if noise_comment_prob else problem.code
        )
        pairs.append((mbpp_prompt(problem.text, tests[0]), mbpp_solution(code)))
    return pairs
