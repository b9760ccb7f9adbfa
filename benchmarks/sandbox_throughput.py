"""Evaluation wall time of the sandbox on two fixed workloads.

- tiny-mbpp: the generated tiny-mbpp test split (100 problems) with 10 fixed
  completions each, as a sampled model would give them: right, subtly wrong,
  cut off mid-line, or calling an undefined name (1000 assert-mode programs,
  the size of one tiny-default evaluation).
- codecontests: a CodeContests-format fixture of 5 problems with 40 generated
  tests each and 20 completions per problem (right ones in several I/O idioms,
  ones wrong only on large inputs, ones wrong at once).

Both go through `wmtp.stages.evaluate.evaluate_completions` only, so the script runs
unchanged against another checkout (`PYTHONPATH=/other/checkout python
benchmarks/sandbox_throughput.py`) for before/after comparisons. Prints one JSON
line per workload with wall seconds, the outcome counts and the load average.
Timings on a shared machine move with its load: interleave compared variants.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from wmtp.config.schema import EvalSettings
from wmtp.data.problems import Problem, load_mbpp
from wmtp.stages.evaluate import evaluate_completions

IDIOMS = {  # a correct solution body in several I/O styles; `solve(line) -> str` is inserted
    "input": "t = int(input())\nfor _ in range(t):\n    print(solve(input()))\n",
    "readline": "import sys\ninput = sys.stdin.readline\nfor _ in range(int(input())):\n    print(solve(input()))\n",
    "buffer": "import sys\nlines = sys.stdin.buffer.read().decode().split('\\n')\n"
              "print('\\n'.join(solve(l) for l in lines[1:int(lines[0]) + 1]))\n",
    "thread": "import threading\ndef main():\n    for _ in range(int(input())):\n        print(solve(input()))\n"
              "threading.Thread(target=main).start()\n",
}
CONTEST_PROBLEMS = {  # name -> (solve source, wrong-on-large source, make one input line)
    "pair_sum": ("def solve(l):\n    a, b = map(int, l.split())\n    return str(a + b)\n",
                 "def solve(l):\n    a, b = map(int, l.split())\n    return str((a + b) % 1000)\n",
                 lambda r, big: f"{r.randint(0, 10**6 if big else 400)} {r.randint(0, 10**6 if big else 400)}"),
    "max_item": ("def solve(l):\n    return str(max(map(int, l.split())))\n",
                 "def solve(l):\n    return str(max(map(int, l.split()[:5])))\n",
                 lambda r, big: " ".join(str(r.randint(-99, 99)) for _ in range(50 if big else 5))),
    "distinct": ("def solve(l):\n    return str(len(set(l.split())))\n",
                 "def solve(l):\n    return str(min(len(set(l.split())), 7))\n",
                 lambda r, big: " ".join(str(r.randint(0, 30)) for _ in range(40 if big else 6))),
    "reverse": ("def solve(l):\n    return l.strip()[::-1]\n",
                "def solve(l):\n    s = l.strip()\n    return s[::-1] if len(s) < 20 else s\n",
                lambda r, big: "".join(r.choice("abcxyz") for _ in range(40 if big else 8))),
    "digit_sum": ("def solve(l):\n    return str(sum(map(int, l.strip())))\n",
                  "def solve(l):\n    return str(sum(map(int, l.strip()[:9])))\n",
                  lambda r, big: str(r.randint(10**25, 10**30) if big else r.randint(1, 10**8))),
}


def tiny_mbpp_workload(n_problems: int, n_samples: int, seed: int = 0):
    """The tiny-mbpp test split with fixed model-like completions."""
    from wmtp.tiny.build import make_tiny_mbpp

    test = make_tiny_mbpp(400, n_problems, seed, 0.5)["test"]
    path = f"/tmp/wmtp-sandbox-throughput-{os.getpid()}.parquet"
    test.to_parquet(path)
    problems = load_mbpp(path)
    os.unlink(path)
    rng = random.Random(seed)
    completions = []
    for problem in problems:
        code = problem.reference
        variants = [
            code,
            code.replace("+", "-", 1) if "+" in code else code.replace("return ", "return 1 + ", 1),
            code[: max(1, len(code) * 2 // 3)],  # cut off mid-line
            code.replace("return ", "return undefined_name + ", 1),
        ]
        completions.append([rng.choices(variants, weights=(5, 2, 2, 1))[0] for _ in range(n_samples)])
    return problems, completions


def contest_workload(n_cases: int, n_samples: int, seed: int = 0):
    """CodeContests-format problems: 40 generated tests (the last third large)."""
    rng = random.Random(seed)
    problems, completions = [], []
    for name, (solve, wrong_on_large, make) in CONTEST_PROBLEMS.items():
        namespace: dict = {}
        exec(solve, namespace)  # the reference computes the expected outputs
        cases = []
        for index in range(n_cases):
            lines = [make(rng, index >= 2 * n_cases // 3) for _ in range(rng.randint(1, 4))]
            stdin = f"{len(lines)}\n" + "\n".join(lines) + "\n"
            cases.append((stdin, "\n".join(namespace["solve"](line) for line in lines) + "\n"))
        problems.append(Problem(task_id=name, prompt="", kind="stdio", cases=tuple(cases)))
        idioms = list(IDIOMS.values())
        samples = []
        for i in range(n_samples):
            kind = i % 5
            if kind < 2:
                samples.append(solve + idioms[i % len(idioms)])
            elif kind < 4:
                samples.append(wrong_on_large + idioms[i % len(idioms)])
            else:
                samples.append("print(0)\n")
        completions.append(samples)
    return problems, completions


def measure(name: str, problems, completions, workers: int) -> dict:
    settings = EvalSettings(timeout=10.0, workers=workers, n_samples=len(completions[0]),
                            ks={"mbpp": [1]})
    started = time.perf_counter()
    records = evaluate_completions(problems, completions, settings)
    seconds = time.perf_counter() - started
    counts: dict[str, int] = {}
    for record in records:
        for status in record["statuses"]:
            counts[status] = counts.get(status, 0) + 1
    return {"workload": name, "programs": sum(map(len, completions)), "wall_seconds": round(seconds, 2),
            "statuses": counts, "load_average": os.getloadavg(), "workers": workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mbpp-problems", type=int, default=100)
    parser.add_argument("--mbpp-samples", type=int, default=10)
    parser.add_argument("--contest-cases", type=int, default=40)
    parser.add_argument("--contest-samples", type=int, default=20)
    parser.add_argument("--only", choices=("tiny-mbpp", "codecontests"))
    args = parser.parse_args()
    if args.only in (None, "tiny-mbpp"):
        problems, completions = tiny_mbpp_workload(args.mbpp_problems, args.mbpp_samples)
        print(json.dumps(measure("tiny-mbpp", problems, completions, args.workers)), flush=True)
    if args.only in (None, "codecontests"):
        problems, completions = contest_workload(args.contest_cases, args.contest_samples)
        print(json.dumps(measure("codecontests", problems, completions, args.workers)), flush=True)


if __name__ == "__main__":
    main()
