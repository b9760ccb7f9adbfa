"""Model files: our own format (safetensors + config json + tokenizer).

A model directory holds `config.json` (MTPConfig fields), `model.safetensors`
(MTPModel state dict) and, when given, the tokenizer files that
`transformers.AutoTokenizer.from_pretrained(directory)` reads. Every stage passes
models between each other as such directories.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from wmtp.model import MTPConfig, MTPModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_model(model: MTPModel, directory: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Write the model (and tokenizer) atomically: into a temp dir, then rename, so
    a killed job never leaves a directory that looks finished."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        payload = {"model_type": "wmtp-mtp", **model.config.to_dict(), **(extra or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_config(directory: str | Path) -> MTPConfig:
    payload = json.loads((Path(directory) / CONFIG_FILE).read_text())
    fields = {k: v for k, v in payload.items() if k in MTPConfig.__dataclass_fields__}
    return MTPConfig(**fields)


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> MTPModel:
    """Load a model saved by `save_model` (no DeepSpeed needed)."""
    model = MTPModel(read_config(directory))
    model.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE), device=str(device)))
    return model.to(device)
