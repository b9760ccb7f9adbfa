"""The DeepSpeed trainer on a tiny MTP model and a 16-problem MBPP-like set.

DeepSpeed's first `initialize` on a machine JIT-builds a comm op (~1 min, cached
in TORCH_EXTENSIONS_DIR); every DeepSpeed test lives in this module so that cost
is paid once per CI run. Each `train` call then takes a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO, tiny_config
from safetensors.torch import load_file

from wmtp import train as train_lib
from wmtp.checkpoints import load_model, save_model
from wmtp.config import ConfigError, DataSettings, Recipe, TrackingSettings
from wmtp.data import build_examples, read_split
from wmtp.model import MTPModel

N_PROBLEMS = 16


def mbpp_rows(n: int = N_PROBLEMS) -> pd.DataFrame:
    """MBPP-format problems with short, regular solutions a tiny model can fit."""
    rows = []
    for i in range(n):
        rows.append(
            {
                "task_id": 100 + i,
                "text": f"Write a function to add {i} to a number.",
                "code": f"def add_{i}(x):\n    return x + {i}\n",
                "test_list": [f"assert add_{i}(1) == {i + 1}", f"assert add_{i}(2) == {i + 2}"],
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer) -> dict:
    """Base model dir (with tokenizer), train parquet, ref-CE table, value head."""
    root = tmp_path_factory.mktemp("train")
    train_path = root / "train.parquet"
    mbpp_rows().to_parquet(train_path)
    config = tiny_config(vocab_size=len(tiny_tokenizer), max_seq_len=256)
    base = MTPModel(config)
    base.init_weights(seed=0)
    base_dir = save_model(base, root / "base", tokenizer=tiny_tokenizer)

    from wmtp.refce import compute_refce

    ref = MTPModel(config)
    ref.init_weights(seed=1)
    examples = build_examples(read_split(train_path), tiny_tokenizer, 256)
    refce_path = compute_refce(ref, tiny_tokenizer, examples, root / "refce.parquet", batch_size=8, model_id="ref")
    return {"root": root, "base": base_dir, "train": train_path, "refce": refce_path, "config": config}


def recipe(algorithm: str = "baseline-mtp", *, weighting: dict | None = None, **train) -> Recipe:
    settings = dict(
        max_steps=6, micro_batch_size=4, grad_accum_steps=1, lr=3e-3, warmup_steps=1, min_lr_ratio=0.1,
        checkpoint_every=3, log_every=1, val_every=3,
    )
    settings.update(train)
    payload = {"algorithm": algorithm, "train": settings, "weighting": weighting or {}}
    if algorithm == "critic-wmtp":
        payload["critic"] = {}
    return Recipe.model_validate(payload)


def run(setup, out: Path, rec: Recipe, *, mlflow: bool = False, **kwargs) -> Path:
    return train_lib.train(
        base_model_dir=setup["base"], train_path=setup["train"], out_dir=out, recipe=rec,
        data=DataSettings(max_seq_len=256, val_fraction=0.125), seed=0, dataset_name="tiny-mbpp",
        tracking=TrackingSettings(mlflow=mlflow), tracking_uri=None,
        refce_path=setup["refce"] if rec.algorithm.startswith("rho1") else None, **kwargs,
    )


def test_baseline_trains(setup, tmp_path):
    model_dir = run(setup, tmp_path / "out", recipe())
    metrics = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert list(metrics["step"]) == [1, 2, 3, 4, 5, 6]
    assert metrics["train_loss"].notna().all()
    assert metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]
    load_model(model_dir)
