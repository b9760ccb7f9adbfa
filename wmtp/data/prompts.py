"""Prompt formats shared by training and evaluation.

Training and evaluation must format a problem identically, or fine-tuning
teaches a format that evaluation never shows. Everything that turns a problem
into model text lives here.

Two formats (`PROMPT_FORMATS`):
- raw: the paper's. The model continues the problem text: MBPP's statement and
  first test in a docstring, HumanEval's signature and docstring. For base models.
- chat: for instruct models. The problem, with an instruction, is the user's turn
  of the tokenizer's chat template, and the assistant's reply is opened for the
  model as a fenced Python block (instruct models write their code there; an
  opened block also keeps prose out). Generation stops at the block's closing
  fence; what the block holds is the code, cut at the benchmark's stop sequences
  (`chat_completion`). For HumanEval, whose program is prompt + completion, the
  reply's definition of the entry point (with the imports and helpers written
  before it) is joined after the prompt, which gives the signature, docstring and
  the prompt's own imports, as instruct-mode harnesses do. Training targets are
  the reference code and the closing fence, so fine-tuning teaches the reply
  evaluation reads.

MBPP has two protocols (the setting's `eval.mbpp_prompt`), both in
the raw format: zero-shot (`mbpp_prompt`, the format models are fine-tuned in) and
Code Llama's 3-shot (`mbpp_few_shot_prompt`: Austin et al. 2021's format, tasks 2-4
of MBPP's prompt split as worked examples, every test shown, stopped at "[DONE]").

The format belongs to the model, not to a stage: the download stage records it in
the base model's tokenizer files (`set_prompt_format`, a key of
`tokenizer_config.json`), every model directory the pipeline writes carries
that tokenizer, and training data, reference CE and evaluation all read it back
from the tokenizer they load (`prompt_format`). A stage cannot pick another one.
"""

from __future__ import annotations

import re
from typing import Literal

PromptFormat = Literal["raw", "chat"]
PROMPT_FORMATS: tuple[str, ...] = ("raw", "chat")
FORMAT_KEY = "wmtp_prompt_format"  # in tokenizer_config.json

# MBPP (Austin et al. 2021; also tiny-mbpp): the model has finished the function and
# starts writing tests, a new docstring or a main block. MBPP solutions may define
# several functions and import at top level, so `\ndef` is not a stop here.
MBPP_STOP: tuple[str, ...] = ('\n"""', "\nassert", "\nif __name__", "\nprint(", "\n# Test", "\n\n\n")
# HumanEval (Chen et al. 2021): the completion is one function body; any top-level
# statement after it (a class, another def, a comment, an if, a print) ends it.
HUMANEVAL_STOP: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
STOP_SEQUENCES = MBPP_STOP  # the default of the sampler (training data is MBPP-format)

MBPP_SHOT_TASKS: tuple[int, ...] = (2, 3, 4)  # Code Llama's examples: task ids of MBPP's prompt split
FEW_SHOT_STOP: tuple[str, ...] = ("[DONE]",)  # closes each example's code, so the model's too

CODE_FENCE = "```python\n"  # opens the assistant's reply in the chat format
FENCE_END = "```"  # closes it; the chat format's training targets end with it
CHAT_STOP: tuple[str, ...] = ("\n" + FENCE_END,)

MBPP_INSTRUCTION = "Write a Python function for the task below. Reply with the code in one Python code block."
HUMANEVAL_INSTRUCTION = (
    "Complete the Python function below. Reply with the whole function in one Python code block."
)
CONTEST_INSTRUCTION = (
    "Write a Python 3 program that reads the input from standard input and prints "
    "the answer to standard output."
)


def mbpp_prompt(text: str, first_test: str) -> str:
    """MBPP prompt: the problem statement and the first test in a docstring, so the
    model knows the function name and signature (Austin et al. 2021)."""
    return f'"""\n{text.strip()}\n{first_test.strip()}\n"""\n'


def contest_prompt(description: str) -> str:
    """CodeContests prompt: the statement and the stdin/stdout instruction in a
    docstring; the model writes the whole program after it."""
    return f'"""\n{description.strip()}\n\n{CONTEST_INSTRUCTION}\n"""\n'


def contest_message(description: str) -> str:
    """CodeContests as a chat user turn: the statement, then the instruction."""
    return f"{description.strip()}\n\n{CONTEST_INSTRUCTION}"


def austin_task(text: str, tests: list[str]) -> str:
    """One task of Austin et al.'s few-shot format, open for its code: the statement,
    every test, then "[BEGIN]"."""
    listed = "\n".join(t.strip() for t in tests)
    return (
        f"You are an expert Python programmer, and here is your task: {text.strip()} "
        f"Your code should pass these tests:\n\n{listed}\n[BEGIN]\n"
    )


def mbpp_few_shot_prompt(examples: list[tuple[str, list[str], str]], text: str, tests: list[str]) -> str:
    """Code Llama's 3-shot MBPP prompt: each (statement, tests, code) example as an
    Austin et al. task with its code and "[DONE]", a blank line between them, then
    the problem's task; the model writes the code and its own "[DONE]" (the stop)."""
    shots = [austin_task(t, ts) + mbpp_solution(code).rstrip() + "\n[DONE]\n\n" for t, ts, code in examples]
    return "".join(shots) + austin_task(text, tests)


def mbpp_message(text: str, first_test: str) -> str:
    """MBPP as a chat user turn: instruction, statement, the first test."""
    return f"{MBPP_INSTRUCTION}\n\n{text.strip()}\nYour code should pass this test:\n{first_test.strip()}"


def humaneval_message(prompt: str) -> str:
    """HumanEval as a chat user turn: instruction and the prompt's code, fenced."""
    return f"{HUMANEVAL_INSTRUCTION}\n\n{CODE_FENCE}{prompt.strip()}\n{FENCE_END}"


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


# ---- the format a model directory's tokenizer records


def prompt_format(tokenizer) -> PromptFormat:
    """The format recorded in the tokenizer (`set_prompt_format`); raw when none is."""
    value = tokenizer.init_kwargs.get(FORMAT_KEY, "raw")
    if value not in PROMPT_FORMATS:
        raise ValueError(f"tokenizer_config.json: {FORMAT_KEY} = {value!r}, expected one of {PROMPT_FORMATS}")
    return value


def set_prompt_format(tokenizer, value: PromptFormat, name: str = "the model") -> None:
    """Record `value` in the tokenizer; `save_pretrained` writes it to
    tokenizer_config.json, and every later load of that directory reads it."""
    if value not in PROMPT_FORMATS:
        raise ValueError(f"prompt format {value!r}: expected one of {PROMPT_FORMATS}")
    if value == "chat" and not tokenizer.chat_template:
        raise ValueError(f"prompt_format = 'chat': the tokenizer of {name} has no chat template")
    tokenizer.init_kwargs[FORMAT_KEY] = value


def chat_prompt(tokenizer, message: str) -> str:
    """The chat format's model input: `message` as the user's turn of the tokenizer's
    chat template, then the assistant's reply opened as a fenced Python block.

    A beginning-of-sequence token that the template writes and the tokenizer also
    adds by itself is dropped from the text, so that `tokenizer(text)` (the
    sampler) and special_prefix + `tokenizer(text, add_special_tokens=False)`
    (training) give the same ids, with one BOS."""
    if not tokenizer.chat_template:
        raise ValueError("the chat prompt format needs a tokenizer with a chat template")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    if adds_bos and text.startswith(bos):
        text = text[len(bos) :]
    return text + CODE_FENCE


def model_prompt(tokenizer, fmt: PromptFormat, raw: str, message: str) -> str:
    """What the model continues: `raw` in the raw format, else the chat prompt of
    `message`."""
    return raw if fmt == "raw" else chat_prompt(tokenizer, message)


def generation_stops(fmt: PromptFormat, stops: tuple[str, ...]) -> tuple[str, ...]:
    """Where the sampler stops: the benchmark's stop sequences in the raw format; the
    reply's closing fence in the chat format (its code may start with imports or
    helpers that a benchmark's stops, such as HumanEval's `\\ndef`, would cut)."""
    return stops if fmt == "raw" else CHAT_STOP


def chat_completion(reply: str, stops: tuple[str, ...], entry_point: str = "") -> str:
    """The completion judged for a chat-format reply (the code of the opened block,
    `reply`): with an `entry_point` (HumanEval), the reply's definition of it cut
    at `stops`, with what the reply writes before it (imports, helpers), on a new
    line after the prompt, whose docstring-only function it replaces; without one,
    or when the reply does not define it, the code cut at `stops`."""
    code = truncate_at_stop(reply, CHAT_STOP)
    pattern = rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\("
    found = re.search(pattern, code, re.MULTILINE) if entry_point else None
    if found is None:
        return truncate_at_stop(code, stops)
    return "\n" + code[: found.start()] + truncate_at_stop(code[found.start() :], stops)


def training_pair(tokenizer, text: str, first_test: str, code: str) -> tuple[str, str]:
    """(prompt, target) text of an MBPP-format training row in the tokenizer's
    format; the target is what the model should write after the prompt, before EOS
    (the chat format's also closes the code block, where generation stops)."""
    fmt = prompt_format(tokenizer)
    prompt = model_prompt(tokenizer, fmt, mbpp_prompt(text, first_test), mbpp_message(text, first_test))
    target = mbpp_solution(code)
    return prompt, target if fmt == "raw" else target + FENCE_END


def contest_training_pair(tokenizer, description: str, code: str) -> tuple[str, str]:
    """(prompt, target) text of a CodeContests training example (a problem's statement
    and one of its correct Python 3 solutions) in the tokenizer's format: the prompt
    evaluation shows for the problem (`contest_prompt` / `contest_message`), the
    solution as target, closed like MBPP's (`training_pair`)."""
    fmt = prompt_format(tokenizer)
    prompt = model_prompt(tokenizer, fmt, contest_prompt(description), contest_message(description))
    target = mbpp_solution(code)
    return prompt, target if fmt == "raw" else target + FENCE_END
