"""vLLM against our sampler, interleaved in one run, at the evaluation's settings.

    python benchmarks/vllm_throughput.py                     # the tiny base model
    python benchmarks/vllm_throughput.py --smollm2           # + SmolLM2-135M (chat)
    python benchmarks/vllm_throughput.py --ns 10 200 --problems 100 10

For each model and each n of `--ns` (with the matching number of problems of
`--problems`), both engines sample the same prompts through the evaluation's own
entry points (`wmtp.stages.eval_sampling.sample_own` / `sample_vllm`: same
prompts, stops, end ids, top-p 0.95, temperature 0.8, `--max-new-tokens`),
alternating which goes first. Reported per engine: decoded tokens (stop text
and end ids included) per second of generation, and the wall time of the whole
call, which for vLLM includes the export of the model and the engine's start
(about a minute on CPU, paid once per evaluation job). The tiny model is the
tiny default's base, built into `--model-dir` once; SmolLM2-135M-Instruct is the
real model of the tests (tests/smollm2.py), given 2 MTP heads as `download` does.
vLLM runs from `--vllm-python` (`bash scripts/setup_vllm.sh` makes it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from wmtp.config.schema import EvalSettings, ModelSource
from wmtp.core.checkpoints import load_model
from wmtp.data.problems import load_benchmark
from wmtp.data.prompts import prompt_format
from wmtp.stages.eval_sampling import sample_own, sample_vllm
from wmtp.stages.evaluate import end_token_ids
from wmtp.tiny.build import build_tiny_base, write_tiny_mbpp_split

REPO = Path(__file__).resolve().parents[1]


def tiny_target(model_dir: Path) -> tuple[Path, str, Path]:
    """(model directory, benchmark, data path) of the tiny default's base model."""
    if not (model_dir / "config.json").exists():
        build_tiny_base(model_dir, threads=os.cpu_count() or 1)
    data = model_dir.parent / "tiny-mbpp-test.parquet"
    if not data.exists():
        write_tiny_mbpp_split(data, "test")
    return model_dir, "tiny-mbpp", data


def smollm2_target(work: Path) -> tuple[Path, str, None]:
    """SmolLM2-135M-Instruct with 2 heads, chat format, on HumanEval."""
    sys.path.insert(0, str(REPO / "tests"))
    from smollm2 import cached_hf_dir

    from wmtp.stages.download import download_model

    out = work / "smollm2-mtp"
    if not (out / "config.json").exists():
        source = ModelSource(
            source="local", id=str(cached_hf_dir(REPO / ".cache")), n_future_tokens=2, prompt_format="chat"
        )
        download_model(source, out)
    return out, "humaneval", None


def run_engine(
    engine: str, model_dir: Path, problems, settings: EvalSettings, device: str = "cpu", judge: bool = False
) -> dict:
    """One engine's sampling of `problems` at `settings.temperature`: decoded tokens,
    seconds of generation, tokens/s, the wall time of the whole call, and with
    `judge` the pass@1 of the samples in the sandbox."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fmt, ends = prompt_format(tokenizer), end_token_ids(model_dir, tokenizer)
    started = time.perf_counter()
    if engine == "vllm":
        sampled = sample_vllm(model_dir, tokenizer, problems, settings, 0, fmt, ends)
    else:
        sampled = sample_own(load_model(model_dir, device), tokenizer, problems, settings, 0, fmt, ends)
    wall = time.perf_counter() - started
    result = sampled[settings.temperature]
    judged = {}
    if judge:
        from wmtp.stages.evaluate import evaluate_completions, summarise

        records = evaluate_completions(problems, result.completions, settings)
        judged = {"pass@1": round(summarise(records, [1])["pass@1"], 4)}
    return {
        **judged,
        "decoded_tokens": result.decoded,
        "generation_s": round(result.seconds, 2),
        "tokens_per_s": round(result.decoded / result.seconds, 1),
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "wmtp-bench" / "tiny-base")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M on HumanEval")
    parser.add_argument("--smollm2-only", action="store_true", help="SmolLM2-135M alone")
    parser.add_argument("--ns", type=int, nargs="+", default=[10, 200], help="samples per problem")
    parser.add_argument("--problems", type=int, nargs="+", default=[100, 10], help="problems, one per n")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="our sampler's rows at once")
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="our sampler's")
    parser.add_argument("--judge", action="store_true", help="also run the samples: pass@1 of each engine")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of our sampler")
    args = parser.parse_args(argv)
    if len(args.problems) != len(args.ns):
        parser.error("--problems needs one count per --ns value")
    torch.set_num_threads(args.threads)
    targets = [] if args.smollm2_only else [tiny_target(args.model_dir)]
    if args.smollm2 or args.smollm2_only:
        targets.append(smollm2_target(args.model_dir.parent))
    rows = []
    for model_dir, benchmark, data in targets:
        for index, (n, count) in enumerate(zip(args.ns, args.problems, strict=True)):
            problems = load_benchmark(benchmark, data)[:count]
            settings = EvalSettings(
                n_samples=n, temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size, ks={benchmark: [1]}, vllm_python=args.vllm_python,
            )  # fmt: skip
            order = ("own", "vllm") if index % 2 == 0 else ("vllm", "own")
            measured = {
                engine: run_engine(engine, model_dir, problems, settings, args.device, args.judge) for engine in order
            }
            row = {"model": model_dir.name, "benchmark": benchmark, "n": n, "problems": count, **{
                f"{engine}_{key}": value for engine, m in measured.items() for key, value in m.items()
            }}  # fmt: skip
            row["speedup_tokens_per_s"] = round(row["vllm_tokens_per_s"] / row["own_tokens_per_s"], 2)
            row["load_average"] = round(os.getloadavg()[0], 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| model | n | problems | own tok/s | vLLM tok/s | speed-up | own wall s | vLLM wall s (start incl.) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['n']} | {r['problems']} | {r['own_tokens_per_s']} | {r['vllm_tokens_per_s']} "
              f"| {r['speedup_tokens_per_s']}x | {r['own_wall_s']} | {r['vllm_wall_s']} |")  # fmt: skip


if __name__ == "__main__":  # vLLM's workers are spawned: the guard keeps them from rerunning this
    main()
