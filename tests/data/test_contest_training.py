"""CodeContests as a training set: deepmind/code_contests rows -> one example per kept
correct Python 3 solution, in the prompt evaluation shows, held out by problem."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest

from wmtp.data.problems import load_codecontests
from wmtp.data.prompts import (
    chat_completion,
    generation_stops,
    model_prompt,
    set_prompt_format,
    truncate_at_stop,
)
from wmtp.data.training import Example, build_examples, problem_of, read_split, split_train_val
from wmtp.sandbox.runner import run_many

FIXTURE = Path(__file__).parents[1] / "fixtures" / "codecontests_train.jsonl"


@pytest.fixture
def contest_train(tmp_path) -> Path:
    """The fixture in the download stage's layout: one parquet of the hub's columns."""
    path = tmp_path / "train.parquet"
    pd.read_json(FIXTURE, lines=True).to_parquet(path)
    return path


def test_rows_are_the_correct_python3_solutions(contest_train):
    rows = read_split(contest_train, "codecontests")
    assert rows["task_id"].tolist() == [
        "fixture_train_double#0", "fixture_train_double#1",
        "fixture_train_max#0", "fixture_train_max#1", "fixture_train_max#2",
    ]  # fmt: skip
    codes = rows["code"].tolist()
    assert "print(int(input()) + 2)\n" not in codes  # incorrect_solutions never train
    assert not any("#include" in code for code in codes)  # C++ (language 2) is not Python 3
    assert "print(int(input())*2)\n" not in codes  # nor is Python 2 (language 1)
    assert codes.count("x = int(input())\nprint(2 * x)\n") == 1  # the duplicate is dropped


def test_cap_keeps_the_first_solutions_per_problem(contest_train):
    rows = read_split(contest_train, "codecontests", max_solutions_per_problem=1)
    assert rows["task_id"].tolist() == ["fixture_train_double#0", "fixture_train_max#0"]
    assert rows["code"].iloc[0] == "x = int(input())\nprint(2 * x)\n"


def test_layout_errors_name_the_columns(tmp_path, contest_train):
    frame = pd.read_parquet(contest_train)
    frame.drop(columns=["solutions"]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"CodeContests column\(s\) \['solutions'\]"):
        read_split(tmp_path / "bad.parquet", "codecontests")
    frame.iloc[[2]].to_parquet(tmp_path / "cpp.parquet")
    with pytest.raises(ValueError, match="no problem has a correct Python 3 solution"):
        read_split(tmp_path / "cpp.parquet", "codecontests")
    with pytest.raises(ValueError, match="missing MBPP column"):  # the other layout is refused
        read_split(contest_train, "mbpp")


@pytest.mark.parametrize("fmt", ["raw", "chat"])
def test_example_is_the_evaluation_prompt_then_a_solution_that_passes(contest_train, chat_tokenizer, fmt):
    """Training shows exactly the prompt evaluation shows for the same problem, and
    the target, read back as evaluation reads a completion, passes the problem's
    tests in the sandbox: the format is the benchmark's, and the solutions correct."""
    tokenizer = copy.deepcopy(chat_tokenizer)
    set_prompt_format(tokenizer, fmt)
    problems = {p.task_id: p for p in load_codecontests(contest_train)}
    rows = read_split(contest_train, "codecontests")
    examples = build_examples(rows, tokenizer, max_seq_len=512)
    assert [e.sample_id for e in examples] == rows["task_id"].tolist()
    jobs = []
    for example in examples:
        problem = problems[problem_of(example.sample_id)]
        prompt = model_prompt(tokenizer, fmt, problem.prompt, problem.message)
        prompt_ids = tokenizer(prompt)["input_ids"]  # as the sampler encodes it
        assert example.input_ids[: len(prompt_ids)] == prompt_ids
        assert example.loss_mask == [0] * len(prompt_ids) + [1] * (len(example.input_ids) - len(prompt_ids))
        assert example.input_ids[-1] == tokenizer.eos_token_id
        target = tokenizer.decode(example.input_ids[len(prompt_ids) : -1])
        completion = truncate_at_stop(target, generation_stops(fmt, problem.stop))
        if fmt == "chat":
            completion = chat_completion(completion, problem.stop)
        jobs.append(problem.job(completion, timeout=10.0))
    outcomes = run_many(jobs, workers=2)
    assert [o.status for o in outcomes] == ["passed"] * len(examples), [o.detail for o in outcomes]


def test_val_holds_out_whole_problems():
    examples = [Example(f"p{p}#{j}", [1, 2], [0, 1]) for p in range(10) for j in range(p % 3 + 1)]
    train, val = split_train_val(examples, 0.2, seed=5)
    held = {problem_of(e.sample_id) for e in val}
    assert held and not held & {problem_of(e.sample_id) for e in train}
    assert len(train) + len(val) == len(examples)
    assert len(val) >= round(0.2 * len(examples))
    assert split_train_val(examples, 0.2, seed=5) == (train, val)


def test_val_of_one_example_per_problem_is_the_seeded_choice():
    """MBPP (one example per problem): the hold-out is the first n_val indices of the
    seed's permutation, as before problems were grouped (runs stay reproducible)."""
    import numpy as np

    examples = [Example(str(100 + i), [1], [1]) for i in range(30)]
    train, val = split_train_val(examples, 0.1, seed=7)
    chosen = set(np.random.default_rng(7).permutation(30)[:3].tolist())
    assert [e.sample_id for e in val] == [str(100 + i) for i in sorted(chosen)]
    assert len(train) == 27
