"""Export a model of ours to an ordinary Hugging Face `LlamaForCausalLM` directory.

The next-token path of an MTP model (embedding, trunk, head 0, final norm,
unembedding) is a Llama whose last layer is head 0, so every model the pipeline
trains can be handed to tools that know nothing of MTP (vLLM, lm-eval, the hub):

    python -m wmtp export --checkpoint results/tiny/train/baseline-mtp/seed0/model --out hf/

writes config.json, model.safetensors, the tokenizer and generation_config.json
(`AutoModelForCausalLM.from_pretrained(out)` gives head 0's logits), plus the
extra heads in a side file in a folder of its own, `mtp_heads/heads.safetensors`,
for anyone who wants them (`load_exported` rebuilds the whole MTP model from the
two). The folder keeps the directory a plain Llama: vLLM loads every
`*.safetensors` file at the top of a model directory and refuses one with
parameters its Llama does not have.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wmtp.core.checkpoints import (
    GENERATION_FILE,
    load_model,
    mtp_from_hf_llama,
    read_generation_config,
)
from wmtp.core.model import MTPModel
from wmtp.infra.atomic import atomic_dir

HEADS_FILE = "mtp_heads/heads.safetensors"  # not at the top: vLLM would load it


def llama_state(model: MTPModel) -> dict[str, torch.Tensor]:
    """Head 0's path in `LlamaForCausalLM`'s parameter names: trunk layers 0..T-1,
    head 0 as layer T (T = trunk layers)."""
    state = {
        "model.embed_tokens.weight": model.tok_embeddings.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.output.weight,
    }
    for index, block in enumerate([*model.layers, model.heads[0]]):
        for name, tensor in block.state_dict().items():
            state[f"model.layers.{index}.{name}"] = tensor
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _llama_config(model: MTPModel, tokenizer):
    """The `LlamaConfig` of head 0's path: the MTP model's shape with trunk + 1 layers."""
    from transformers import LlamaConfig

    fields = model.llama_config.to_dict()
    fields.update(
        num_hidden_layers=model.config.n_trunk_layers + 1,
        architectures=["LlamaForCausalLM"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=str(model.output.weight.dtype).removeprefix("torch."),
    )
    return LlamaConfig(**fields)


def _generation_config(checkpoint: Path, tokenizer) -> dict:
    """The checkpoint's generation_config.json if it has one (it keeps the base
    model's end ids), else one with the tokenizer's special ids."""
    kept = read_generation_config(checkpoint)
    if kept is not None:
        return kept
    fields = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return {k: v for k, v in fields.items() if v is not None}


def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the model in `checkpoint` (our format) as a `LlamaForCausalLM`
    directory at `out` (atomically), with heads 1..H-1 in `out/mtp_heads/heads.safetensors`
    (keys `heads.{k}.{param}`, metadata: n_future_tokens and the MTP config)."""
    from transformers import AutoTokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    model = load_model(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    config = _llama_config(model, tokenizer)
    extra = {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in model.heads.state_dict(prefix="heads.").items()
        if not name.startswith("heads.0.")
    }
    metadata = {
        "format": "wmtp extra MTP heads",
        "n_future_tokens": str(model.config.n_future_tokens),
        "mtp_config": json.dumps(model.config.to_dict()),
        "layout": (
            "heads.{k} (k >= 1) is one Llama decoder block on the input of the exported model's "
            "last layer (head 0); its output goes through model.norm and lm_head and predicts "
            "token t+k+1"
        ),
    }
    with atomic_dir(out) as tmp:
        config.save_pretrained(str(tmp))
        save_file(llama_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
        generation = _generation_config(checkpoint, tokenizer)
        (tmp / GENERATION_FILE).write_text(json.dumps(generation, indent=2) + "\n")
        if extra:
            (tmp / HEADS_FILE).parent.mkdir()
            save_file(extra, str(tmp / HEADS_FILE), metadata=metadata)
    return out


def load_exported(directory: str | Path) -> MTPModel:
    """The whole MTP model back from an export: the Llama as trunk + head 0 and the
    side file's heads 1..H-1 (a next-token model when there is no side file)."""
    directory = Path(directory)
    heads_path = directory / HEADS_FILE
    if not heads_path.exists():
        return mtp_from_hf_llama(directory, 1)
    with safe_open(str(heads_path), "pt") as handle:
        n_future = int(handle.metadata()["n_future_tokens"])
        extra = {key: handle.get_tensor(key) for key in handle.keys()}
    model = mtp_from_hf_llama(directory, n_future)
    # mtp_from_hf_llama starts heads 1..H-1 as copies of head 0: put the exported ones in
    state = model.heads.state_dict(prefix="heads.") | extra
    model.heads.load_state_dict({key.removeprefix("heads."): value for key, value in state.items()})
    return model
