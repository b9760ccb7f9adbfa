"""A NaN or inf loss stops training with an error that names the step and
the batch (its sample ids), keeping the last good checkpoint; no silent skip.
And the model a training writes carries a checksum manifest."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import tiny_config

from wmtp.config.schema import DataSettings, Recipe, TrackingSettings
from wmtp.core.checkpoints import save_model, verify_model_files
from wmtp.core.model import MTPModel
from wmtp.stages import train as train_lib


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer) -> dict:
    root = tmp_path_factory.mktemp("nan")
    rows = [{"task_id": 100 + i, "text": f"add {i}", "code": f"def add_{i}(x):\n    return x + {i}\n",
             "test_list": [f"assert add_{i}(1) == {i + 1}"]} for i in range(16)]
    pd.DataFrame(rows).to_parquet(root / "train.parquet")
    base = MTPModel(tiny_config(vocab_size=len(tiny_tokenizer), max_seq_len=256))
    base.init_weights(seed=0)
    save_model(base, root / "base", tokenizer=tiny_tokenizer)
    return {"root": root, "base": root / "base", "train": root / "train.parquet"}


def run(setup, out, lr: float, max_steps: int):
    recipe = Recipe.model_validate({"algorithm": "baseline-mtp", "train": {
        "max_steps": max_steps, "micro_batch_size": 4, "lr": lr, "warmup_steps": 0,
        "checkpoint_every": 1, "log_every": 1, "val_every": max_steps}})
    return train_lib.train(inputs=train_lib.TrainInputs(setup["base"], setup["train"]), out_dir=out,
                           recipe=recipe, data=DataSettings(max_seq_len=256, val_fraction=0.125),
                           seed=0, tracking=TrackingSettings(mlflow=False))


@pytest.mark.slow
def test_diverging_training_stops_naming_step_and_samples_and_keeps_the_checkpoint(setup):
    """lr = 1e4 overflows the weights within a few steps (a real divergence, not an
    injected NaN)."""
    out = setup["root"] / "diverging"
    with pytest.raises(train_lib.NonFiniteLoss) as error:
        run(setup, out, lr=1e4, max_steps=8)
    message = str(error.value)
    step = int(message.split(" at step ")[1].split(",")[0])
    assert "micro-batch 1" in message and "samples ['" in message
    kept = out / "checkpoints"
    assert (kept / "latest").read_text().strip() == f"step{step - 1}"
    assert (kept / f"step{step - 1}").is_dir() and f"step{step - 1}" in message
    assert not (out / "model").exists()


@pytest.mark.slow
def test_a_trained_model_has_a_verified_manifest(setup):
    model_dir = run(setup, setup["root"] / "ok", lr=1e-3, max_steps=2)
    assert (model_dir / "manifest.json").exists()
    verify_model_files(model_dir)
