"""Metrics against hand-computed values, and the evaluation loop without a model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import tiny_config

from wmtp.config.schema import EvalSettings
from wmtp.core.checkpoints import save_model
from wmtp.core.model import MTPModel
from wmtp.data.problems import load_benchmark
from wmtp.stages.evaluate import (
    evaluate_completions,
    evaluate_model,
    exact_match,
    pass_at_k,
    summarise,
)


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


def test_exact_match_survives_garbage_a_sampler_can_produce():
    """Found by a tiny model: a lone carriage return and control characters made
    tokenize.untokenize raise ValueError, which stopped the whole evaluation."""
    garbage = "\x13\n    \rqst i"
    assert not exact_match(garbage, "def f(a, b):\n    return a + b")
    assert exact_match("x = 1\ry = 2", "x = 1\ny = 2")  # Python reads a lone \r as a newline


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _settings(**overrides) -> EvalSettings:
    fields = dict(
        n_samples=3, temperature=0.8, max_new_tokens=8, batch_size=4, workers=2,
        ks={"tiny-mbpp": [1, 2], "mbpp": [1, 3], "codecontests": [1]},
    )  # fmt: skip
    fields.update(overrides)
    return EvalSettings(**fields)


def test_evaluate_completions_scores_each_problem():
    problems = load_benchmark("mbpp", FIXTURES / "mbpp.jsonl")
    first, second = problems
    wrong = "def max_of_two(a, b):\n    return a\n"
    restyled = "def max_of_two(a, b):\n    # larger one\n    if a > b: return a\n    return b\n"
    completions = [[first.reference, wrong, restyled], [second.reference, "", "while True: pass"]]
    records = evaluate_completions(problems, completions, _settings(timeout=1.0), exact=True)
    assert [r["c"] for r in records] == [2, 1]
    assert records[0]["statuses"] == ["passed", "failed", "passed"]
    assert records[1]["statuses"] == ["passed", "error", "timeout"]  # "" never runs the tests
    assert [r["exact"] for r in records] == [2, 1]
    summary = summarise(records, [1, 3])
    assert summary["pass@1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert summary["pass@3"] == 1.0
    assert summary["exact_match"] == pytest.approx(0.5)
    assert (summary["n_passed"], summary["n_failed"], summary["n_timeout"], summary["n_error"]) == (
        3, 1, 1, 1,
    )  # fmt: skip


def test_evaluate_completions_stdio_benchmark():
    problems = load_benchmark("codecontests", FIXTURES / "codecontests.jsonl")
    records = evaluate_completions(problems, [[problems[0].reference, "print(0)"]], _settings())
    assert records[0]["c"] == 1 and "exact" not in records[0]


def _model_dir(tmp_path, tiny_tokenizer) -> Path:
    model = MTPModel(tiny_config(vocab_size=len(tiny_tokenizer)))
    model.init_weights(seed=0)
    return save_model(model, tmp_path / "model", tokenizer=tiny_tokenizer)


def test_evaluate_model_writes_summary_and_per_problem_records(tmp_path, tiny_tokenizer):
    model_dir = _model_dir(tmp_path, tiny_tokenizer)
    out_json, out_jsonl = (
        tmp_path / "eval" / "tiny-mbpp.json",
        tmp_path / "eval" / "tiny-mbpp.jsonl",
    )
    summary = evaluate_model(
        model_dir, "tiny-mbpp", FIXTURES / "mbpp.jsonl", _settings(), 0, out_json, out_jsonl
    )
    assert json.loads(out_json.read_text()) == summary
    records = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    assert [r["task_id"] for r in records] == ["601", "602"]
    assert all(r["n"] == 3 == len(r["completions"]) == len(r["statuses"]) for r in records)
    assert summary["benchmark"] == "tiny-mbpp" and summary["n_samples"] == 3
    assert {"pass@1", "pass@2", "exact_match", "decoded_tokens_per_s", "kept_tokens_per_s"} <= set(summary)
    # an untrained model's tokens re-tokenise into others, so no order between the two here
    assert summary["decoded_tokens"] > 0 and summary["kept_tokens"] > 0
    assert summary["prompt_format"] == "raw"
    assert sum(summary[f"n_{s}"] for s in ("passed", "failed", "timeout", "error")) == 6
    again = evaluate_model(
        model_dir,
        "tiny-mbpp",
        FIXTURES / "mbpp.jsonl",
        _settings(),
        0,
        out_json,
        tmp_path / "b.jsonl",
    )
    assert [
        json.loads(x)["completions"] for x in (tmp_path / "b.jsonl").read_text().splitlines()
    ] == [r["completions"] for r in records]  # same seed, same samples
    assert again["pass@1"] == summary["pass@1"]


def test_evaluate_model_speculative_greedy_and_sampled(tmp_path, tiny_tokenizer):
    """eval.speculative: greedy completions equal plain greedy ones; sampled evaluation
    works too (n samples per problem, the same again under the same seed). That its
    samples are distributed as plain sampling is tested in test_sample.py."""
    model_dir = _model_dir(tmp_path, tiny_tokenizer)

    def completions(name: str, **overrides) -> list[list[str]]:
        out = tmp_path / f"{name}.jsonl"
        evaluate_model(model_dir, "tiny-mbpp", FIXTURES / "mbpp.jsonl", _settings(**overrides), 0,
                       tmp_path / f"{name}.json", out)  # fmt: skip
        return [json.loads(x)["completions"] for x in out.read_text().splitlines()]

    greedy = completions("greedy", speculative=True, temperature=0.0)
    assert greedy == completions("plain", speculative=False, temperature=0.0)
    assert all(len(set(c)) == 1 for c in greedy)  # greedy: the n samples agree
    sampled = completions("sampled", speculative=True)
    assert all(len(c) == 3 for c in sampled) and any(len(set(c)) > 1 for c in sampled)
    assert completions("again", speculative=True) == sampled


@pytest.mark.slow
def test_evaluate_model_logs_to_the_training_run(tmp_path, tiny_tokenizer):
    import mlflow

    model_dir = _model_dir(tmp_path, tiny_tokenizer)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("mtp/baseline-mtp/tiny-mbpp")
    run_id = client.create_run(experiment).info.run_id
    (model_dir / "tracking.json").write_text(
        json.dumps(
            {"tracking_uri": uri, "run_id": run_id, "experiment": "mtp/baseline-mtp/tiny-mbpp"}
        )
    )
    summary = evaluate_model(model_dir, "tiny-mbpp", FIXTURES / "mbpp.jsonl", _settings(), 0,
                             tmp_path / "e.json", tmp_path / "e.jsonl")  # fmt: skip
    logged = client.get_run(run_id).data.metrics
    pass_at_1 = [v for k, v in logged.items() if k.startswith("tiny_mbpp_pass") and k.endswith("1")]
    assert pass_at_1 == [summary["pass@1"]]
    assert logged["tiny_mbpp_exact_match"] == summary["exact_match"]


def test_with_temperatures_keeps_each_problems_counts_per_temperature():
    from wmtp.stages.evaluate import with_temperatures

    fixed = [{"task_id": "a", "n": 2, "c": 1}, {"task_id": "b", "n": 2, "c": 0}]
    hot = [{"task_id": "a", "n": 2, "c": 2}, {"task_id": "b", "n": 2, "c": 1}]
    out = with_temperatures(fixed, {0.8: fixed, 1.2: hot})
    assert [r["by_temperature"] for r in out] == [
        {"0.8": {"n": 2, "c": 1}, "1.2": {"n": 2, "c": 2}},
        {"0.8": {"n": 2, "c": 0}, "1.2": {"n": 2, "c": 1}},
    ]
    assert out[0]["c"] == 1  # the fixed temperature stays the record's own
    with pytest.raises(ValueError, match="out of order"):
        with_temperatures(fixed, {0.8: fixed, 1.2: hot[::-1]})


def test_eval_settings_temperatures_fixed_first_without_duplicates():
    from wmtp.config.schema import EvalSettings

    assert EvalSettings().temperatures == [0.8]
    assert EvalSettings(oracle_temperatures=[0.2, 0.8, 1.0]).temperatures == [0.8, 0.2, 1.0]
    with pytest.raises(ValueError, match="duplicates"):
        EvalSettings(oracle_temperatures=[0.2, 0.2])
def test_chat_format_evaluation(tmp_path, chat_tokenizer, monkeypatch):
    """A model whose tokenizer records the chat format is prompted through its chat
    template, stops at the reply's closing fence and at any of its end ids (the
    tokenizer's EOS and the generation config's)."""
    import copy

    from wmtp.core import sample
    from wmtp.data.prompts import chat_prompt, set_prompt_format
    from wmtp.stages.evaluate import end_token_ids

    tokenizer = copy.deepcopy(chat_tokenizer)
    set_prompt_format(tokenizer, "chat")
    model = MTPModel(tiny_config(vocab_size=len(tokenizer)))
    model.init_weights(seed=0)
    model_dir = save_model(model, tmp_path / "model", tokenizer=tokenizer,
                           generation_config={"eos_token_id": [tokenizer.eos_token_id, 1]})  # fmt: skip
    assert end_token_ids(model_dir, tokenizer) == sorted([tokenizer.eos_token_id, 1])
    seen = {}
    real_generate = sample.generate

    def spy(model, tokenizer, prompts, **kwargs):
        seen.update(prompts=prompts, stop=kwargs["stop"], eos_token_ids=kwargs["eos_token_ids"])
        return real_generate(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(sample, "generate", spy)
    problems = load_benchmark("mbpp", FIXTURES / "mbpp.jsonl")
    summary = evaluate_model(model_dir, "mbpp", FIXTURES / "mbpp.jsonl", _settings(ks={"mbpp": [1]}), 0,
                             tmp_path / "e.json", tmp_path / "e.jsonl")  # fmt: skip
    assert summary["prompt_format"] == "chat"
    assert seen["prompts"] == [chat_prompt(tokenizer, p.message) for p in problems]
    assert seen["stop"] == ("\n```",) and seen["eos_token_ids"] == [1, tokenizer.eos_token_id]
    raw = evaluate_model(model_dir, "mbpp", FIXTURES / "mbpp.jsonl", _settings(ks={"mbpp": [1]}), 0,
                         tmp_path / "r.json", tmp_path / "r.jsonl", fmt="raw")  # fmt: skip
    assert raw["prompt_format"] == "raw" and seen["prompts"] == [p.prompt for p in problems]
