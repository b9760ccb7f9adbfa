"""Is the tiny default a meaningful miniature? Base vs fine-tuned pass@k on tiny-mbpp.

Builds the base and reference models and the benchmark exactly as the download
stage does, fine-tunes the base on the train split the way the trainer does
(plain MTP loss on solution tokens, all weights 1, AdamW, the trainer's lr
schedule `wmtp.core.schedule` with the config's `train:` settings as baseline-mtp
gets them; one process, no DeepSpeed), then samples n completions per test problem
(temperature 0.8, top-p 0.95) from the base, the fine-tuned model and optionally
the reference, and prints pass@1 / pass@10 and the wall time of every part.
Problems come from the validation split unless `--split test` is given: tuning
(training length, lr) is done on validation, never on the test split the table
reports (docs/tiny.md says which figures came from which split).

    python benchmarks/tiny_quality.py --out /tmp/tinyq [--steps 300] [--set dim=96 ...]

Sampling and execution are the pipeline's own (`wmtp.core.sample.generate`, the
sandbox via `wmtp.stages.evaluate`), so its pass@k means what the report's does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from wmtp.config.paths import TEST_SPLIT, VALIDATION_SPLIT
from wmtp.config.registry import BASELINE
from wmtp.config.schema import EvalSettings, Recipe, TrainSettings, load_config
from wmtp.core.checkpoints import load_model
from wmtp.core.sample import generate
from wmtp.data.problems import load_mbpp
from wmtp.stages.evaluate import evaluate_completions, summarise
from wmtp.tiny.build import build_tiny_base, build_tiny_ref, tiny_knobs, write_tiny_mbpp
from wmtp.tiny.finetune import finetune

REPO = Path(__file__).resolve().parents[1]


def evaluate(
    model, tokenizer, test_path: Path, *, n: int, seed: int, max_new_tokens: int, max_problems: int
) -> dict:
    """pass@1/pass@10 with the pipeline's own sampler and sandbox (wmtp.core.sample,
    wmtp.stages.evaluate), so the figures mean what the report's mean."""
    problems = load_mbpp(test_path)[:max_problems]
    ks = [1, min(10, n)]
    settings = EvalSettings(
        n_samples=n,
        temperature=0.8,
        top_p=0.95,
        max_new_tokens=max_new_tokens,
        ks={"tiny-mbpp": ks},
    )
    completions = generate(
        model,
        tokenizer,
        [p.prompt for p in problems],
        n=n,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        progress=True,
    )
    records = evaluate_completions(problems, completions, settings, progress=True)
    summary = summarise(records, ks)
    lengths = [len(c) for group in completions for c in group]
    return {
        "pass@1": summary["pass@1"],
        "pass@10": summary[f"pass@{min(10, n)}"],
        "mean_chars": sum(lengths) / len(lengths),
    }


def finetune_settings(recipes: dict[str, Recipe], args: argparse.Namespace) -> TrainSettings:
    """The `train:` settings the trainer gives baseline-mtp under `--config`, with
    --lr and --batch-size on top."""
    settings = recipes[BASELINE].train
    updates = {"lr": args.lr, "micro_batch_size": args.batch_size}
    return settings.model_copy(update={k: v for k, v in updates.items() if v is not None})


def parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for the built models and data"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="config/config.yaml", help="fine-tuning settings: its train:")
    parser.add_argument("--steps", type=int, help="fine-tuning steps (default: the config's epochs)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the config's)")
    parser.add_argument("--batch-size", type=int, help="batch size (default: the config's micro batch)")
    parser.add_argument("--n", type=int, default=10, help="samples per problem")
    parser.add_argument(
        "--split", choices=(VALIDATION_SPLIT, TEST_SPLIT), default=VALIDATION_SPLIT,
        help="problems to evaluate on (tune on validation; test only to quote a final figure)",
    )  # fmt: skip
    parser.add_argument("--skip-base-eval", action="store_true", help="do not evaluate the base model")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--reuse", action="store_true", help="reuse models already in --out")
    parser.add_argument("--eval-ref", action="store_true", help="also evaluate the reference model")
    parser.add_argument("--skip-ref", action="store_true", help="do not build the reference model")
    parser.add_argument(
        "--max-problems", type=int, default=None, help="evaluate the first N problems of --split"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=JSON", help="tiny settings overrides"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    config, recipes = load_config(args.config, REPO)
    overrides = parse_overrides(args.set)
    print("tiny settings:", json.dumps(tiny_knobs(**overrides)), flush=True)

    times, results = {}, {}
    builds = (("base", build_tiny_base),) + (() if args.skip_ref else (("ref", build_tiny_ref),))
    for name, build in builds:
        if not (args.reuse and (args.out / name).exists()):
            start = time.time()
            build(args.out / name, seed=args.seed, **overrides)
            times[f"build_{name}"] = time.time() - start
    start = time.time()
    write_tiny_mbpp(args.out / "data", seed=args.seed, **overrides)
    times["write_tiny_mbpp"] = time.time() - start

    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.out / "base")
    train_df = pd.read_parquet(args.out / "data" / "train.parquet")
    model = load_model(args.out / "base")

    def judge(name: str, judged_model) -> None:
        """Evaluate on `--split`; result and wall time go under `name`."""
        start = time.time()
        results[name] = evaluate(
            judged_model,
            tokenizer,
            args.out / "data" / f"{args.split}.parquet",
            n=args.n,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            max_problems=args.max_problems,
        )
        times[f"eval_{name}"] = time.time() - start

    results["split"] = args.split
    if not args.skip_base_eval:
        judge("base", model)
    if args.eval_ref:
        judge("ref", AutoModelForCausalLM.from_pretrained(args.out / "ref").eval())
    torch.manual_seed(args.seed)
    start = time.time()
    losses = finetune(
        model,
        tokenizer,
        train_df,
        finetune_settings(recipes, args),
        max_seq_len=config.data.max_seq_len,
        steps=args.steps,
        seed=args.seed,
    )
    times["finetune"] = time.time() - start
    judge("finetuned", model)
    results["finetune_loss_first_last"] = [sum(losses[:10]) / 10, sum(losses[-10:]) / 10]
    print(
        json.dumps(
            {"results": results, "seconds": {k: round(v, 1) for k, v in times.items()}}, indent=2
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
