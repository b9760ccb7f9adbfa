"""Evaluate a model on a benchmark: sample, judge in the sandbox, score.

`evaluate_model` writes a summary json (pass@k for the benchmark's k, MBPP exact
match, outcome counts, throughput) and a per-problem jsonl (n, c, statuses,
completions) from which the report bootstraps confidence intervals over
problems. `evaluate_completions` is the model-free part (judging + per-problem
records), testable without any model.
"""

from __future__ import annotations

import ast
import io
import json
import math
import re
import time
import tokenize
from collections import Counter
from pathlib import Path

import numpy as np

from wmtp.config.schema import EvalSettings
from wmtp.data.problems import Problem, load_benchmark, load_mbpp, mbpp_shots
from wmtp.data.prompts import PromptFormat, prompt_format
from wmtp.infra.atomic import write_json_atomic, write_text_atomic
from wmtp.infra.tracking import log_to_model_run
from wmtp.sandbox.runner import STATUSES, run_many
from wmtp.stages.eval_sampling import sample_own, sample_vllm

MBPP_FORMAT = ("mbpp", "tiny-mbpp")
# MLflow metric name prefix per benchmark: `tiny_mbpp_pass@1`, `contest_pass@1`, ...
METRIC_PREFIX = {
    "mbpp": "mbpp",
    "tiny-mbpp": "tiny_mbpp",
    "humaneval": "humaneval",
    "codecontests": "contest",
}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with n samples of which c passed (Chen et al.
    2021): 1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i),
    which never forms the huge binomials. 1.0 when every size-k subset holds a pass
    (n - c < k)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} is undefined with only n={n} samples")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def filtered_n_at_k(n: int, p: int, c: int, submit: int, k: int) -> float:
    """Unbiased n@k filtered on the public tests (AlphaCode's 10@k, Li et al. 2022) of
    one problem, from n samples of which p pass its public tests and c all its tests
    (c <= p: the public tests are among all tests).

    The protocol: draw k of the samples, keep those passing the public tests, submit
    up to `submit` of them (a uniformly random choice: no clustering), solved when a
    submitted one passes all tests. Its exact expectation over the k-subsets of the
    n samples: with t ~ Hypergeometric(n, p, k) filtered samples among the k, the
    min(submit, t) submitted ones are a uniformly random subset of the p that pass
    the public tests, so P(solved | t) = pass@min(submit, t) over (p, c), and

        n@k = sum_t P(t) * pass_at_k(p, c, min(submit, t)),   pass@0 = 0.

    With submit >= k it is pass@k over (n, c): every passing sample is submitted."""
    if not 0 <= c <= p <= n or k < 1 or submit < 1:
        raise ValueError(
            f"filtered n@k needs 0 <= c <= p <= n, k >= 1 and submit >= 1, got n={n}, p={p}, "
            f"c={c}, submit={submit}, k={k}"
        )
    if k > n:
        raise ValueError(f"{submit}@{k} is undefined with only n={n} samples")
    total = math.comb(n, k)
    value = 0.0
    for t in range(max(1, k - (n - p)), min(p, k) + 1):
        weight = math.comb(p, t) * math.comb(n - p, k - t) / total
        value += weight * pass_at_k(p, c, min(submit, t))
    return float(value)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """Drop docstrings (a leading string expression of a module, class or function)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return tree


def _without_comments(code: str) -> str:
    try:
        tokens = tokenize.generate_tokens(io.StringIO(code).readline)
        return tokenize.untokenize(t for t in tokens if t.type != tokenize.COMMENT)
    except (tokenize.TokenError, IndentationError, SyntaxError, ValueError):
        # ValueError: untokenize rejects positions it cannot lay out again
        return re.sub(r"#[^\n]*", "", code)


def normalise_code(code: str) -> str:
    """Canonical form for exact match: the AST dump without docstrings (comments and
    formatting vanish in parsing); unparsable code falls back to its text without
    comments, whitespace collapsed."""
    code = code.replace("\r\n", "\n").replace("\r", "\n").strip()  # a lone \r ends a line too
    try:
        return ast.dump(_strip_docstrings(ast.parse(code)))
    except SyntaxError:
        return " ".join(_without_comments(code).split())


def exact_match(code: str, reference: str) -> bool:
    """MBPP exact match: the completion equals the reference up to formatting,
    comments and docstrings."""
    return normalise_code(code) == normalise_code(reference)


def evaluate_completions(
    problems: list[Problem],
    completions: list[list[str]],
    settings: EvalSettings,
    exact: bool = False,
    progress: bool = False,
) -> list[dict]:
    """Judge every completion of every problem in the sandbox (in parallel) and
    return one record per problem: task_id, n, c, statuses, details, completions
    and, when `exact`, how many completions equal the reference (MBPP); on
    stdin/stdout problems also `public`, each sample's verdict on the public tests
    (for `filtered_n_at_k`)."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completion lists")
    jobs = [
        problem.job(completion, settings.timeout, settings.memory_mb)
        for problem, samples in zip(problems, completions, strict=True)
        for completion in samples
    ]
    outcomes = iter(run_many(jobs, settings.workers, progress=progress))
    records = []
    for problem, samples in zip(problems, completions, strict=True):
        judged = [next(outcomes) for _ in samples]
        record = {
            "task_id": problem.task_id,
            "n": len(samples),
            "c": sum(o.passed for o in judged),
            "statuses": [o.status for o in judged],
            "details": [o.detail for o in judged],
            "completions": list(samples),
        }
        if exact:
            record["exact"] = sum(exact_match(c, problem.reference) for c in samples)
        if problem.kind == "stdio":  # its public tests come first (`Problem.public_cases`)
            record["public"] = [o.cases_passed >= problem.public_cases for o in judged]
        records.append(record)
    return records


def filtered_name(submit: int, k: int) -> str:
    """The metric name of n@k filtered on the public tests: `10@100`."""
    return f"{submit}@{k}"


def parse_filtered(name: str) -> tuple[int, int] | None:
    """(n, k) of a filtered n@k metric name (`10@100`); None for any other name."""
    head, _, tail = name.partition("@")
    return (int(head), int(tail)) if head.isdigit() and tail.isdigit() else None


def filtered_values(records: list[dict], submit: int, k: int) -> list[float]:
    """Per-problem `filtered_n_at_k` of evaluation records with `public` verdicts."""
    missing = [r["task_id"] for r in records if "public" not in r]
    if missing:
        raise ValueError(
            f"{filtered_name(submit, k)} needs each sample's public-test verdict; records of "
            f"{missing[:3]} have none (only stdin/stdout benchmarks, codecontests, have public tests)"
        )
    return [filtered_n_at_k(r["n"], sum(r["public"]), r["c"], submit, k) for r in records]


def summarise(records: list[dict], ks: list[int], filtered: list[tuple[int, int]] = ()) -> dict:
    """Benchmark-level metrics: mean pass@k over problems, mean n@k filtered on the
    public tests for each (n, k) of `filtered`, exact match (mean over problems of
    the fraction of samples equal to the reference), outcome counts."""
    counts = Counter(status for r in records for status in r["statuses"])
    summary = {
        "n_problems": len(records),
        "n_samples": records[0]["n"] if records else 0,
        **{
            f"pass@{k}": float(np.mean([pass_at_k(r["n"], r["c"], k) for r in records])) for k in ks
        },
        **{
            filtered_name(m, k): float(np.mean(filtered_values(records, m, k)))
            for m, k in filtered
            if records
        },
        **{f"n_{status}": counts.get(status, 0) for status in STATUSES},
    }
    if records and "exact" in records[0]:
        summary["exact_match"] = float(np.mean([r["exact"] / r["n"] for r in records]))
    return summary


def with_temperatures(records: list[dict], by_temperature: dict[float, list[dict]]) -> list[dict]:
    """`records` (at the fixed temperature) with each problem's pass counts at every
    sampled temperature under `by_temperature: {"T": {"n": .., "c": ..}}`, from which
    the report picks the oracle temperature per k."""
    out = []
    for i, record in enumerate(records):
        counts = {}
        for temperature, judged in by_temperature.items():
            if judged[i]["task_id"] != record["task_id"]:
                raise ValueError(f"temperature {temperature}: problems out of order at {i}")
            counts[str(temperature)] = {"n": judged[i]["n"], "c": judged[i]["c"]}
        out.append({**record, "by_temperature": counts})
    return out


def end_token_ids(model_dir: str | Path, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS plus the eos ids of the
    model directory's generation_config.json (chat models end a turn with a token
    of their own and list several)."""
    # imported here: wmtp.stages.report reads this module's pass@k and must not import torch
    from wmtp.core.checkpoints import read_generation_config

    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    listed = (read_generation_config(model_dir) or {}).get("eos_token_id")
    ids += [listed] if isinstance(listed, int) else list(listed or [])
    return sorted(set(ids))


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def _problems(benchmark: str, data_path: str | Path | None, shots_path: str | Path | None) -> list[Problem]:
    """The benchmark's problems; with `shots_path` (MBPP, three-shot) in Code Llama's
    3-shot prompt, whose examples come from that prompt split."""
    if shots_path is None:
        return load_benchmark(benchmark, data_path)
    return load_mbpp(data_path, mbpp_shots(shots_path))


def evaluate_model(
    model_dir: str | Path,
    benchmark: str,
    data_path: str | Path | None,
    settings: EvalSettings,
    seed: int,
    out_json: str | Path,
    out_jsonl: str | Path,
    device: str = "cpu",
    fmt: PromptFormat | None = None,
    shots_path: str | Path | None = None,
) -> dict:
    """Sample `settings.n_samples` completions per problem from the model in
    `model_dir`, judge them in the sandbox, write the summary json and the
    per-problem jsonl (atomically), log the metrics to the model's MLflow run if
    it has one (`tracking.json`), and return the summary.

    Prompts are in the format the model's tokenizer records (the one it was
    trained with, `wmtp.data.prompts`) unless `fmt` overrides it; generation ends at
    any of the model's end ids (`end_token_ids`). MBPP with `settings.mbpp_prompt`
    three-shot takes its examples from MBPP's prompt split at `shots_path`."""
    # imported here: wmtp.stages.report reads this module's pass@k and must not import torch
    import torch
    from transformers import AutoTokenizer

    from wmtp.core.checkpoints import load_model

    ks = settings.ks.get(benchmark)
    if not ks:
        raise ValueError(f"eval.ks has no k values for benchmark {benchmark!r}")
    started = time.perf_counter()
    few_shot = benchmark == "mbpp" and settings.mbpp_prompt == "three-shot"
    if few_shot and shots_path is None:
        raise ValueError("eval.mbpp_prompt = 'three-shot' needs MBPP's prompt split (shots_path) for its examples")
    problems = _problems(benchmark, data_path, shots_path if few_shot else None)[: settings.max_problems]
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    fmt = fmt or prompt_format(tokenizer)
    if few_shot and fmt != "raw":
        raise ValueError(f"eval.mbpp_prompt = 'three-shot' is a raw-format prompt; {model_dir} is in the {fmt} format")
    end_ids = end_token_ids(model_dir, tokenizer)
    if settings.engine == "vllm":
        sampled = sample_vllm(model_dir, tokenizer, problems, settings, seed, fmt, end_ids)
    else:
        model = load_model(model_dir, device)
        sampled = sample_own(model, tokenizer, problems, settings, seed, fmt, end_ids)
    by_temperature = {
        temperature: evaluate_completions(
            problems, s.completions, settings.model_copy(update={"temperature": temperature}),
            exact=benchmark in MBPP_FORMAT, progress=True,
        )  # fmt: skip
        for temperature, s in sampled.items()
    }
    records = by_temperature[settings.temperature]
    fixed = sampled[settings.temperature]
    gen_seconds, decoded, kept = fixed.seconds, fixed.decoded, fixed.kept
    if len(by_temperature) > 1:
        records = with_temperatures(records, by_temperature)
    filtered = settings.filtered_for(benchmark)
    summary = {
        "benchmark": benchmark,
        **summarise(records, ks, filtered),
        **(
            {"by_temperature": {str(t): summarise(r, ks) for t, r in by_temperature.items()}}
            if len(by_temperature) > 1
            else {}
        ),
        "model_dir": str(model_dir),
        "data_path": None if data_path is None else str(data_path),
        "seed": seed,
        "prompt_format": fmt,
        "engine": settings.engine,
        **({"mbpp_prompt": settings.mbpp_prompt} if benchmark == "mbpp" else {}),
        "speculative": settings.speculative,
        "generation_seconds": gen_seconds,
        "decoded_tokens": decoded,
        "kept_tokens": kept,
        "decoded_tokens_per_s": _rate(decoded, gen_seconds),
        "kept_tokens_per_s": _rate(kept, gen_seconds),
        "wall_seconds": time.perf_counter() - started,
    }
    write_text_atomic(out_jsonl, "".join(json.dumps(r) + "\n" for r in records))
    write_json_atomic(out_json, summary, sort_keys=False)
    log_to_model_run(model_dir, summary_metrics(benchmark, summary, ks))
    return summary


def summary_metrics(benchmark: str, summary: dict, ks: list[int]) -> dict[str, float]:
    """The MLflow metrics of one evaluation summary: pass@k per k and exact match,
    named with the benchmark's `METRIC_PREFIX` (`mbpp_pass@1`, ...)."""
    prefix = METRIC_PREFIX.get(benchmark, benchmark.replace("-", "_"))
    metrics = {f"{prefix}_pass@{k}": summary[f"pass@{k}"] for k in ks}
    metrics |= {f"{prefix}_{key}": value for key, value in summary.items() if parse_filtered(key)}
    if "exact_match" in summary:
        metrics[f"{prefix}_exact_match"] = summary["exact_match"]
    return metrics
