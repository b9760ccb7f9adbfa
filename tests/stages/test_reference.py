"""The reference fine-tuning stage on a tiny HF causal LM: it learns its split, writes
a verified model directory that the refce stage reads, and refuses unclean data."""

from __future__ import annotations

import json

import pytest
import torch

from tests.data.test_training import mbpp_rows
from wmtp.config.schema import DataSettings, ReferenceFinetuneSettings
from wmtp.core.checkpoints import verify_model_files
from wmtp.data.training import build_examples, collate
from wmtp.infra import storage
from wmtp.stages.download import MBPP_SPLIT_SIZES
from wmtp.stages.refce import load_reference, read_table, refce_stage
from wmtp.stages.reference import finetune_reference, masked_ce, read_finetune_rows

DATA = DataSettings(max_seq_len=256)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama reference (HF format, with the download stage's manifest), a base
    directory holding the pipeline's tokenizer, a fine-tuning split and a training split."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("reference")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    ref = root / "ref"
    LlamaForCausalLM(config).save_pretrained(ref)
    tiny_tokenizer.save_pretrained(ref)
    storage.write_manifest(ref, {"kind": "model", "source": "test"})
    base = root / "base"
    tiny_tokenizer.save_pretrained(base)
    finetune, train = mbpp_rows(8), mbpp_rows(6)
    train["task_id"] = train["task_id"] + 1000
    train["text"] = train["text"] + " Then another."
    finetune.to_parquet(root / "validation.parquet")
    train.to_parquet(root / "train.parquet")
    return root


def settings(**overrides) -> ReferenceFinetuneSettings:
    fields = dict(enabled=True, epochs=10.0, micro_batch_size=4, lr=3e-3, warmup_steps=1)
    return ReferenceFinetuneSettings(**{**fields, **overrides})


def mean_ce(model_dir, tokenizer, path) -> float:
    model = load_reference(model_dir)
    examples = build_examples(read_finetune_rows([path]), tokenizer, DATA.max_seq_len)
    with torch.no_grad():
        return float(masked_ce(model, collate(examples, tokenizer.pad_token_id)))


def test_finetuned_reference_learns_its_split_and_feeds_refce(dirs, tiny_tokenizer, tmp_path):
    out = finetune_reference(
        dirs / "ref", dirs / "base", [dirs / "validation.parquet"], tmp_path / "reference" / "model",
        settings(), DATA, exclude=[dirs / "train.parquet"], model_id="test:ref",
    )  # fmt: skip
    verify_model_files(out)  # the manifest covers every file it wrote
    manifest = json.loads((out / storage.MANIFEST_FILE).read_text())
    assert manifest["fine_tuned_from"] == "test:ref" and manifest["examples"] == 8
    assert manifest["steps"] == 20  # 10 epochs x floor(8 / 4) batches
    assert manifest["loss_last_step"] < manifest["loss_first_step"]
    before = mean_ce(dirs / "ref", tiny_tokenizer, dirs / "validation.parquet")
    after = mean_ce(out, tiny_tokenizer, dirs / "validation.parquet")
    assert after < 0.8 * before, (before, after)
    assert not list(out.parent.glob(".model.*"))  # no staging directory left behind

    table = refce_stage(out, dirs / "base", dirs / "train.parquet", tmp_path / "refce.parquet", DATA)
    assert read_table(table).num_rows > 0


def test_same_seed_same_reference(dirs, tmp_path):
    runs = [
        finetune_reference(
            dirs / "ref", dirs / "base", [dirs / "validation.parquet"], tmp_path / f"r{i}",
            settings(max_steps=3), DATA,
        )  # fmt: skip
        for i in range(2)
    ]
    files = [json.loads((r / storage.MANIFEST_FILE).read_text())["files"] for r in runs]
    assert files[0]["model.safetensors"] == files[1]["model.safetensors"]


def test_overlap_with_the_training_split_is_refused(dirs, tmp_path):
    with pytest.raises(ValueError, match="reference_finetune.splits share problems with .*validation.parquet: task ids"):
        finetune_reference(
            dirs / "ref", dirs / "base", [dirs / "validation.parquet"], tmp_path / "out",
            settings(), DATA, exclude=[dirs / "train.parquet", dirs / "validation.parquet"],
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_schema_knows_mbpps_splits():
    from wmtp.config.schema import MBPP_FORMAT_SPLITS

    assert set(MBPP_FORMAT_SPLITS["mbpp"]) == set(MBPP_SPLIT_SIZES)
