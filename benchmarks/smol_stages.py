"""Wall time of the smol setting's stages (config/smol.yaml), run offline on a real
model with the pipeline's own library functions, and the whole run extrapolated.

    python benchmarks/smol_stages.py --out /tmp/smol [--hf-dir DIR] [--refce-rows 32] \\
        [--train-steps 4] [--eval-problems 8] [--prompt-format chat]

No hub here: the model is SmolLM2-135M-Instruct built from PyPI as a plain HF
directory (tests/smollm2.py; or any `--hf-dir`), the same architecture and size as
the setting's SmolLM2-135M, and it also stands in for the 360M reference (so ref-CE
is timed at 135M). MBPP's train split is not on PyPI: the tiny benchmark's
generated MBPP-format rows (374 of them, MBPP's train size) stand in. Each stage
runs on a sample (`--refce-rows`, `--train-steps`, `--eval-problems` of HumanEval
with the config's eval settings) and is scaled to the full run: ref-CE over 374
rows, the optimizer steps the setting's epochs give per algorithm, MBPP + HumanEval (664 problems)
per evaluated model. The critic stage (rollouts on 100 problems) is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

from wmtp.config.schema import ModelSource, TrackingSettings, load_config, optimizer_steps
from wmtp.stages.download import download_model
from wmtp.stages.evaluate import evaluate_model
from wmtp.stages.refce import refce_stage
from wmtp.stages.train import TrainInputs, train
from wmtp.tiny.data import make_tiny_mbpp

REPO = Path(__file__).resolve().parents[1]
MBPP_TRAIN_ROWS = 374
TEST_PROBLEMS = 500 + 164  # MBPP test + HumanEval


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def timed(name: str, results: dict, function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    results[name] = {"seconds": round(time.perf_counter() - started, 1), "load_after": load()}
    print(f"{name}: {results[name]}", flush=True)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hf-dir", type=Path, help="a plain HF Llama dir (default: build SmolLM2-135M-Instruct)")
    parser.add_argument("--config", type=Path, default=REPO / "config" / "smol.yaml")
    parser.add_argument("--prompt-format", choices=("raw", "chat"), default="chat",
                        help="chat for the Instruct stand-in (the setting's base model uses raw)")
    parser.add_argument("--refce-rows", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--eval-problems", type=int, default=8)
    args = parser.parse_args()
    config, recipes = load_config(args.config, base_dir=REPO)
    recipe = recipes["baseline-mtp"]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.hf_dir is None:
        sys.path.insert(0, str(REPO / "tests"))
        from smollm2 import cached_hf_dir

        args.hf_dir = cached_hf_dir(REPO / ".cache")
    results: dict = {"load_at_start": load()}

    base_source = ModelSource(source="local", id=str(args.hf_dir), prompt_format=args.prompt_format,
                              n_future_tokens=config.models.base.n_future_tokens)  # fmt: skip
    base = timed("download base", results, download_model, base_source, args.out / "models" / "base")
    ref = timed("download ref", results, download_model, ModelSource(source="local", id=str(args.hf_dir)),
                args.out / "models" / "ref")  # fmt: skip

    rows = make_tiny_mbpp(MBPP_TRAIN_ROWS, 1, seed=0, noise_comment_prob=0.5)["train"]
    sample = args.out / "train_sample.parquet"
    rows.head(args.refce_rows).to_parquet(sample)
    timed("refce sample", results, refce_stage, ref, base, sample, args.out / "refce.parquet", config.data)

    full = args.out / "train.parquet"
    rows.to_parquet(full)
    steps = args.train_steps
    timed("train sample", results, train, inputs=TrainInputs(base, full), out_dir=args.out / "train",
          recipe=recipe.model_copy(update={"train": recipe.train.model_copy(update={
              "max_steps": steps, "warmup_steps": 1, "log_every": 1, "val_every": steps,
              "checkpoint_every": steps})}),
          data=config.data, seed=0, tracking=TrackingSettings(mlflow=False))  # fmt: skip
    wall = pd.read_parquet(args.out / "train" / "metrics.parquet")["wall_time"].tolist()
    per_step = (wall[-1] - wall[0]) / (len(wall) - 1)  # steady state: set-up and step 1 excluded

    settings = config.eval.model_copy(update={"max_problems": args.eval_problems, "workers": 2})
    summary = timed("eval sample", results, evaluate_model, base, "humaneval", None, settings, 0,
                    args.out / "he.json", args.out / "he.jsonl")  # fmt: skip
    per_problem = results["eval sample"]["seconds"] / args.eval_problems
    n_train = MBPP_TRAIN_ROWS - round(MBPP_TRAIN_ROWS * config.data.val_fraction)
    full_steps = optimizer_steps(recipe.train, n_train)
    results["extrapolated full run (s)"] = {
        "refce (374 rows)": round(results["refce sample"]["seconds"] / args.refce_rows * MBPP_TRAIN_ROWS),
        f"train per algorithm ({full_steps} steps, {per_step:.1f} s/step)": round(per_step * full_steps),
        f"eval per model ({TEST_PROBLEMS} problems x {config.eval.n_samples} samples)": round(
            per_problem * TEST_PROBLEMS),
        "models trained": len(config.trained_algorithms) * len(config.seeds),
        "models evaluated": len(config.algorithms) * len(config.seeds),
    }  # fmt: skip
    results["eval sample summary"] = {k: summary[k] for k in ("pass@1", "decoded_tokens_per_s", "kept_tokens_per_s")}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
