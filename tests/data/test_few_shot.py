"""MBPP's 3-shot prompt (Code Llama's protocol) on the real prompt split: the examples,
their exact format, the stop, and the setting that selects it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from wmtp.config.schema import ConfigError, load_config, load_config_files
from wmtp.data.problems import load_mbpp, mbpp_shots
from wmtp.data.prompts import (
    FEW_SHOT_STOP,
    MBPP_STOP,
    austin_task,
    mbpp_few_shot_prompt,
    truncate_at_stop,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
PROMPT_SPLIT = FIXTURES / "mbpp_prompt.jsonl"  # MBPP's prompt split, tasks 1-10 (README there)
HEADER = "You are an expert Python programmer, and here is your task: "


def test_the_shots_are_tasks_2_3_4_of_the_prompt_split():
    shots = mbpp_shots(PROMPT_SPLIT)
    assert [text for text, _, _ in shots] == [
        "Write a function to find the similar elements from the given two tuple lists.",
        "Write a python function to identify non-prime numbers.",
        "Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
    ]
    assert [len(tests) for _, tests, _ in shots] == [3, 3, 3]


def test_a_split_without_the_shots_is_named(tmp_path):
    partial = tmp_path / "prompt.jsonl"
    partial.write_text("".join(line + "\n" for line in PROMPT_SPLIT.read_text().splitlines() if '"task_id": 3,' not in line))
    with pytest.raises(ValueError, match=r"prompt.jsonl: no task \[3\]"):
        mbpp_shots(partial)


def test_three_shot_prompt_is_austin_et_als_format():
    shots = mbpp_shots(PROMPT_SPLIT)
    prompt = mbpp_few_shot_prompt(shots, "Write a function to add two numbers.", ["assert add(1, 2) == 3", "assert add(0, 0) == 0"])
    blocks = prompt.split("[DONE]\n\n")
    assert len(blocks) == 4 and all(b.startswith(HEADER) for b in blocks)
    assert blocks[-1] == (
        HEADER + "Write a function to add two numbers. Your code should pass these tests:\n\n"
        "assert add(1, 2) == 3\nassert add(0, 0) == 0\n[BEGIN]\n"
    )
    assert blocks[0].startswith(
        HEADER + "Write a function to find the similar elements from the given two tuple lists. "
        "Your code should pass these tests:\n\nassert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"
    )
    assert "\r" not in prompt and prompt.count("[BEGIN]\n") == 4


def test_each_example_shows_code_that_passes_its_tests():
    """The code between [BEGIN] and [DONE] is the reference, intact: run with the
    example's tests it passes (the examples teach working code)."""
    shots = mbpp_shots(PROMPT_SPLIT)
    prompt = mbpp_few_shot_prompt(shots, "x", ["assert True"])
    codes = re.findall(r"\[BEGIN\]\n(.*?)\n\[DONE\]", prompt, flags=re.S)
    assert len(codes) == 3
    for code, (_, tests, _) in zip(codes, shots, strict=True):
        exec(compile(code + "\n" + "\n".join(tests), "<shot>", "exec"), {})  # noqa: S102 (MBPP's own reference code)


def test_load_mbpp_three_shot_prompts_every_test_and_stops_at_done():
    shots = mbpp_shots(PROMPT_SPLIT)
    zero, three = load_mbpp(FIXTURES / "mbpp.jsonl"), load_mbpp(FIXTURES / "mbpp.jsonl", shots)
    assert [p.task_id for p in zero] == [p.task_id for p in three]
    for z, t in zip(zero, three, strict=True):
        assert z.stop == MBPP_STOP and t.stop == FEW_SHOT_STOP == ("[DONE]",)
        assert z.tests == t.tests and z.reference == t.reference  # judged alike
        assert t.prompt.startswith(austin_task(*shots[0][:2]))
        assert t.prompt.endswith("[BEGIN]\n") and z.prompt.startswith('"""')
    first = three[0]
    completion = "def max_of_two(a, b):\n    return max(a, b)\n[DONE]\n\nYou are an expert"
    assert truncate_at_stop(completion, first.stop) == "def max_of_two(a, b):\n    return max(a, b)\n"


def _paper(**eval_update) -> dict:
    data = load_config_files([REPO / "config" / "paper.yaml"], base=REPO / "config" / "config.yaml")
    data["eval"] = {**data["eval"], **eval_update}
    return data


def test_zero_shot_is_the_default_and_three_shot_is_validated():
    assert load_config(_paper(), REPO)[0].eval.mbpp_prompt == "zero-shot"
    assert load_config(_paper(mbpp_prompt="three-shot"), REPO)[0].eval.mbpp_prompt == "three-shot"
    with pytest.raises(ConfigError, match="eval.mbpp_prompt"):
        load_config(_paper(mbpp_prompt="five-shot"), REPO)
    tiny = load_config_files([], base=REPO / "config" / "config.yaml")
    tiny["eval"]["mbpp_prompt"] = "three-shot"
    with pytest.raises(ConfigError, match="eval.mbpp_prompt = 'three-shot': no mbpp benchmark"):
        load_config(tiny, REPO)


def test_evaluate_model_samples_three_shot_prompts_for_mbpp_only(tmp_path, tiny_tokenizer, monkeypatch):
    """eval.mbpp_prompt three-shot: MBPP's problems are sampled from the 3-shot prompt,
    stopped at [DONE], and the summary says so; tiny-mbpp keeps its zero-shot prompt."""
    from conftest import tiny_config

    from wmtp.config.schema import EvalSettings
    from wmtp.core import sample
    from wmtp.core.checkpoints import save_model
    from wmtp.core.model import MTPModel
    from wmtp.stages.evaluate import evaluate_model

    model = MTPModel(tiny_config(vocab_size=len(tiny_tokenizer)))
    model.init_weights(seed=0)
    model_dir = save_model(model, tmp_path / "model", tokenizer=tiny_tokenizer)
    seen: dict = {}
    real_generate = sample.generate

    def spy(model, tokenizer, prompts, **kwargs):
        seen.update(prompts=prompts, stop=kwargs["stop"])
        return real_generate(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(sample, "generate", spy)
    settings = EvalSettings(n_samples=2, max_new_tokens=4, batch_size=4, workers=2, mbpp_prompt="three-shot",
                            ks={"mbpp": [1], "tiny-mbpp": [1]})  # fmt: skip
    data = FIXTURES / "mbpp.jsonl"
    summary = evaluate_model(model_dir, "mbpp", data, settings, 0, tmp_path / "e.json", tmp_path / "e.jsonl",
                             shots_path=PROMPT_SPLIT)  # fmt: skip
    assert summary["mbpp_prompt"] == "three-shot"
    assert seen["prompts"] == [p.prompt for p in load_mbpp(data, mbpp_shots(PROMPT_SPLIT))]
    assert seen["stop"] == FEW_SHOT_STOP
    tiny = evaluate_model(model_dir, "tiny-mbpp", data, settings, 0, tmp_path / "t.json", tmp_path / "t.jsonl")
    assert "mbpp_prompt" not in tiny and seen["prompts"] == [p.prompt for p in load_mbpp(data)]
    assert seen["stop"] == MBPP_STOP


def test_three_shot_without_the_prompt_split_is_refused(tmp_path):
    from wmtp.config.schema import EvalSettings
    from wmtp.stages.evaluate import evaluate_model

    settings = EvalSettings(n_samples=2, mbpp_prompt="three-shot", ks={"mbpp": [1]})
    with pytest.raises(ValueError, match="needs MBPP's prompt split"):
        evaluate_model(tmp_path / "none", "mbpp", FIXTURES / "mbpp.jsonl", settings, 0, tmp_path / "e.json", tmp_path / "e.jsonl")


@pytest.mark.parametrize("protocol", ["zero-shot", "three-shot"])
def test_report_states_the_mbpp_protocol(tmp_path, protocol):
    from tests.stages.test_report import _build, _config, _write_results

    config, recipes = _config(bootstrap=10)
    # model_copy skips validation: the fixture's results are tiny-mbpp, the line is what is tested
    config = config.model_copy(update={"eval": config.eval.model_copy(update={"mbpp_prompt": protocol})})
    line = next(ln for ln in _build(_write_results(tmp_path), tmp_path, config, recipes).splitlines() if ln.startswith("- prompts:"))
    if protocol == "three-shot":
        assert line.startswith("- prompts: MBPP 3-shot (Code Llama's protocol: tasks 2-4 of MBPP's prompt split")
        assert "stopped at [DONE]" in line
    else:
        assert line.startswith("- prompts: zero-shot (MBPP: the statement and first test in a docstring")
