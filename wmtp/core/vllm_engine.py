"""Sampling with vLLM (`eval.engine: vllm`): the same completions files as our sampler.

vLLM cannot share the project's environment (it pins an older transformers), and
its engine spawns processes and holds the GPU until it exits, so it runs in a
process of its own: `vllm_worker.py`, started with the vLLM environment's python
(`eval.vllm_python`, made by `scripts/setup_vllm.sh`). Requests and responses are
JSON files in a temporary directory.

Both engines see the same thing: the prompts are tokenised here with the model's
own tokenizer and sent as token ids; the worker returns token ids, which are cut
at the first end id and stop string by the function our sampler uses
(`wmtp.core.sample.completion_text`). vLLM is told the same stop strings and end
ids so it stops where we would cut, and samples with the same temperature and
top-p; each prompt's n samples share its prefilled prefix (vLLM's `n`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from wmtp.core.sample import completion_text

WORKER = Path(__file__).with_name("vllm_worker.py")
# the environment the worker runs in (its pins; scripts/setup_vllm.sh installs them)
WORKER_ENV_FILE = Path(__file__).resolve().parents[2] / "envs" / "vllm.yaml"


class VllmUnavailable(RuntimeError):
    """The vLLM environment is missing or broken; the message says how to make it."""


@dataclass(frozen=True)
class SamplingPass:
    """One sampling of every prompt: n samples at one temperature (0 = greedy) from
    one seed."""

    temperature: float
    n: int
    seed: int


@dataclass
class PassResult:
    """The completions of one pass (a list of n per prompt), the tokens each decoded
    (stop text and end id included), and the seconds vLLM spent generating them."""

    completions: list[list[str]]
    decoded: list[list[int]]
    seconds: float


def check_vllm_python(python: str | Path) -> None:
    """Fail before any work when `python` cannot import vLLM, naming the setting and
    the command that makes the environment."""
    hint = (
        f"eval.engine = 'vllm' needs vLLM in eval.vllm_python = {str(python)!r}: "
        "run `bash scripts/setup_vllm.sh` (it makes .venv-vllm), or point eval.vllm_python "
        "at an environment's python that has vLLM"
    )
    if not Path(python).exists():
        raise VllmUnavailable(f"{python} does not exist. {hint}")
    found = subprocess.run(
        [str(python), "-c", "import vllm"], capture_output=True, text=True, check=False
    )
    if found.returncode != 0:
        raise VllmUnavailable(f"{python} cannot import vllm ({found.stderr.strip()[-300:]}). {hint}")


def _weights_dtype(model_dir: Path) -> str:
    """The dtype the model was saved in: vLLM's CPU build would otherwise downcast
    float32 weights to bfloat16 (and then its greedy choices differ from ours
    wherever two logits are within bf16's precision)."""
    config = json.loads((model_dir / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "auto")


def _request(
    model_dir: Path,
    encoded: list[list[int]],
    passes: Sequence[SamplingPass],
    *,
    top_p: float,
    max_new_tokens: int,
    stop: Sequence[str],
    end_ids: Collection[int],
    progress: bool,
) -> dict:
    return {
        "model": str(model_dir),
        "dtype": _weights_dtype(model_dir),
        "prompts": encoded,
        "passes": [vars(p) for p in passes],
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "stop": list(stop),
        "stop_token_ids": sorted(end_ids),
        "progress": progress,
    }


def _run_worker(python: str | Path, request: dict) -> dict:
    """Run the worker on `request`; its progress and logs go to our stderr."""
    with tempfile.TemporaryDirectory(prefix="wmtp-vllm-") as tmp:
        request_path, response_path = Path(tmp) / "request.json", Path(tmp) / "response.json"
        request_path.write_text(json.dumps(request))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run(
            [str(python), str(WORKER), str(request_path), str(response_path)],
            stdout=sys.stderr, env=env, check=False,
        )  # fmt: skip
        if done.returncode != 0 or not response_path.exists():
            raise RuntimeError(
                f"the vLLM worker ({python} {WORKER}) failed with exit code {done.returncode} "
                f"on {request['model']}; its output is above"
            )
        return json.loads(response_path.read_text())


def vllm_generate(
    model_dir: str | Path,
    tokenizer,
    prompts: list[str],
    passes: Sequence[SamplingPass],
    *,
    top_p: float,
    max_new_tokens: int,
    stop: tuple[str, ...],
    eos_token_ids: Collection[int],
    python: str | Path,
    progress: bool = False,
) -> list[PassResult]:
    """Every pass of `passes` over `prompts` with vLLM on the plain Llama directory
    `model_dir` (an export: `wmtp.stages.export.export_hf`), in one engine start.

    Completions are cut like `wmtp.core.sample.generate`'s: at the first of
    `eos_token_ids`, then at the first stop string."""
    check_vllm_python(python)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    request = _request(
        Path(model_dir), encoded, passes, top_p=top_p, max_new_tokens=max_new_tokens,
        stop=stop, end_ids=eos_token_ids, progress=progress,
    )  # fmt: skip
    response = _run_worker(python, request)
    results = []
    for answered in response["passes"]:
        samples = answered["samples"]
        completions = [
            [completion_text(tokenizer, tokens, stop, eos_token_ids) for tokens in rows]
            for rows in samples
        ]
        decoded = [[len(tokens) for tokens in rows] for rows in samples]
        results.append(PassResult(completions, decoded, answered["seconds"]))
    return results
