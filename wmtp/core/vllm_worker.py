"""Sample with vLLM's offline engine: the worker `wmtp.core.vllm_engine` starts.

Run as a script in the vLLM environment (`scripts/setup_vllm.sh`), never imported
by the pipeline: vLLM wants its own transformers, and it spawns worker processes,
so the engine lives in a process of its own that exits (and frees its memory)
when the sampling is done. It imports only the standard library and vLLM, so the
vLLM environment needs nothing of wmtp.

    python vllm_worker.py request.json response.json

The request names an exported model directory (a plain Llama, `wmtp export`), the
prompts as token ids (tokenised by the caller, so both engines see the same ids),
and one or more sampling passes (temperature, n, seed). The response holds, per
pass, the generated token ids of every sample of every prompt and the seconds
the pass took; the caller cuts them at the end ids and stop strings exactly as
its own sampler does.

Seeds: vLLM seeds its engine with the first pass's seed, and each request
(prompt) of a pass with `seed * 1_000_003 + prompt index` where the platform
supports per-request seeds (CUDA). vLLM's CPU build refuses per-request seeds
("CPU Generator does not use offset"): there the engine seed alone fixes the
draws, so the same request on the same machine gives the same samples, but a
sample depends on the batch it was scheduled in.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _per_request_seeds() -> bool:
    """Whether this platform's sampler honours `SamplingParams(seed=...)`."""
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


def _params(request: dict, run: dict, seeded: bool) -> list:
    """One `SamplingParams` per prompt of one pass."""
    from vllm import SamplingParams

    greedy = run["temperature"] == 0
    common = dict(
        n=run["n"],
        temperature=run["temperature"],
        top_p=1.0 if greedy else request["top_p"],
        max_tokens=request["max_new_tokens"],
        stop=request["stop"] or None,
        stop_token_ids=request["stop_token_ids"],
        skip_special_tokens=True,
    )
    count = len(request["prompts"])
    if not seeded or greedy:
        return [SamplingParams(**common)] * count
    return [SamplingParams(**common, seed=run["seed"] * 1_000_003 + i) for i in range(count)]


CPU_KV_CACHE_BYTES = 2 << 30  # vLLM's CPU build otherwise reserves 90 % of the machine's memory


def _engine(request: dict):
    from vllm import LLM
    from vllm.platforms import current_platform

    memory = {}
    if current_platform.is_cpu() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        memory["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    return LLM(
        **memory,
        model=request["model"],
        tokenizer=request["model"],
        skip_tokenizer_init=False,
        dtype=request.get("dtype", "auto"),
        seed=request["passes"][0]["seed"],
        max_model_len=request.get("max_model_len"),
        enforce_eager=request.get("enforce_eager", False),
        gpu_memory_utilization=request.get("gpu_memory_utilization", 0.9),
    )


def main(request_path: str, response_path: str) -> None:
    with open(request_path) as handle:
        request = json.load(handle)
    started = time.perf_counter()
    llm = _engine(request)
    start_seconds = time.perf_counter() - started
    seeded = _per_request_seeds()
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    passes = []
    for run in request["passes"]:
        begun = time.perf_counter()
        outputs = llm.generate(prompts, _params(request, run, seeded), use_tqdm=request["progress"])
        samples = [[list(o.token_ids) for o in out.outputs] for out in outputs]
        passes.append({"samples": samples, "seconds": time.perf_counter() - begun})
    import vllm

    response = {
        "passes": passes,
        "engine_start_seconds": start_seconds,
        "per_request_seeds": seeded,
        "vllm_version": vllm.__version__,
    }
    with open(response_path + ".tmp", "w") as handle:
        json.dump(response, handle)
    os.replace(response_path + ".tmp", response_path)


if __name__ == "__main__":  # vLLM spawns its workers: the guard keeps them from rerunning main
    main(*sys.argv[1:3])
