"""Export to Hugging Face: transformers loads head 0's path as an ordinary Llama."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open

from wmtp.cli import main
from wmtp.core.checkpoints import save_model
from wmtp.core.model import MTPModel
from wmtp.stages.export import HEADS_FILE, export_hf, load_exported


@pytest.fixture
def checkpoint(tmp_path, chat_tokenizer):
    """A model of ours with 3 heads whose extra heads differ from head 0, and a
    generation config with two end ids."""
    model = MTPModel(tiny_config(vocab_size=len(chat_tokenizer), n_layers=5, n_future_tokens=3))
    model.init_weights(seed=3)
    directory = save_model(model, tmp_path / "model", tokenizer=chat_tokenizer)
    generation = {"eos_token_id": [chat_tokenizer.eos_token_id, 1], "pad_token_id": 0}
    (directory / "generation_config.json").write_text(json.dumps(generation))
    return model, directory


def test_transformers_loads_head_0_as_a_llama(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model, directory = checkpoint
    out = export_hf(directory, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.num_hidden_layers == model.config.n_trunk_layers + 1
    ids = torch.randint(3, len(AutoTokenizer.from_pretrained(out)), (2, 11))
    with torch.no_grad():
        ours = model.eval().next_token_logits(ids)  # (B, S, V)
        theirs = hf(ids).logits
    assert torch.equal(ours, theirs)
    kept = json.loads((directory / "generation_config.json").read_text())["eos_token_id"]
    assert GenerationConfig.from_pretrained(out).eos_token_id == kept
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(directory).get_vocab()


def test_extra_heads_are_kept_beside_and_load_back(checkpoint, tmp_path):
    model, directory = checkpoint
    out = export_hf(directory, tmp_path / "hf")
    with safe_open(str(out / HEADS_FILE), "pt") as handle:
        assert handle.metadata()["n_future_tokens"] == "3"
        assert {k.split(".")[1] for k in handle.keys()} == {"1", "2"}
    back = load_exported(out)
    ids = torch.randint(3, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(back.eval()(ids), model.eval()(ids))  # every head, (B, S, H, V)


def test_export_command(checkpoint, tmp_path, capsys):
    _, directory = checkpoint
    assert main(["export", "--checkpoint", str(directory), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert main(["export", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    code = main(["eval", "--checkpoint", str(tmp_path / "hf")])  # the export is not ours to evaluate
    assert code == 2 and "a plain causal LM, not a model of ours" in capsys.readouterr().err
