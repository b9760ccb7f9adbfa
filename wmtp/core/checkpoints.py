"""Model files: our own format, Meta's MTP release format, and HF Llama models.

Our format: a model directory holds `config.json` (MTPConfig fields and
`"wmtp_format": "mtp"`, a key transformers does not interpret, so loading the
directory's tokenizer with `AutoTokenizer` stays quiet), `model.safetensors`
(MTPModel state dict), when given, the tokenizer files that
`transformers.AutoTokenizer.from_pretrained(directory)` reads and the source
model's `generation_config.json`, and `manifest.json` (sha256 of each file,
checked on load). Every stage passes models between each other as such directories.

Meta's `facebook/multi-token-prediction` format: `params.json` + `consolidated.pth`
(`layers.{i}` hold the trunk and, last, head 0; `extra_heads.{k}` heads 1..H-1).
Meta's rotary embedding rotates interleaved pairs (2i, 2i+1) of each attention
head; transformers' Llama rotates halves (i, i + head_dim/2). The two are the
same function once the rows of wq and wk are permuted, which is all that
conversion does besides renaming.

Large checkpoints are loaded without a second copy in memory: the model is built
on the meta device and the loaded tensors (memory-mapped for `.pth`) are
assigned to it; the dtype is the checkpoint's.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from wmtp.config.schema import is_mtp_model_config
from wmtp.core.model import MTPConfig, MTPModel
from wmtp.infra.atomic import atomic_dir
from wmtp.infra.storage import MANIFEST_FILE, sha256_file, write_manifest

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION_FILE = "generation_config.json"  # as in HF directories: end ids and the like
META_PARAMS_FILE = "params.json"
META_WEIGHTS_FILE = "consolidated.pth"

# Meta block parameter -> transformers LlamaDecoderLayer parameter.
META_BLOCK_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
META_TOP_KEYS = {"tok_embeddings.weight": "tok_embeddings.weight", "norm.weight": "norm.weight",
                 "output.weight": "output.weight"}
# params.json keys of Meta's inference code that do not describe the weights.
META_IGNORED_PARAMS = {"max_batch_size"}
# Checkpoint entries that are not weights (llama-1 era files store rotary frequencies).
META_IGNORED_KEYS = {"rope.freqs"}


def save_model(
    model: MTPModel,
    directory: str | Path,
    tokenizer=None,
    extra: dict | None = None,
    generation_config: dict | None = None,
) -> Path:
    """Write the model (and tokenizer, and the generation config of the model it came
    from) atomically: into a temp dir, then rename, so a killed job never leaves a
    directory that looks finished. A checksum manifest (`manifest.json`, sha256 per
    file) is written last, so `load_model` can tell a damaged file from a good one."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        payload = {"wmtp_format": "mtp", **model.config.to_dict(), **(extra or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if generation_config is not None:
            (tmp / GENERATION_FILE).write_text(json.dumps(generation_config, indent=2) + "\n")
        write_manifest(tmp, {"kind": "model", "written_by": "wmtp.core.checkpoints.save_model"})
    return directory


def read_generation_config(directory: str | Path) -> dict | None:
    """The directory's generation_config.json (None without one), to pass on to the
    models made from it: chat models list several end ids there."""
    path = Path(directory) / GENERATION_FILE
    return json.loads(path.read_text()) if path.exists() else None


def verify_model_files(directory: str | Path) -> None:
    """Check every file recorded in the directory's checksum manifest (sha256);
    raise `ValueError` naming the directory and each missing or changed file.
    Files added after the manifest (tracking.json) are not the model's and are
    not checked. A directory without a manifest only warns: it was written
    before checksums were recorded, and refusing it would strand old results.
    Cost: one read of every file (about 10 s for a 14 GB 7B checkpoint)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} not found")
    manifest = directory / MANIFEST_FILE
    if not manifest.exists():
        warnings.warn(f"{directory}: no {MANIFEST_FILE}, so its files cannot be checked", stacklevel=2)
        return
    try:
        recorded = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest}: not a checksum manifest ({error!r})") from None
    problems = []
    for name, sha in sorted(recorded.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif (actual := sha256_file(path)) != sha:
            problems.append(f"{path}: damaged (sha256 {actual[:12]}, recorded {sha[:12]})")
    if problems:
        raise ValueError(
            f"model directory {directory} does not match its {MANIFEST_FILE}: "
            + "; ".join(problems) + ". Rebuild it (rerun the stage that wrote it)."
        )


def read_config(directory: str | Path) -> MTPConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not is_mtp_model_config(payload):
        raise ValueError(
            f"{directory} is not an MTP model directory (config.json: model_type "
            f"{payload.get('model_type')!r}); a plain causal LM gets its heads in the download "
            "stage: set n_future_tokens on its source (models.base.n_future_tokens)"
        )
    fields = {k: v for k, v in payload.items() if k in MTPConfig.__dataclass_fields__}
    return MTPConfig(**fields)


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> MTPModel:
    """Load a model saved by `save_model` (no DeepSpeed needed), after checking its
    files against the checksum manifest; every error names the directory and file."""
    verify_model_files(directory)
    weights = Path(directory) / WEIGHTS_FILE
    try:
        state = load_file(str(weights), device=str(device))
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{weights}: cannot read the weights ({error})") from None
    return _model_from_state(read_config(directory), state).to(device)


def _model_from_state(config: MTPConfig, state: dict[str, torch.Tensor]) -> MTPModel:
    """An MTPModel whose parameters ARE the given tensors (no random init, no copy).

    Built on the meta device, then the tensors are assigned; the rotary buffers,
    which are computed rather than stored, are rebuilt for real afterwards."""
    with torch.device("meta"):
        model = MTPModel(config)
    model.load_state_dict(state, assign=True)
    model.rotary_emb = LlamaRotaryEmbedding(model.llama_config)
    return model


def meta_to_hf_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute wq/wk rows from Meta's interleaved rotary pairs to HF's rotate-half
    layout (`permute` of transformers' convert_llama_weights_to_hf.py):
    row 2i + j of a head moves to row j * head_dim/2 + i."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `meta_to_hf_rotary`."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_params_to_config(params: dict, max_seq_len: int = 2048, vocab_size: int | None = None) -> MTPConfig:
    """MTPConfig from Meta's `params.json` contents.

    `vocab_size` (from the embedding) replaces the -1 that llama params files may
    carry; Meta's inference-only keys are dropped; any other unknown key raises."""
    fields = {k: v for k, v in params.items() if k not in META_IGNORED_PARAMS}
    unknown = sorted(set(fields) - set(MTPConfig.__dataclass_fields__) - {"max_seq_len"})
    if unknown:
        raise ValueError(f"unknown keys in Meta params: {unknown}")
    fields["max_seq_len"] = max_seq_len
    if vocab_size is not None:
        if fields.get("vocab_size", -1) not in (-1, vocab_size):
            raise ValueError(f"params vocab_size {fields['vocab_size']} != embedding rows {vocab_size}")
        fields["vocab_size"] = vocab_size
    return MTPConfig(**fields)


def _meta_block_name(config: MTPConfig, group: str, index: int) -> str:
    """Our module prefix of Meta's `layers.{index}` / `extra_heads.{index}`."""
    if group == "extra_heads":
        return f"heads.{index + 1}"
    n_trunk = config.n_trunk_layers
    return f"layers.{index}" if index < n_trunk else f"heads.{index - n_trunk}"


def meta_state_to_ours(meta: dict[str, torch.Tensor], config: MTPConfig) -> dict[str, torch.Tensor]:
    """Rename (and rotary-permute) a Meta MTP state dict into MTPModel's names."""
    state, problems = {}, []
    for key, tensor in meta.items():
        if key in META_IGNORED_KEYS:
            continue
        if key in META_TOP_KEYS:
            state[META_TOP_KEYS[key]] = tensor
            continue
        group, _, rest = key.partition(".")
        index, _, param = rest.partition(".")
        if group not in ("layers", "extra_heads") or not index.isdigit() or param not in META_BLOCK_KEYS:
            problems.append(f"unexpected key {key!r}")
            continue
        if param == "attention.wq.weight":
            tensor = meta_to_hf_rotary(tensor, config.n_heads)
        elif param == "attention.wk.weight":
            tensor = meta_to_hf_rotary(tensor, config.kv_heads)
        state[f"{_meta_block_name(config, group, int(index))}.{META_BLOCK_KEYS[param]}"] = tensor
    with torch.device("meta"):
        expected = MTPModel(config).state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        problems.append(f"missing weights for {missing}")
    for key in sorted(set(expected) & set(state)):
        if state[key].shape != expected[key].shape:
            problems.append(f"{key}: shape {tuple(state[key].shape)}, expected {tuple(expected[key].shape)}")
    if problems:
        raise ValueError("checkpoint does not match its params.json: " + "; ".join(problems))
    return state


def load_meta_mtp(directory: str | Path, max_seq_len: int = 2048) -> MTPModel:
    """Load Meta's `facebook/multi-token-prediction` checkpoint (params.json +
    consolidated.pth) as an MTPModel, memory-mapped, in the checkpoint's dtype."""
    directory = Path(directory)
    params = json.loads((directory / META_PARAMS_FILE).read_text())
    meta = torch.load(directory / META_WEIGHTS_FILE, map_location="cpu", mmap=True, weights_only=True)
    n_blocks = len({k.split(".")[1] for k in meta if k.startswith("layers.")})
    n_extra = len({k.split(".")[1] for k in meta if k.startswith("extra_heads.")})
    params.setdefault("n_future_tokens", n_extra + 1)
    config = meta_params_to_config(params, max_seq_len, vocab_size=meta["tok_embeddings.weight"].shape[0])
    expected_blocks = config.n_layers - config.n_future_tokens + 1
    if n_blocks != expected_blocks or n_extra != config.n_future_tokens - 1:
        raise ValueError(
            f"{directory}: {n_blocks} layers + {n_extra} extra_heads, but params.json "
            f"(n_layers={config.n_layers}, n_future_tokens={config.n_future_tokens}) implies "
            f"{expected_blocks} layers + {config.n_future_tokens - 1} extra_heads"
        )
    return _model_from_state(config, meta_state_to_ours(meta, config))


def save_meta_mtp(model: MTPModel, directory: str | Path) -> Path:
    """Write `model` in Meta's format (params.json + consolidated.pth), atomically.

    The inverse of `load_meta_mtp`; used to build test fixtures and to hand a
    fine-tuned model to Meta's own inference code."""
    config = model.config
    if config.intermediate_size is not None and config.intermediate_size != MTPConfig(
        **{**config.to_dict(), "intermediate_size": None}
    ).ffn_hidden_dim:
        raise ValueError("Meta's format cannot express an explicit intermediate_size")
    ours_to_meta = {v: k for k, v in META_BLOCK_KEYS.items()}
    n_trunk = config.n_trunk_layers
    meta = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        if key in META_TOP_KEYS:
            meta[key] = tensor
            continue
        group, index, param = key.split(".", 2)
        index = int(index)
        if param == "self_attn.q_proj.weight":
            tensor = hf_to_meta_rotary(tensor, config.n_heads)
        elif param == "self_attn.k_proj.weight":
            tensor = hf_to_meta_rotary(tensor, config.kv_heads)
        if group == "layers":
            prefix = f"layers.{index}"
        elif index == 0:
            prefix = f"layers.{n_trunk}"
        else:
            prefix = f"extra_heads.{index - 1}"
        meta[f"{prefix}.{ours_to_meta[param]}"] = tensor
    params = {k: v for k, v in config.to_dict().items() if k not in ("max_seq_len", "intermediate_size")}
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        torch.save(meta, tmp / META_WEIGHTS_FILE)
        (tmp / META_PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
    return directory


def mtp_from_hf_llama(hf_model_or_dir, n_future_tokens: int) -> MTPModel:
    """An MTPModel from an HF Llama causal LM (a `LlamaForCausalLM` or its directory).

    Trunk = all layers but the last, head 0 = the last layer (so head 0 computes
    exactly the HF model), heads 1..H-1 start as copies of that last layer, as in
    Gloeckle et al.'s fine-tuning of next-token models. Tied embeddings are
    untied (the unembedding gets its own copy). A model object passed in is
    copied (training the MTP model must not change it); one loaded here from a
    directory gives its tensors away."""
    owned = isinstance(hf_model_or_dir, str | Path)
    if owned:
        from transformers import AutoModelForCausalLM

        hf_model_or_dir = AutoModelForCausalLM.from_pretrained(str(hf_model_or_dir))
    hf = hf_model_or_dir

    def take(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach() if owned else tensor.detach().clone()

    c = hf.config
    rope = dict(getattr(c, "rope_parameters", None) or {})
    problems = []
    if getattr(c, "model_type", None) != "llama":
        problems.append(f"model_type is {getattr(c, 'model_type', None)!r}, not 'llama'")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        problems.append("attention/MLP biases are not supported")
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
    if getattr(c, "head_dim", None) not in (None, c.hidden_size // c.num_attention_heads):
        problems.append(f"head_dim {c.head_dim} != hidden_size / num_attention_heads")
    if problems:
        raise ValueError("cannot convert this HF model to MTP: " + "; ".join(problems))
    n_blocks = c.num_hidden_layers
    config = MTPConfig(
        dim=c.hidden_size,
        n_layers=n_blocks + n_future_tokens - 1,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads,
        vocab_size=c.vocab_size,
        n_future_tokens=n_future_tokens,
        norm_eps=c.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        max_seq_len=c.max_position_embeddings,
        intermediate_size=c.intermediate_size,
    )
    base = hf.get_decoder() if hasattr(hf, "get_decoder") else hf.model
    state = {
        "tok_embeddings.weight": take(base.embed_tokens.weight),
        "norm.weight": take(base.norm.weight),
        "output.weight": hf.get_output_embeddings().weight.detach().clone(),
    }
    for i, layer in enumerate(base.layers):
        for name, tensor in layer.state_dict().items():
            if i < n_blocks - 1:
                state[f"layers.{i}.{name}"] = take(tensor)
            else:
                for k in range(n_future_tokens):
                    state[f"heads.{k}.{name}"] = take(tensor) if k == 0 else tensor.detach().clone()
    return _model_from_state(config, state)
