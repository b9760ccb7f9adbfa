"""Download stage: every model source and dataset on local fixtures in the real
formats, with the hub calls monkeypatched to copy from those fixtures and S3 served
by moto on loopback."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import boto3
import huggingface_hub
import pandas as pd
import pytest
import torch
from conftest import tiny_config

from tests.infra.test_storage import s3_endpoint  # noqa: F401  (session fixture: moto on loopback)
from wmtp.config.schema import ModelSource, TinySettings
from wmtp.core import checkpoints
from wmtp.core.model import MTPModel
from wmtp.infra import storage
from wmtp.stages import download

# ---------------------------------------------------------------- hub fakes


def fake_snapshot(fixture_root: Path, calls: list):
    """A `snapshot_download` that copies `fixture_root/<repo_id>` (filtered by
    allow_patterns like the hub) into `local_dir` and records the call."""
    import fnmatch

    def snapshot_download(repo_id, revision=None, allow_patterns=None, repo_type=None, local_dir=None, **_):
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns,
                      "repo_type": repo_type})
        src, dst = fixture_root / repo_id, Path(local_dir)
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            rel = path.relative_to(src).as_posix()
            if allow_patterns is None or any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, dst / rel)
        return str(dst)

    return snapshot_download


def fake_hub_file(fixture_root: Path, calls: list):
    def hf_hub_download(repo_id, filename, repo_type=None, local_dir=None, **_):
        calls.append({"repo_id": repo_id, "filename": filename, "repo_type": repo_type})
        src = fixture_root / repo_id / filename
        if not src.exists():
            raise FileNotFoundError(f"fake hub: {repo_id}/{filename}")
        dst = Path(local_dir) / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
        return str(dst)

    return hf_hub_download


@pytest.fixture
def hub(tmp_path, monkeypatch):
    root, calls = tmp_path / "hub", []
    root.mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot(root, calls))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub_file(root, calls))
    return root, calls


# ---------------------------------------------------------------- model fixtures


def _hf_llama(directory: Path, tokenizer) -> Path:
    """A tiny HF LlamaForCausalLM saved with save_pretrained, with its tokenizer."""
    from transformers import LlamaForCausalLM

    config = tiny_config(vocab_size=len(tokenizer), n_future_tokens=1).to_llama_config()
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def _sentencepiece_model(path: Path) -> Path:
    spm = pytest.importorskip("sentencepiece")
    lines = Path(checkpoints.__file__).read_text().splitlines()
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, minloglevel=2,
                                   # Llama 2's settings: no normalisation, newlines become byte tokens
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   split_digits=True)
    path.write_bytes(buffer.getvalue())
    return path


def _meta_checkpoint(directory: Path, vocab_size: int) -> dict:
    """Meta's MTP layout: params.json + consolidated.pth (`layers` = trunk + head 0,
    `extra_heads` = heads 1..H-1), written by `checkpoints.save_meta_mtp`."""
    config = tiny_config(vocab_size=vocab_size)
    directory.mkdir(parents=True)
    model = MTPModel(config)
    model.init_weights(seed=0)
    checkpoints.save_meta_mtp(model, directory)
    return config.to_dict()


def _tree_without_manifest(path: Path) -> dict[str, str]:
    return storage.sha256_tree(path)


# ---------------------------------------------------------------- models


def test_local_copy_with_manifest(tmp_path, tiny_tokenizer):
    src = _hf_llama(tmp_path / "src", tiny_tokenizer)
    out = download.download_model(ModelSource(source="local", id=str(src)), tmp_path / "models" / "ref")
    assert _tree_without_manifest(out) == storage.sha256_tree(src)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "local" and manifest["id"] == str(src)
    assert manifest["files"] == storage.sha256_tree(src)
    storage.verify_manifest(out)
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["ref"]  # no temp dirs left


def test_hf_reference_kept_as_published(tmp_path, hub, tiny_tokenizer):
    root, calls = hub
    src = _hf_llama(root / "org" / "coder-ref", tiny_tokenizer)
    source = ModelSource(source="hf", id="org/coder-ref", revision="abc123")
    out = download.download_model(source, tmp_path / "ref")
    assert calls == [{"repo_id": "org/coder-ref", "revision": "abc123", "allow_patterns": None, "repo_type": None}]
    assert _tree_without_manifest(out) == storage.sha256_tree(src)
    assert json.loads((out / "manifest.json").read_text())["revision"] == "abc123"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(out)).config.vocab_size == len(tiny_tokenizer)


def test_hf_base_gets_heads_and_our_format(tmp_path, hub, tiny_tokenizer):
    root, _ = hub
    _hf_llama(root / "org" / "plain-llama", tiny_tokenizer)
    source = ModelSource(source="hf", id="org/plain-llama", n_future_tokens=3)
    out = download.download_model(source, tmp_path / "base")
    model = checkpoints.load_model(out)
    assert model.config.n_future_tokens == 3 and len(model.heads) == 3
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).pad_token_id is not None
    storage.verify_manifest(out)


def test_sentencepiece_tokenizer_matches_sentencepiece(tmp_path):
    spm_file = _sentencepiece_model(tmp_path / "tokenizer.model")
    import sentencepiece

    tokenizer = download.sentencepiece_tokenizer(spm_file)
    text = "def load_model(directory):\n    return x + 1"
    expected = sentencepiece.SentencePieceProcessor(model_file=str(spm_file)).encode(text)
    assert tokenizer(text, add_special_tokens=False).input_ids == expected
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    tokenizer.save_pretrained(str(tmp_path / "saved"))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "saved"))(text, add_special_tokens=False).input_ids == expected


def test_meta_checkpoint_converted(tmp_path, hub):
    root, calls = hub
    repo = root / "facebook" / "multi-token-prediction"
    _sentencepiece_model(tmp_path / "sp.model")
    repo.mkdir(parents=True)
    shutil.copy(tmp_path / "sp.model", repo / "tokenizer.model")
    params = _meta_checkpoint(repo / "7B_1T_4", vocab_size=400)
    (repo / "7B_200B_1").mkdir()
    (repo / "7B_200B_1" / "params.json").write_text("{}")  # another model: must not be fetched
    source = ModelSource(source="meta", id="facebook/multi-token-prediction", subfolder="7B_1T_4", revision="r1")
    out = download.download_model(source, tmp_path / "base")
    assert calls[0]["allow_patterns"] == ["7B_1T_4/*", "tokenizer.model"] and calls[0]["revision"] == "r1"
    model = checkpoints.load_model(out)
    assert model.config.n_future_tokens == params["n_future_tokens"]
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(out))) == 400
    storage.verify_manifest(out)


def test_meta_needs_subfolder(tmp_path):
    with pytest.raises(ValueError, match="needs a subfolder"):
        download.download_model(ModelSource(source="meta", id="facebook/multi-token-prediction"), tmp_path / "b")
    assert not list(tmp_path.iterdir())


def test_s3_model_round_trip(tmp_path, s3_endpoint, tiny_tokenizer):  # noqa: F811
    src = _hf_llama(tmp_path / "src", tiny_tokenizer)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="models")
    storage.write_manifest(src, {"source": "upload"})
    storage.upload_dir(src, "s3://models/ref", endpoint_url=s3_endpoint)
    out = download.download_model(ModelSource(source="s3", id="s3://models/ref"), tmp_path / "ref",
                                  endpoint_url=s3_endpoint)
    assert _tree_without_manifest(out) == _tree_without_manifest(src)
    assert json.loads((out / "manifest.json").read_text())["source"] == "s3"


def test_unknown_tiny_role(tmp_path):
    with pytest.raises(ValueError, match="tiny source id"):
        download.download_model(ModelSource(source="tiny", id="critic"), tmp_path / "x")


@pytest.mark.slow
def test_tiny_base_is_deterministic(tmp_path):
    settings = TinySettings(vocab_size=300, dim=32, n_layers=3, n_heads=2, n_future_tokens=2, max_seq_len=128,
                            pretrain_steps=2, ref_pretrain_steps=2, pretrain_batch_size=2)
    a = download.download_model(ModelSource(source="tiny", id="base"), tmp_path / "a", tiny=settings, seed=0)
    b = download.download_model(ModelSource(source="tiny", id="base"), tmp_path / "b", tiny=settings, seed=0)
    assert storage.sha256_tree(a) == storage.sha256_tree(b)
    assert checkpoints.load_model(a).config.n_future_tokens == 2
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["tiny"]["pretrain_steps"] == 2


# ---------------------------------------------------------------- datasets


def _mbpp_rows(n: int, first: int = 1) -> pd.DataFrame:
    return pd.DataFrame({
        "task_id": list(range(first, first + n)),
        "text": [f"Write a function to add {i}." for i in range(n)],
        "code": [f"def add_{i}(x):\n    return x + {i}" for i in range(n)],
        "test_list": [[f"assert add_{i}(1) == {1 + i}"] for i in range(n)],
        "test_setup_code": [""] * n,
        "challenge_test_list": [[] for _ in range(n)],
    })


def test_mbpp_from_hub_parquet(tmp_path, hub):
    root, calls = hub
    rows = _mbpp_rows(5)
    (root / download.MBPP_REPO / "full").mkdir(parents=True)
    rows.to_parquet(root / download.MBPP_REPO / "full" / "test-00000-of-00001.parquet")
    out = download.download_dataset("mbpp", "test", tmp_path / "data" / "mbpp" / "test.parquet")
    assert calls == [{"repo_id": download.MBPP_REPO, "filename": "full/test-00000-of-00001.parquet",
                      "repo_type": "dataset"}]
    got = pd.read_parquet(out)
    assert list(got.columns) == list(rows.columns) and got["task_id"].tolist() == [1, 2, 3, 4, 5]
    assert list(got["test_list"].iloc[2]) == ["assert add_2(1) == 3"]
    manifest = json.loads(download.manifest_path(out).read_text())
    assert manifest["sha256"] == storage.sha256_file(out) and manifest["rows"] == 5
    assert sorted(p.name for p in out.parent.iterdir()) == ["test.manifest.json", "test.parquet"]


def test_mbpp_from_local_copy_and_bad_split(tmp_path):
    src = tmp_path / "copy"
    src.mkdir()
    _mbpp_rows(3, first=601).to_parquet(src / "train.parquet")
    out = download.download_dataset("mbpp", "train", tmp_path / "train.parquet", source=str(src))
    assert pd.read_parquet(out)["task_id"].tolist() == [601, 602, 603]
    with pytest.raises(ValueError, match="mbpp has splits"):
        download.download_dataset("mbpp", "dev", tmp_path / "dev.parquet", source=str(src))


def test_missing_columns_are_named(tmp_path):
    src = tmp_path / "copy"
    src.mkdir()
    _mbpp_rows(2).drop(columns=["code"]).to_parquet(src / "test.parquet")
    with pytest.raises(ValueError, match=r"missing columns \['code'\]"):
        download.download_dataset("mbpp", "test", tmp_path / "out" / "test.parquet", source=str(src))
    assert not (tmp_path / "out" / "test.parquet").exists()


def _contest_rows(names: list[str]) -> pd.DataFrame:
    tests = {"input": ["1 2\n"], "output": ["3\n"]}
    return pd.DataFrame({
        "name": names,
        "description": [f"Add two numbers ({n})." for n in names],
        "public_tests": [tests] * len(names),
        "private_tests": [tests] * len(names),
        "generated_tests": [{"input": [], "output": []}] * len(names),
        "solutions": [{"language": [3], "solution": ["print(sum(map(int, input().split())))"]}] * len(names),
        "difficulty": [1] * len(names),
    })


def test_codecontests_shards_concatenated(tmp_path, hub):
    root, calls = hub
    data = root / download.CODECONTESTS_REPO / "data"
    data.mkdir(parents=True)
    _contest_rows(["a", "b"]).to_parquet(data / "test-00000-of-00002-aaaa.parquet")
    _contest_rows(["c"]).to_parquet(data / "test-00001-of-00002-bbbb.parquet")
    _contest_rows(["t"]).to_parquet(data / "train-00000-of-00001-cccc.parquet")
    out = download.download_dataset("codecontests", "test", tmp_path / "test.parquet")
    assert calls[0]["allow_patterns"] == ["data/test-*.parquet"] and calls[0]["repo_type"] == "dataset"
    got = pd.read_parquet(out)
    assert got["name"].tolist() == ["a", "b", "c"]
    assert list(got["public_tests"].iloc[0]["output"]) == ["3\n"]


def test_codecontests_train_split_keeps_the_hub_layout_training_reads(tmp_path, hub):
    """The train split is downloaded in deepmind/code_contests' own columns (tests,
    correct and incorrect solutions); training reads its Python 3 solutions."""
    from wmtp.data.training import read_split

    root, calls = hub
    data = root / download.CODECONTESTS_REPO / "data"
    data.mkdir(parents=True)
    rows = _contest_rows(["a", "b"]).assign(
        incorrect_solutions=[{"language": [3], "solution": ["print(0)"]}] * 2
    )
    rows.to_parquet(data / "train-00000-of-00001-cccc.parquet")
    out = download.download_dataset("codecontests", "train", tmp_path / "train.parquet")
    assert calls[0]["allow_patterns"] == ["data/train-*.parquet"]
    assert list(pd.read_parquet(out).columns) == list(rows.columns)
    trained = read_split(out, "codecontests")
    assert trained["task_id"].tolist() == ["a#0", "b#0"]
    assert trained["code"].tolist() == ["print(sum(map(int, input().split())))"] * 2
    rows.drop(columns=["solutions"]).to_parquet(tmp_path / "train.parquet")
    with pytest.raises(ValueError, match=r"missing columns \['solutions'\]"):
        download.download_dataset("codecontests", "train", tmp_path / "out.parquet", source=str(tmp_path))


def test_humaneval_from_package(tmp_path):
    out = download.download_dataset("humaneval", "test", tmp_path / "test.parquet")
    frame = pd.read_parquet(out)
    assert len(frame) == 164 and frame["task_id"].iloc[0] == "HumanEval/0"
    assert set(download.REQUIRED_COLUMNS["humaneval"]) <= set(frame.columns)
    with pytest.raises(ValueError, match="only a test split"):
        download.download_dataset("humaneval", "train", tmp_path / "train.parquet")


def test_tiny_mbpp_split_matches_generator(tmp_path):
    from wmtp.tiny.build import write_tiny_mbpp

    settings = TinySettings(n_train_problems=12, n_test_problems=6, n_validation_problems=5)
    reference = write_tiny_mbpp(tmp_path / "ref", settings, 0)
    for split in ("train", "validation", "test"):
        got = download.download_dataset("tiny-mbpp", split, tmp_path / f"{split}.parquet", tiny=settings)
        pd.testing.assert_frame_equal(pd.read_parquet(got), pd.read_parquet(reference[split]))


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'apps'"):
        download.download_dataset("apps", "test", tmp_path / "x.parquet")


def test_download_workflow_scripts(tmp_path, monkeypatch, tiny_tokenizer):
    from tests.stages.test_report import run_workflow_script

    src = _hf_llama(tmp_path / "src", tiny_tokenizer)
    run_workflow_script(
        "download_model.py", monkeypatch, wildcards={"role": "ref"},
        output=[str(tmp_path / "models" / "ref")],
        params={"settings": {"source": {"source": "local", "id": str(src)}}},
        log=[str(tmp_path / "model.log")], config={"storage": {"endpoint_url": None}},
    )
    storage.verify_manifest(tmp_path / "models" / "ref")
    settings = TinySettings(n_train_problems=5, n_test_problems=3)
    run_workflow_script(
        "download_data.py", monkeypatch, wildcards={"dataset": "tiny-mbpp", "split": "test"},
        output=[str(tmp_path / "data" / "tiny-mbpp" / "test.parquet")],
        params={"settings": {"tiny": settings.model_dump(mode="json")}},
        log=[str(tmp_path / "data.log")], config={},
    )
    assert len(pd.read_parquet(tmp_path / "data" / "tiny-mbpp" / "test.parquet")) == 3
    assert "data/tiny-mbpp/test" in (tmp_path / "data.log").read_text()


def test_conversion_keeps_the_generation_config(tmp_path, tiny_tokenizer):
    """Its end ids (chat models have several) must reach the sampler."""
    src = _hf_llama(tmp_path / "src", tiny_tokenizer)
    generation = {"bos_token_id": 0, "eos_token_id": [1, 5], "pad_token_id": 0}
    (src / "generation_config.json").write_text(json.dumps(generation))
    out = download.download_model(ModelSource(source="local", id=str(src), n_future_tokens=2), tmp_path / "base")
    assert json.loads((out / "generation_config.json").read_text()) == generation
    storage.verify_manifest(out)


def test_prompt_format_is_recorded_in_the_tokenizer(tmp_path, tiny_tokenizer, chat_tokenizer):
    from transformers import AutoTokenizer

    from wmtp.data.prompts import prompt_format

    src = _hf_llama(tmp_path / "chat", chat_tokenizer)
    source = ModelSource(source="local", id=str(src), n_future_tokens=2, prompt_format="chat")
    out = download.download_model(source, tmp_path / "base")
    assert prompt_format(AutoTokenizer.from_pretrained(out)) == "chat"
    storage.verify_manifest(out)
    plain = _hf_llama(tmp_path / "plain", tiny_tokenizer)
    source = ModelSource(source="local", id=str(plain), n_future_tokens=2, prompt_format="chat")
    with pytest.raises(ValueError, match="tokenizer of local:.*has no chat template"):
        download.download_model(source, tmp_path / "base2")
    assert not (tmp_path / "base2").exists()
