"""Reference CE: exact values, order, sharding, alignment checks, reference loading."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_config

from tests.data.test_training import _other_tokenizer, mbpp_rows
from wmtp.core.checkpoints import save_model
from wmtp.core.model import MTPModel
from wmtp.data.training import build_examples, collate, pack, tokenizer_hash
from wmtp.stages.refce import RefCETable, compute_refce, load_reference, merge_shards, refce_stage


@pytest.fixture(scope="module")
def ref_model(tiny_tokenizer) -> MTPModel:
    model = MTPModel(tiny_config(vocab_size=len(tiny_tokenizer)))
    model.init_weights(seed=1)
    return model.eval()


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    return build_examples(mbpp_rows(7), tiny_tokenizer, max_seq_len=256)


def direct_ce(model, input_ids: list[int]) -> list[float]:
    """One unpadded sequence at a time: -log softmax(logits[j-1])[x_j] for j >= 1."""
    with torch.no_grad():
        logits = model.next_token_logits(torch.tensor([input_ids]))[0]  # (S, V)
    logp = torch.log_softmax(logits.double(), dim=-1)
    return [float(-logp[j - 1, input_ids[j]]) for j in range(1, len(input_ids))]


def test_refce_equals_direct_computation(ref_model, tiny_tokenizer, examples, tmp_path):
    out = compute_refce(
        ref_model,
        tiny_tokenizer,
        examples,
        tmp_path / "ce.parquet",
        batch_size=3,
        model_id="tiny-ref",
    )
    table = pq.read_table(out)
    assert (
        table.schema.field("position").type == "int32"
        and table.schema.field("ce_ref").type == "float"
    )
    meta = table.schema.metadata
    assert meta[b"wmtp.ref_model"] == b"tiny-ref"
    assert meta[b"wmtp.tokenizer_hash"] == tokenizer_hash(tiny_tokenizer).encode()
    assert meta[b"wmtp.n_samples"] == str(len(examples)).encode()
    frame = table.to_pandas()
    assert list(dict.fromkeys(frame["sample_id"])) == [
        e.sample_id for e in examples
    ]  # example order
    for example in examples:
        rows = frame[frame["sample_id"] == example.sample_id]
        assert rows["position"].tolist() == list(range(1, len(example.input_ids)))
        assert rows["token_id"].tolist() == example.input_ids[1:]
        assert rows["ce_ref"].tolist() == pytest.approx(
            direct_ce(ref_model, example.input_ids), abs=1e-5
        )


def test_batch_size_and_padding_do_not_change_ce(ref_model, tiny_tokenizer, examples, tmp_path):
    frames = [
        pq.read_table(
            compute_refce(
                ref_model,
                tiny_tokenizer,
                examples,
                tmp_path / f"b{b}.parquet",
                batch_size=b,
                model_id="m",
            )
        ).to_pandas()
        for b in (1, 4, 7)
    ]
    for frame in frames[1:]:
        assert frame[["sample_id", "position", "token_id"]].equals(
            frames[0][["sample_id", "position", "token_id"]]
        )
        assert (frame["ce_ref"] - frames[0]["ce_ref"]).abs().max() < 1e-5


def test_shards_merge_to_unsharded_result(ref_model, tiny_tokenizer, examples, tmp_path):
    whole = compute_refce(
        ref_model, tiny_tokenizer, examples, tmp_path / "whole.parquet", batch_size=2, model_id="m"
    )
    parts = [
        compute_refce(
            ref_model,
            tiny_tokenizer,
            examples,
            tmp_path / f"part{i}.parquet",
            batch_size=2,
            model_id="m",
            shard=(i, 3),
        )
        for i in range(3)
    ]
    merged = merge_shards(parts[::-1], tmp_path / "merged.parquet")
    a, b = pq.read_table(whole), pq.read_table(merged)
    assert a.schema.metadata == b.schema.metadata
    frame_a, frame_b = a.to_pandas(), b.to_pandas()
    assert frame_a[["sample_id", "position", "token_id"]].equals(
        frame_b[["sample_id", "position", "token_id"]]
    )
    assert (frame_a["ce_ref"] - frame_b["ce_ref"]).abs().max() < 1e-5
    with pytest.raises(ValueError, match=r"missing shard\(s\) \[1\]"):
        merge_shards([parts[0], parts[2]], tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="given twice"):
        merge_shards([parts[0], parts[0], parts[1], parts[2]], tmp_path / "bad.parquet")
    other = compute_refce(
        ref_model,
        tiny_tokenizer,
        examples,
        tmp_path / "other.parquet",
        batch_size=2,
        model_id="other",
        shard=(1, 3),
    )
    with pytest.raises(ValueError, match="disagree on wmtp.ref_model"):
        merge_shards([parts[0], other, parts[2]], tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="merge the parts first"):
        RefCETable.from_parquet(parts[0])


def test_lookup_aligns_by_sample_and_position(ref_model, tiny_tokenizer, examples, tmp_path):
    path = compute_refce(
        ref_model, tiny_tokenizer, examples, tmp_path / "ce.parquet", batch_size=4, model_id="m"
    )
    table = RefCETable.from_parquet(path, tokenizer=tiny_tokenizer)
    chosen = [examples[4], examples[1], examples[6]]
    batch = collate(chosen, tiny_tokenizer.pad_token_id)
    ce = table.lookup(batch.sample_ids, batch.input_ids, batch.loss_mask)
    assert ce.shape == batch.input_ids.shape and ce.dtype == torch.float32
    for b, example in enumerate(chosen):
        n = len(example.input_ids)
        assert ce[b, 0] == 0 and (ce[b, n:] == 0).all()
        assert ce[b, 1:n].tolist() == pytest.approx(
            direct_ce(ref_model, example.input_ids), abs=1e-5
        )
    packed = pack(chosen, max_seq_len=1000)
    assert len(packed) == 1
    pbatch = collate(packed, tiny_tokenizer.pad_token_id)
    pce = table.lookup(pbatch.sample_ids, pbatch.input_ids, pbatch.loss_mask)
    lengths = [len(e.input_ids) for e in chosen]
    assert torch.equal(pce[0, : lengths[0]], ce[0, : lengths[0]])
    start = lengths[0] + lengths[1]
    assert torch.equal(pce[0, start : start + lengths[2]], ce[2, : lengths[2]])


def test_lookup_refuses_misalignment(ref_model, tiny_tokenizer, examples, tmp_path):
    path = compute_refce(
        ref_model, tiny_tokenizer, examples[:4], tmp_path / "ce.parquet", batch_size=4, model_id="m"
    )
    table = RefCETable.from_parquet(path)
    batch = collate(examples[:2], tiny_tokenizer.pad_token_id)
    wrong = batch.input_ids.clone()
    wrong[1, 10] = (wrong[1, 10] + 1) % len(tiny_tokenizer)
    with pytest.raises(ValueError, match=r"token mismatch for sample '101' at position 10"):
        table.lookup(batch.sample_ids, wrong, batch.loss_mask)
    shifted = torch.cat([batch.input_ids[:, :1], batch.input_ids[:, :-1]], dim=1)  # off-by-one data
    with pytest.raises(ValueError, match="token mismatch"):
        table.lookup(batch.sample_ids, shifted, batch.loss_mask)
    extra = collate(examples[3:6], tiny_tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="'104' is not in the reference-CE table"):
        table.lookup(extra.sample_ids, extra.input_ids, extra.loss_mask)
    with pytest.raises(ValueError, match="recompute the reference CE"):
        RefCETable.from_parquet(path, tokenizer=_other_tokenizer(len(tiny_tokenizer)))


def test_load_reference_detects_ours_and_hf(ref_model, tiny_tokenizer, examples, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = load_reference(save_model(ref_model, tmp_path / "ours", tokenizer=tiny_tokenizer))
    assert isinstance(ours, MTPModel)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tiny_tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_reference(tmp_path / "hf")
    assert not isinstance(loaded, MTPModel)
    path = compute_refce(
        loaded, tiny_tokenizer, examples[:3], tmp_path / "hf.parquet", batch_size=2, model_id="hf"
    )
    frame = pq.read_table(path).to_pandas()
    example = examples[0]
    with torch.no_grad():
        logp = torch.log_softmax(loaded(torch.tensor([example.input_ids])).logits[0].double(), -1)
    expected = [float(-logp[j - 1, example.input_ids[j]]) for j in range(1, len(example.input_ids))]
    got = frame[frame["sample_id"] == example.sample_id]["ce_ref"].tolist()
    assert got == pytest.approx(expected, abs=1e-5)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_reference(tmp_path)


def test_refce_stage_checks_vocabulary_and_writes_table(ref_model, tiny_tokenizer, tmp_path):
    from wmtp.config.schema import DataSettings

    mbpp_rows(5).to_parquet(tmp_path / "train.parquet")
    base = save_model(ref_model, tmp_path / "base", tokenizer=tiny_tokenizer)
    ref = save_model(ref_model, tmp_path / "ref", tokenizer=tiny_tokenizer)
    out = refce_stage(
        ref,
        base,
        tmp_path / "train.parquet",
        tmp_path / "refce" / "x.parquet",
        DataSettings(max_seq_len=256),
        model_id="tiny:ref",
        batch_size=2,
    )
    table = RefCETable.from_parquet(out, tokenizer=tiny_tokenizer)
    assert len(table) == 5 and table.model_id == "tiny:ref"
    _other_tokenizer(len(tiny_tokenizer)).save_pretrained(tmp_path / "ref")
    with pytest.raises(ValueError, match="do not share a vocabulary"):
        refce_stage(ref, base, tmp_path / "train.parquet", tmp_path / "y.parquet", DataSettings())


def run_workflow_script(name: str, monkeypatch, **fields):
    """Run workflow_scripts/<name> as Snakemake's `script:` would, with a stand-in
    `snakemake` object; stderr is restored afterwards."""
    import runpy
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    from snakemake.iocontainers import Namedlist

    monkeypatch.setattr(sys, "stderr", sys.stderr)
    parts = {
        k: Namedlist(fromdict=v) if isinstance(v, dict) else Namedlist(v)
        for k, v in fields.items()
        if k in ("input", "output", "params", "log")
    }
    smk = SimpleNamespace(
        **parts,
        config=fields.get("config", {}),
        threads=1,
        wildcards=Namedlist(fromdict=fields.get("wildcards", {})),
    )
    script = Path(__file__).resolve().parents[2] / "workflow_scripts" / name
    runpy.run_path(str(script), init_globals={"snakemake": smk})


def test_workflow_scripts_refce_and_merge(ref_model, tiny_tokenizer, tmp_path, monkeypatch):
    from wmtp.config.schema import DataSettings

    mbpp_rows(5).to_parquet(tmp_path / "train.parquet")
    base = save_model(ref_model, tmp_path / "base", tokenizer=tiny_tokenizer)
    ref = save_model(ref_model, tmp_path / "ref", tokenizer=tiny_tokenizer)
    config = {"models": {"ref": {"source": "tiny", "id": "ref"}}}
    inputs = {"ref": str(ref), "base": str(base), "data": str(tmp_path / "train.parquet")}
    settings = {"data": DataSettings(max_seq_len=256).model_dump(mode="json")}
    run_workflow_script(
        "refce.py",
        monkeypatch,
        input=inputs,
        output=[str(tmp_path / "whole.parquet")],
        params={"settings": settings},
        log=[str(tmp_path / "refce.log")],
        config=config,
    )
    for i in range(2):
        run_workflow_script(
            "refce.py",
            monkeypatch,
            input=inputs,
            output=[str(tmp_path / f"p{i}.parquet")],
            params={"settings": settings, "shard": f"{i}/2", "batch_size": 3},
            log=[str(tmp_path / f"refce{i}.log")],
            config=config,
        )
    run_workflow_script(
        "refce_merge.py",
        monkeypatch,
        input=[str(tmp_path / f"p{i}.parquet") for i in range(2)],
        output=[str(tmp_path / "merged.parquet")],
        log=[str(tmp_path / "merge.log")],
    )
    whole = pq.read_table(tmp_path / "whole.parquet")
    merged = pq.read_table(tmp_path / "merged.parquet")
    assert whole.schema.metadata[b"wmtp.ref_model"] == b"tiny:ref"
    assert whole.schema.metadata == merged.schema.metadata and whole.num_rows == merged.num_rows
    assert "ref CE" in (tmp_path / "refce.log").read_text()  # the progress bar went to the log
