"""Our sampler before and after issue 20, interleaved in one run, at the evaluation's
settings: tokens per second of `wmtp.core.sample.generate` against the frozen old
sampler (tests/core/reference_sampler.py: static batches run to their longest row,
the prompt prefilled once per sample, sampling on the host).

    python benchmarks/sampler_throughput.py                  # the tiny base model
    python benchmarks/sampler_throughput.py --smollm2        # + SmolLM2-135M (chat)

Settings come from the config (`--config`, default config/config.yaml): n_samples,
max_new_tokens, every temperature evaluation samples at (`eval.temperature` and
`eval.oracle_temperatures`), top_p, batch_size. Prompts are the tiny-mbpp test
problems in the model's prompt format, with the stop sequences and end ids the
evaluation uses. The tiny model is the base model of the tiny default, built with
`wmtp.tiny` into `--model-dir` once (a few minutes) and loaded from there after;
any saved MTP model directory (a trained row, say) can be given instead.
SmolLM2-135M-Instruct is the real model of tests/integration/test_real_model.py
(tests/smollm2.py, built once into .cache/), given MTP heads as `download` does,
prompted in the chat format.

Timing is honest about a shared machine: both samplers run the same work
`--rounds` times, alternating which goes first; wall and CPU time are reported
per round with the load average, and the speed-up is the median of the rounds'
ratios. Torch uses `--threads` threads (the eval rule's 1 by default). Greedy
completions of the two samplers are compared (they must be equal); sampled ones
draw from the same distribution with other random numbers, so only their mean
length is shown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from wmtp.config.schema import EvalSettings, TinySettings, load_config
from wmtp.core.checkpoints import CONFIG_FILE, load_model, mtp_from_hf_llama
from wmtp.core.sample import generate
from wmtp.data.problems import load_benchmark
from wmtp.data.prompts import generation_stops, model_prompt, prompt_format
from wmtp.stages.evaluate import end_token_ids
from wmtp.tiny.build import build_tiny_base, write_tiny_mbpp_split

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "core"))
from reference_sampler import old_generate  # noqa: E402

SAMPLERS = {"old": old_generate, "new": generate}


def tiny_model(model_dir: Path, tiny: TinySettings):
    """(model, tokenizer, directory): loaded from `model_dir`, built there first if empty."""
    from transformers import AutoTokenizer

    if not (model_dir / CONFIG_FILE).exists():
        print(f"building the tiny base model into {model_dir} (once) ...", flush=True)
        build_tiny_base(model_dir, tiny, seed=0)
    return load_model(model_dir).eval(), AutoTokenizer.from_pretrained(str(model_dir)), model_dir


def smollm2_model():
    """SmolLM2-135M-Instruct as an MTPModel with 2 heads (as `download` makes it)."""
    from smollm2 import cached_hf_dir
    from transformers import AutoTokenizer

    hf_dir = cached_hf_dir(REPO / ".cache")
    return mtp_from_hf_llama(hf_dir, 2).eval(), AutoTokenizer.from_pretrained(str(hf_dir)), hf_dir


def work(model_dir: Path, tokenizer, problems, fmt: str) -> dict:
    """The arguments `wmtp.stages.evaluate` gives the sampler besides the settings."""
    prompts = [model_prompt(tokenizer, fmt, p.prompt, p.message) for p in problems]
    stop = generation_stops(fmt, problems[0].stop)
    return dict(prompts=prompts, stop=stop, eos_token_ids=end_token_ids(model_dir, tokenizer))


def run(sampler, model, tokenizer, jobs: dict, settings: EvalSettings, temperature: float):
    """(completions, decoded tokens, wall s, CPU s) of one sampler at one temperature."""
    greedy = temperature == 0
    started, cpu = time.perf_counter(), time.process_time()
    completions, decoded = sampler(
        model, tokenizer, jobs["prompts"], n=1 if greedy else settings.n_samples,
        temperature=temperature, top_p=settings.top_p, max_new_tokens=settings.max_new_tokens,
        seed=0, batch_size=settings.batch_size, stop=jobs["stop"],
        eos_token_ids=jobs["eos_token_ids"], with_decoded_tokens=True,
    )  # fmt: skip
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return completions, sum(map(sum, decoded)), wall, cpu


def compare(name: str, model, tokenizer, jobs: dict, settings: EvalSettings, rounds: int) -> None:
    """Time both samplers `rounds` times at every temperature, alternating the order."""
    for temperature in settings.temperatures:
        ratios, cpu_ratios = [], []
        print(f"\n{name}: {len(jobs['prompts'])} prompts, T = {temperature}, top_p = "
              f"{settings.top_p}, n = {1 if temperature == 0 else settings.n_samples}, "
              f"max_new_tokens = {settings.max_new_tokens}, batch_size = {settings.batch_size}")  # fmt: skip
        for r in range(rounds):
            order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
            out = {}
            for key in order:
                out[key] = run(SAMPLERS[key], model, tokenizer, jobs, settings, temperature)
                completions, tokens, wall, cpu = out[key]
                per = tokens / sum(map(len, completions))
                print(f"  round {r + 1} {key}: {tokens} tokens in {wall:.1f} s wall ({cpu:.1f} s "
                      f"CPU): {tokens / wall:.0f} tokens/s, {per:.1f} per completion; load "
                      f"{os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
            (old_c, old_t, old_w, old_cpu), (new_c, new_t, new_w, new_cpu) = out["old"], out["new"]
            if temperature == 0:
                print(f"  greedy completions equal: {old_c == new_c}")
            ratios.append((new_t / new_w) / (old_t / old_w))
            cpu_ratios.append((new_t / new_cpu) / (old_t / old_cpu))
        print(f"  speed-up (new / old tokens per second): wall {statistics.median(ratios):.2f}x "
              f"(rounds {', '.join(f'{x:.2f}' for x in ratios)}), CPU "
              f"{statistics.median(cpu_ratios):.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml")
    parser.add_argument("--model-dir", type=Path, default=REPO / ".cache" / "sampler_throughput" / "tiny-base")
    parser.add_argument("--problems", type=int, default=100, help="tiny-mbpp test problems")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, help="instead of eval.batch_size")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M-Instruct")
    parser.add_argument("--smollm2-problems", type=int, default=4)
    parser.add_argument("--smollm2-rounds", type=int, default=2)
    parser.add_argument("--skip-tiny", action="store_true")
    args = parser.parse_args()
    config, _ = load_config(args.config, base_dir=REPO)
    settings = config.eval
    if args.batch_size:
        settings = settings.model_copy(update={"batch_size": args.batch_size})
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs; "
          f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        data = write_tiny_mbpp_split(Path(tmp) / "test.parquet", "test", config.tiny, seed=0)
        problems = load_benchmark("tiny-mbpp", data)
    if not args.skip_tiny:
        model, tokenizer, model_dir = tiny_model(args.model_dir, config.tiny)
        jobs = work(model_dir, tokenizer, problems[: args.problems], prompt_format(tokenizer))
        compare(f"tiny ({model_dir})", model, tokenizer, jobs, settings, args.rounds)
    if args.smollm2:
        model, tokenizer, model_dir = smollm2_model()
        jobs = work(model_dir, tokenizer, problems[: args.smollm2_problems], "chat")
        compare("SmolLM2-135M-Instruct (chat)", model, tokenizer, jobs, settings, args.smollm2_rounds)
    print(f"\nload average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
