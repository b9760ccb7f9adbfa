"""The benchmarks still run: each at toy size, in a subprocess, as a researcher
would call it. The figures they print are not checked here (speed and memory goals
belong to the benchmarks themselves); what is checked is that they get to their
table and that the speculative decoder's output equals greedy decoding."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_benchmark(name: str, *args: str, timeout: int = 300) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / name), *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


SPECULATIVE_TOY = (
    "--dim", "32", "--trunk-layers", "2", "--heads", "3", "--vocab", "300",
    "--train-problems", "40", "--stdlib-bytes", "2000", "--steps", "20", "--seq", "64",
    "--prompts", "3", "--new-tokens", "16", "--batch", "2", "--sampled-prompts", "1",
)  # fmt: skip


@pytest.mark.slow
def test_speculative_benchmark_runs_and_matches_greedy():
    out = run_benchmark("speculative.py", *SPECULATIVE_TOY)
    assert "speculative greedy outputs identical to greedy: True" in out
    for setting in ("greedy", "speculative greedy", "sampling", "speculative sampling"):
        for batch in (1, 2):
            assert f"| {setting} | {batch} |" in out, (setting, batch)


@pytest.mark.slow
def test_gpu_benchmark_runs_at_toy_size_on_the_cpu():
    """The GPU benchmark's every section (DeepSpeed bf16 training, loss memory,
    decoding) at toy shapes on the CPU: what a GPU run does, minus the GPU."""
    out = run_benchmark("gpu.py", "--toy", "--speculative-args", "--no-generate", timeout=600)
    assert "## train:" in out and "tokens/s" in out and "MFU" in out
    assert all(name in out for name in ("plain-ce", "wmtp-loss", "naive-mtp"))
    assert "cost/fwd" in out and "speculative greedy outputs identical to greedy: True" in out


@pytest.mark.slow
def test_loss_memory_benchmark_runs():
    out = run_benchmark(
        "loss_memory.py", "--vocab", "500", "--seq", "64", "--heads", "2", "--dim", "32",
        "--trunk-layers", "1", "--steps", "1", "--threads", "1",
    )  # fmt: skip
    assert "wmtp-loss" in out and "naive-mtp" in out


@pytest.mark.slow
def test_refce_throughput_benchmark_runs():
    out = run_benchmark("refce_throughput.py", "--examples", "8", "--repeats", "1")
    assert "ref-CE tok/s" in out


@pytest.mark.slow
def test_tiny_quality_benchmark_runs(tmp_path):
    out = run_benchmark(
        "tiny_quality.py", "--out", str(tmp_path), "--skip-ref", "--steps", "3", "--n", "1",
        "--max-problems", "3", "--max-new-tokens", "16",
        "--set", "pretrain_steps=5", "corpus_documents=200",
    )  # fmt: skip
    assert '"eval_base"' in out and '"eval_finetuned"' in out


@pytest.mark.slow
def test_smol_stages_benchmark_runs(tmp_path, tiny_tokenizer):
    """On a toy HF Llama in place of SmolLM2 (the stages and their scaling are what
    is checked; the real model's figures are in docs/smol.md)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    tiny_tokenizer.save_pretrained(tmp_path / "hf")
    out = run_benchmark(
        "smol_stages.py", "--out", str(tmp_path / "out"), "--hf-dir", str(tmp_path / "hf"),
        "--prompt-format", "raw", "--refce-rows", "4", "--train-steps", "2", "--eval-problems", "1",
    )  # fmt: skip
    assert "extrapolated full run (s)" in out and "train per algorithm (132 steps" in out
