"""Damaged or missing files give a clear error, early, naming the file:
model checksums verified on load, ref-CE tables checked before any training
work, and every file or directory a config names checked when it loads (before
`snakemake -n` plans a job)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_config

from wmtp.config.schema import ConfigError, DataSettings, Recipe, TrackingSettings, load_config
from wmtp.core.checkpoints import WEIGHTS_FILE, load_model, save_model, verify_model_files
from wmtp.core.model import MTPModel
from wmtp.data.training import build_examples, read_split
from wmtp.infra.storage import write_manifest
from wmtp.stages import train as train_lib
from wmtp.stages.refce import check_table, compute_refce, load_reference


def zero_bytes(path: Path, size: int) -> None:
    """Overwrite `size` bytes in the middle of `path` with zeros (a bad sector)."""
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        handle.write(b"\0" * size)


def truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


@pytest.fixture
def model_dir(tmp_path, tiny_model, tiny_tokenizer) -> Path:
    return save_model(tiny_model, tmp_path / "model", tokenizer=tiny_tokenizer)


# --------------------------------------------------------------------- weights


@pytest.mark.parametrize("damage", [lambda p: zero_bytes(p, 64 << 10), truncate], ids=["zeroed", "truncated"])
def test_damaged_weights_are_refused_naming_directory_and_file(model_dir, damage):
    load_model(model_dir)  # intact: loads
    damage(model_dir / WEIGHTS_FILE)
    with pytest.raises(ValueError) as error:
        load_model(model_dir)
    assert str(model_dir) in str(error.value) and WEIGHTS_FILE in str(error.value)


def test_a_damaged_model_is_not_evaluated(model_dir, tmp_path):
    from wmtp.config.schema import EvalSettings
    from wmtp.stages.evaluate import evaluate_model

    zero_bytes(model_dir / WEIGHTS_FILE, 64 << 10)
    with pytest.raises(ValueError, match=str(model_dir)):
        evaluate_model(model_dir, "tiny-mbpp", REPO / "tests" / "fixtures" / "mbpp.jsonl",
                       EvalSettings(n_samples=1, temperature=0, ks={"tiny-mbpp": [1]}), 0,
                       tmp_path / "out.json", tmp_path / "out.jsonl")
    assert not (tmp_path / "out.json").exists()


def test_every_file_of_the_model_is_covered(model_dir):
    (model_dir / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json: damaged"):
        verify_model_files(model_dir)


def test_a_model_without_manifest_loads_with_a_warning(model_dir):
    (model_dir / "manifest.json").unlink()
    with pytest.warns(UserWarning, match=str(model_dir)):
        load_model(model_dir)


def test_damaged_hf_reference_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    directory = tmp_path / "ref"
    LlamaForCausalLM(config).save_pretrained(directory)
    write_manifest(directory, {"kind": "model"})  # as the download stage does
    load_reference(directory)
    weights = directory / "model.safetensors"
    zero_bytes(weights, 16 << 10)
    with pytest.raises(ValueError, match="model.safetensors: damaged"):
        load_reference(directory)


# -------------------------------------------------------------- ref-CE tables


@pytest.fixture
def refce_setup(tmp_path, tiny_tokenizer) -> dict:
    import pandas as pd

    rows = [{"task_id": i, "text": f"add {i}", "code": f"def f(x):\n    return x + {i}\n",
             "test_list": [f"assert f(1) == {i + 1}"]} for i in range(64)]
    train_path = tmp_path / "train.parquet"
    pd.DataFrame(rows).to_parquet(train_path)
    config = tiny_config(vocab_size=len(tiny_tokenizer), max_seq_len=256)
    base = MTPModel(config)
    base.init_weights(seed=0)
    base_dir = save_model(base, tmp_path / "base", tokenizer=tiny_tokenizer)
    examples = build_examples(read_split(train_path), tiny_tokenizer, 256)
    refce = compute_refce(base, tiny_tokenizer, examples, tmp_path / "refce.parquet", batch_size=16,
                          model_id="ref")
    return {"base": base_dir, "train": train_path, "refce": refce}


@pytest.mark.parametrize("damage", [truncate, lambda p: zero_bytes(p, 2048)], ids=["truncated", "zeroed"])
def test_damaged_refce_table_fails_before_training_naming_the_path(refce_setup, damage, monkeypatch):
    assert check_table(refce_setup["refce"]) == []
    damage(refce_setup["refce"])
    problems = check_table(refce_setup["refce"])
    assert problems and all(str(refce_setup["refce"]) in p for p in problems)

    def no_training(*args, **kwargs):
        raise AssertionError("training work started on a damaged table")

    monkeypatch.setattr(train_lib, "_init_distributed", no_training)
    recipe = Recipe.model_validate({"algorithm": "rho1-weighted", "train": {"max_steps": 2, "warmup_steps": 0}})
    with pytest.raises(ValueError, match=str(refce_setup["refce"])):
        inputs = train_lib.TrainInputs(refce_setup["base"], refce_setup["train"], refce_setup["refce"])
        train_lib.train(inputs=inputs, out_dir=refce_setup["base"].parent / "out", recipe=recipe,
                        data=DataSettings(max_seq_len=256), seed=0,
                        tracking=TrackingSettings(mlflow=False))


def test_non_finite_reference_ce_is_a_problem(refce_setup):
    import pyarrow.parquet as pq

    table = pq.read_table(refce_setup["refce"])
    ce = table.column("ce_ref").to_numpy().copy()
    ce[3] = float("nan")
    table = table.set_column(table.schema.get_field_index("ce_ref"), "ce_ref", [ce])
    pq.write_table(table, refce_setup["refce"])
    assert any("NaN or inf" in p for p in check_table(refce_setup["refce"]))


# -------------------------------------------------------- paths in the config


def bad_config(tmp_path: Path) -> dict:
    """The tiny default with a missing DeepSpeed template (in one recipe) and a
    missing local base model directory."""
    data = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    recipe = yaml.safe_load((REPO / data["recipes"]["baseline-mtp"]).read_text())
    recipe.setdefault("train", {})["deepspeed_config"] = "config/deepspeed/zero9.json"
    (tmp_path / "baseline.yaml").write_text(yaml.safe_dump(recipe))
    data["recipes"]["baseline-mtp"] = str(tmp_path / "baseline.yaml")
    data["models"]["base"] = {"source": "local", "id": str(tmp_path / "no-such-model")}
    return data


def test_missing_files_stop_the_config_load_naming_key_and_path(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(bad_config(tmp_path), base_dir=REPO)
    message = str(error.value)
    assert "train.deepspeed_config = 'config/deepspeed/zero9.json'" in message
    assert f"models.base.id = '{tmp_path / 'no-such-model'}'" in message


def test_a_local_directory_that_is_not_a_model(tmp_path):
    data = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    (tmp_path / "empty").mkdir()
    data["models"]["ref"] = {"source": "local", "id": str(tmp_path / "empty")}
    with pytest.raises(ConfigError, match="not a model directory"):
        load_config(data, base_dir=REPO)


def test_missing_local_data_directory(tmp_path):
    data = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    data["data"]["sources"] = {"tiny-mbpp": str(tmp_path / "no-such-data")}
    with pytest.raises(ConfigError, match="data.sources.tiny-mbpp"):
        load_config(data, base_dir=REPO)


@pytest.mark.slow
def test_snakemake_dry_run_stops_before_planning_any_job(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(bad_config(tmp_path)))
    snakemake = shutil.which("snakemake", path=str(Path(sys.executable).parent))
    done = subprocess.run([snakemake, "-n", "--configfile", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "zero9.json" in output and "no-such-model" in output
    assert "Job stats" not in output and "rule " not in done.stdout
