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

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO, tiny_config
from safetensors.torch import load_file

from wmtp.config import registry
from wmtp.config.schema import ConfigError, DataSettings, Recipe, TrackingSettings
from wmtp.core.checkpoints import load_model, save_model
from wmtp.core.model import MTPModel
from wmtp.core.schedule import lr_factor
from wmtp.data.training import build_examples, read_split
from wmtp.stages import train as train_lib
from wmtp.stages.train import TrainInputs

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

    from wmtp.stages.refce import compute_refce

    ref = MTPModel(config)
    ref.init_weights(seed=1)
    examples = build_examples(read_split(train_path), tiny_tokenizer, 256)
    refce_path = compute_refce(
        ref, tiny_tokenizer, examples, root / "refce.parquet", batch_size=8, model_id="ref"
    )
    return {
        "root": root,
        "base": base_dir,
        "train": train_path,
        "refce": refce_path,
        "config": config,
    }


def recipe(algorithm: str = "baseline-mtp", *, weighting: dict | None = None, **train) -> Recipe:
    settings = dict(
        epochs=100,  # many: max_steps decides the length of every test training
        max_steps=6,
        micro_batch_size=4,
        grad_accum_steps=1,
        lr=3e-3,
        warmup_steps=1,
        min_lr_ratio=0.1,
        checkpoint_every=3,
        log_every=1,
        val_every=3,
    )
    settings.update(train)
    payload = {"algorithm": algorithm, "train": settings, "weighting": weighting or {}}
    if registry.method(algorithm).has_critic:
        payload["critic"] = {}
    return Recipe.model_validate(payload)


def inputs_of(setup, rec: Recipe, **paths) -> TrainInputs:
    """The fixture's files for `rec`'s method: the reference-CE table for rho1-*
    unless `refce_path` says otherwise, the value table given as `critic_path`."""
    refce = paths.get("refce_path", setup["refce"] if registry.needs(rec.algorithm, "refce") else None)
    return TrainInputs(setup["base"], setup["train"], refce, paths.get("critic_path"))


def run(setup, out: Path, rec: Recipe, *, mlflow: bool = False, **kwargs) -> Path:
    paths = {key: kwargs.pop(key) for key in ("refce_path", "critic_path") if key in kwargs}
    return train_lib.train(
        inputs=inputs_of(setup, rec, **paths),
        out_dir=out,
        recipe=rec,
        data=DataSettings(max_seq_len=256, val_fraction=0.125),
        seed=0,
        tracking=TrackingSettings(mlflow=mlflow),
        **kwargs,
    )


def final_params(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize(
    "algorithm, weighting",
    [
        ("baseline-mtp", {}),
        ("rho1-weighted", {}),
        ("rho1-tokenskip", {"skip_ratio": 0.3}),
        ("rho1-weighted", {"rho1_base": "frozen", "rho1_mode": "abs"}),
    ],
)
def test_algorithm_trains_with_finite_decreasing_loss(setup, tmp_path, algorithm, weighting):
    model_dir = run(setup, tmp_path / "out", recipe(algorithm, weighting=weighting))
    metrics = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert list(metrics["step"]) == [1, 2, 3, 4, 5, 6]
    assert metrics["train_loss"].map(math.isfinite).all()
    assert metrics["train_loss"].iloc[-2:].mean() < metrics["train_loss"].iloc[:2].mean()
    assert metrics["val_loss"].notna().sum() == 2  # steps 3 and 6
    # weights have mean 1 over valid tokens for every algorithm
    assert metrics["weight_mean"].sub(1).abs().max() < 1e-4
    if algorithm == "rho1-tokenskip":
        assert (metrics["weight_frac_zero"] > 0.2).all()
    if algorithm == "baseline-mtp":
        assert (metrics["weight_std"] < 1e-6).all()
        for kind in ("code", "first", "eos"):  # the per-class diagnostics see w = 1 too
            assert (metrics[f"weight_on_{kind}"] == 1).all()
    config = json.loads((model_dir / "config.json").read_text())
    assert config["algorithm"] == algorithm and config["seed"] == 0
    assert config["resolved config"]["recipe"]["weighting"]["rho1_base"] == weighting.get(
        "rho1_base", "online"
    )
    assert not torch.equal(
        load_model(model_dir).output.weight, load_model(setup["base"]).output.weight
    )


def value_table(setup, path: Path, gate_statistic: float | None, base=None) -> Path:
    """A critic stage's value table whose gate measured `gate_statistic` (rho): values
    from a random value head on the frozen base trunk (wmtp.stages.value_table.compute_values),
    so the deltas vary from token to token."""
    from transformers import AutoTokenizer

    from wmtp.stages.critic import ValueHead
    from wmtp.stages.value_table import compute_values, table_metadata, write_value_table

    base = base or setup["base"]
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    examples = build_examples(read_split(setup["train"]), tokenizer, 256)
    torch.manual_seed(0)
    head = ValueHead(setup["config"].dim, 16).eval()
    values = compute_values(load_model(base), head, examples, pad_id=tokenizer.pad_token_id)
    meta = table_metadata(base, tokenizer, len(examples), 0, gate_statistic)
    return write_value_table(examples, values, path, meta)


def test_critic_trains_from_the_value_table_alone(setup, tmp_path, monkeypatch):
    """critic-wmtp reads its deltas from the critic stage's table: no value head ever
    runs in training (the trunk being trained would move its inputs). Strength auto
    scales the weights by the critic's gate statistic: rho <= 0 trains with the
    baseline's weights exactly, rho 1 with full weights."""
    from wmtp.stages.critic import ValueHead

    def no_value_head(self, hidden):
        raise AssertionError("a value head ran during training")

    full = value_table(setup, tmp_path / "ev1" / "values.parquet", gate_statistic=1.0)
    monkeypatch.setattr(ValueHead, "forward", no_value_head)
    rec = recipe("critic-wmtp", weighting={"strength": "auto"})
    run(setup, tmp_path / "out", rec, critic_path=full)
    metrics = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert metrics["train_loss"].map(math.isfinite).all()
    assert metrics["train_loss"].iloc[-2:].mean() < metrics["train_loss"].iloc[:2].mean()
    assert metrics["weight_std"].min() > 0.1  # deltas vary, so weights do
    assert metrics["weight_mean"].sub(1).abs().max() < 1e-4
    monkeypatch.undo()
    none = value_table(setup, tmp_path / "ev0" / "values.parquet", gate_statistic=-0.3)
    monkeypatch.setattr(ValueHead, "forward", no_value_head)
    run(setup, tmp_path / "flat", rec, critic_path=none)
    flat = pd.read_parquet(tmp_path / "flat" / "metrics.parquet")
    assert (flat["weight_std"] < 1e-6).all() and (flat["weight_min"] == 1).all()
    baseline = run(setup, tmp_path / "baseline", recipe("baseline-mtp"))
    for name, tensor in final_params(tmp_path / "flat" / "model").items():
        torch.testing.assert_close(tensor, final_params(baseline)[name])


def test_critic_refuses_a_table_of_another_base(setup, tmp_path):
    other = MTPModel(setup["config"])
    other.init_weights(seed=7)
    tokenizer_dir = setup["base"]
    from transformers import AutoTokenizer

    other_dir = save_model(
        other,
        tmp_path / "other",
        tokenizer=AutoTokenizer.from_pretrained(str(tokenizer_dir)),
        extra={"note": "another base"},
    )
    wrong = value_table(setup, tmp_path / "values.parquet", 1.0, base=other_dir)
    with pytest.raises(ConfigError, match="computed on base model .* rerun the critic stage"):
        run(setup, tmp_path / "wrong", recipe("critic-wmtp"), critic_path=wrong)


def test_resume_after_interrupt_gives_identical_weights(setup, tmp_path):
    rec = recipe(
        "rho1-weighted", max_steps=7, grad_accum_steps=2, micro_batch_size=2, checkpoint_every=2
    )
    straight = run(setup, tmp_path / "straight", rec)
    with pytest.raises(train_lib.TrainingInterrupted):
        run(setup, tmp_path / "resumed", rec, stop_after=5)  # last checkpoint: step 4
    rows_before = [
        json.loads(line)
        for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows_before] == [1, 2, 3, 4, 5]
    resumed = run(setup, tmp_path / "resumed", rec)
    a, b = final_params(straight), final_params(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = pd.read_parquet(tmp_path / "resumed" / "metrics.parquet")
    assert list(metrics["step"]) == [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
    ]  # rows from before the stop kept, none twice
    reference = pd.read_parquet(tmp_path / "straight" / "metrics.parquet")
    pd.testing.assert_series_equal(metrics["train_loss"], reference["train_loss"])
    assert list(metrics["tokens"]) == list(reference["tokens"])
    assert not (tmp_path / "resumed" / "checkpoints").exists()  # removed once the model is verified


def test_checkpoints_are_removed_after_the_final_model_unless_kept(setup, tmp_path, monkeypatch):
    """Default: the resumable state goes once the model reads back as saved; with
    keep_checkpoints it stays; a model that fails its check keeps it (and raises)."""
    kept = recipe(max_steps=3, checkpoint_every=2, keep_checkpoints=True)
    run(setup, tmp_path / "kept", kept)
    assert [p.name for p in (tmp_path / "kept" / "checkpoints").iterdir() if p.is_dir()] == ["step3"]
    run(setup, tmp_path / "dropped", recipe(max_steps=3, checkpoint_every=2))
    assert not (tmp_path / "dropped" / "checkpoints").exists()
    assert (tmp_path / "dropped" / "model" / "model.safetensors").exists()

    def corrupt(directory):
        (Path(directory) / "model.safetensors").write_bytes(b"truncated")
        return verify(directory)

    verify = train_lib.verify_model_files
    monkeypatch.setattr(train_lib, "verify_model_files", corrupt)
    with pytest.raises(ValueError, match="model.safetensors"):
        run(setup, tmp_path / "bad", recipe(max_steps=3, checkpoint_every=2))
    assert (tmp_path / "bad" / "checkpoints" / "latest").exists()


def test_finished_run_rerun_only_saves(setup, tmp_path):
    rec = recipe(max_steps=3, warmup_steps=1, keep_checkpoints=True)
    first = final_params(run(setup, tmp_path / "out", rec))
    second = final_params(run(setup, tmp_path / "out", rec))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert list(pd.read_parquet(tmp_path / "out" / "metrics.parquet")["step"]) == [1, 2, 3]


def test_checkpoint_of_other_settings_is_not_resumed(setup, tmp_path):
    """After a config change the workflow reruns the job: it must start over, not
    resume (or, when finished, re-save) the old training."""
    with pytest.raises(train_lib.TrainingInterrupted):
        run(setup, tmp_path / "out", recipe(max_steps=4, checkpoint_every=2, lr=1e-3), stop_after=2)
    run(setup, tmp_path / "out", recipe(max_steps=4, checkpoint_every=2, lr=2e-3))
    metrics = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert list(metrics["step"]) == [1, 2, 3, 4]
    assert metrics["lr"].iloc[0] == pytest.approx(1e-3)  # warmup 1 step: half of the new lr


def test_a_row_killed_before_mlflow_is_logged_on_resume(setup, tmp_path, monkeypatch):
    """Killed after a row reached metrics.jsonl but before MLflow: the resumed run
    logs it from the jsonl, so MLflow holds every row once, with the jsonl's values."""
    from mlflow import MlflowClient

    from wmtp.infra import tracking

    log_metrics = tracking.Run.log_metrics

    def killed_at_step_3(self, metrics, step):
        if step == 3:
            raise KeyboardInterrupt("killed between the jsonl append and MLflow")
        log_metrics(self, metrics, step)

    rec = recipe(max_steps=4, checkpoint_every=2, val_every=2)
    monkeypatch.setattr(tracking.Run, "log_metrics", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(setup, tmp_path / "out", rec, mlflow=True)
    monkeypatch.setattr(tracking.Run, "log_metrics", log_metrics)
    model_dir = run(setup, tmp_path / "out", rec, mlflow=True)
    record = json.loads((model_dir / "tracking.json").read_text())
    history = MlflowClient(record["tracking_uri"]).get_metric_history(record["run_id"], "train/loss")
    rows = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert {m.step: m.value for m in history} == pytest.approx(
        dict(zip(rows["step"], rows["train_loss"], strict=True))
    )


def test_mlflow_run_has_params_metrics_and_resumes(setup, tmp_path):
    from mlflow import MlflowClient

    from wmtp.infra import tracking

    rec = recipe(max_steps=4, checkpoint_every=2, val_every=2)
    with pytest.raises(train_lib.TrainingInterrupted):
        run(setup, tmp_path / "out", rec, mlflow=True, stop_after=3, study="s", tags={"config_hash": "h"})
    interrupted = MlflowClient(tracking.default_tracking_uri(tmp_path / "out")).search_runs(
        [
            MlflowClient(tracking.default_tracking_uri(tmp_path / "out"))
            .get_experiment_by_name("wmtp/s")
            .experiment_id
        ]
    )
    assert [r.info.status for r in interrupted] == ["FAILED"]
    model_dir = run(setup, tmp_path / "out", rec, mlflow=True, study="s", tags={"config_hash": "h"})
    record = json.loads((model_dir / "tracking.json").read_text())
    assert record["experiment"] == "wmtp/s"
    assert record["tracking_uri"] == tracking.default_tracking_uri(tmp_path / "out")
    client = MlflowClient(record["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name(record["experiment"]).experiment_id])
    assert [r.info.run_id for r in runs] == [record["run_id"]]  # the resumed run continued it
    data = runs[0].data
    assert runs[0].info.status == "FINISHED"
    assert data.params["recipe.train.lr"] == "0.003" and data.params["seed"] == "0"
    tags = {"run": "s", "kind": "training", "algorithm": "baseline-mtp", "seed": "0", "config_hash": "h"}
    assert {k: data.tags.get(k) for k in tags} == tags
    expected = {
        "train/loss",
        "train/head0_ce",
        "train/head1_ce",
        "val/loss",
        "train/lr",
        "perf/tokens_per_s",
        *(f"weight_stats/{s}" for s in ("mean", "std", "min", "max", "frac_zero")),
    }
    assert expected <= set(data.metrics)
    history = client.get_metric_history(record["run_id"], "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # step 3 logged once despite the restart
    assert tracking.log_to_model_run(model_dir, {"eval/tiny-mbpp/pass@1": 0.25})
    assert client.get_run(record["run_id"]).data.metrics["eval/tiny-mbpp/pass_at_1"] == 0.25


def test_metrics_parquet_columns(setup, tmp_path):
    run(setup, tmp_path / "out", recipe(max_steps=2, warmup_steps=0, log_every=2, val_every=2))
    metrics = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert list(metrics.columns) == [
        "step",
        "tokens",
        "wall_time",
        "train_loss",
        "head_ce_0",
        "head_ce_1",
        "val_loss",
        "val_head_ce_0",
        "val_head_ce_1",
        "lr",
        "tokens_per_s",
        "weight_mean",
        "weight_std",
        "weight_min",
        "weight_max",
        "weight_frac_zero",
        "weight_on_comment",
        "weight_on_code",
        "weight_on_first",
        "weight_on_eos",
    ]
    assert list(metrics["step"]) == [2]
    assert metrics["tokens"].iloc[0] > 0 and metrics["tokens_per_s"].iloc[0] > 0
    # val_loss is the unweighted MTP loss: the mean of the heads' validation CE
    row = metrics.iloc[0]
    assert row["val_loss"] == pytest.approx((row["val_head_ce_0"] + row["val_head_ce_1"]) / 2)


def test_ntp_trains_head_0_only_on_the_plain_ce(setup, tmp_path):
    """Next-token fine-tuning: trunk, head 0, shared norm and unembedding move; the
    extra heads stay exactly as downloaded; the loss is head 0's CE alone."""
    model_dir = run(setup, tmp_path / "out", recipe("ntp", max_steps=3, log_every=1, val_every=3))
    before, after = final_params(setup["base"]), final_params(model_dir)
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert {name for name in before if name.startswith("heads.1.")}.isdisjoint(moved)
    for prefix in ("heads.0.", "layers.", "norm.", "output.", "tok_embeddings."):
        assert any(name.startswith(prefix) for name in moved), prefix
    metrics = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert "head_ce_1" not in metrics and "val_head_ce_1" in metrics  # trained vs validated heads
    assert metrics["train_loss"].tolist() == pytest.approx(metrics["head_ce_0"].tolist(), rel=1e-5)
    assert (metrics["weight_std"] < 1e-6).all()


@pytest.mark.parametrize(
    "algorithm, kwargs, message",
    [
        ("rho1-weighted", {"refce_path": None}, "needs the reference-CE table"),
        ("critic-wmtp", {}, "needs the critic stage's value table"),
        ("baseline-mtp", {"max_steps": 1}, "warmup_steps = 1: must be < max_steps (1)"),
    ],
)
def test_bad_setup_raises_before_compute(setup, tmp_path, monkeypatch, algorithm, kwargs, message):
    monkeypatch.setattr(train_lib, "_init_distributed", lambda *a: pytest.fail("compute started"))
    kwargs = dict(kwargs)
    paths = {key: kwargs.pop(key) for key in ("refce_path", "critic_path") if key in kwargs}
    args = dict(
        inputs=inputs_of(setup, recipe(algorithm), **paths),
        out_dir=tmp_path,
        recipe=recipe(algorithm),
        data=DataSettings(),
        seed=0,
        tracking=TrackingSettings(mlflow=False),
    )
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train_lib.train(**args)


def test_bad_setup_lists_every_problem(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(train_lib, "_init_distributed", lambda *a: pytest.fail("compute started"))
    staged = tmp_path / "staged.json"
    staged.write_text('{"zero_optimization": {"stage": 1}}')
    rec = recipe("rho1-tokenskip", deepspeed_config=str(staged))
    with pytest.raises(ConfigError) as error:
        train_lib.train(
            inputs=TrainInputs(tmp_path / "nothing", tmp_path / "missing.parquet"),
            out_dir=tmp_path,
            recipe=rec,
            data=DataSettings(),
            seed=0,
                tracking=TrackingSettings(mlflow=False),
            )
    text = str(error.value)
    for part in (
        "not a wmtp model directory",
        "missing.parquet not found",
        "reference-CE table",
        "staged.json sets zero_optimization.stage = 1",
    ):
        assert part in text


def test_refce_from_another_tokenizer_is_refused(setup, tmp_path):
    import pyarrow.parquet as pq

    table = pq.read_table(setup["refce"])
    meta = dict(table.schema.metadata)
    meta[b"wmtp.tokenizer_hash"] = b"0" * 64
    other = tmp_path / "other.parquet"
    pq.write_table(table.replace_schema_metadata(meta), other)
    with pytest.raises(ValueError, match="recompute the reference CE"):
        run(setup, tmp_path / "out", recipe("rho1-weighted"), refce_path=other)


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = [lr_factor(s, warmup_steps=4, max_steps=20, min_lr_ratio=0.1) for s in range(20)]
    assert f[:4] == [0.2, 0.4, 0.6, 0.8] and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False))
    assert 0.1 < f[-1] < 0.11
    assert lr_factor(20, warmup_steps=4, max_steps=20, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_deepspeed_config_fills_template():
    rec = recipe(
        zero_stage=2,
        deepspeed_config="config/deepspeed/zero2.json",
        grad_accum_steps=3,
        grad_clip=0.5,
    )
    config = train_lib.deepspeed_config(rec.train, bf16=False, device_type="cpu")
    assert (
        config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 3
    )
    assert config["gradient_clipping"] == 0.5 and config["zero_optimization"]["stage"] == 2
    assert (
        config["optimizer"]["params"]["lr"] == 3e-3 and config["optimizer"]["params"]["torch_adam"]
    )
    assert config["bf16"] == {"enabled": False}
    assert config["optimizer"]["params"]["betas"] == [0.9, 0.95]  # the template's own knobs stay


@pytest.mark.slow
def test_torchrun_two_processes_matches_one_process_batch(setup, tmp_path):
    """2 ranks x micro 2 see the same global batches as 1 rank x micro 4 (rank r
    takes every 2nd example), so both runs end close. Not bit-equal: each rank's
    loss is a mean over its own valid tokens and the ranks' gradients are averaged,
    and sums run in another order."""
    config = {
        "run": "t",
        "seeds": [0],
        "algorithms": ["baseline-mtp"],
        "benchmarks": ["tiny-mbpp"],
        "recipes": {"baseline-mtp": str(tmp_path / "baseline.yaml")},
        "models": {
            "base": {"source": "tiny", "id": "base"},
            "ref": {"source": "tiny", "id": "ref"},
        },
        "data": {"train_dataset": "tiny-mbpp", "max_seq_len": 256, "val_fraction": 0.125},
        "train": {"epochs": 3, "micro_batch_size": 8, "grad_accum_steps": 1, "lr": 1e-4, "warmup_steps": 10},
        "eval": {"n_samples": 10, "ks": {"tiny-mbpp": [1, 10]}},
        "tracking": {"mlflow": False},
    }
    import yaml

    rec = recipe(max_steps=4, micro_batch_size=2, checkpoint_every=2).model_dump(mode="json")
    # a recipe file holds what it overrides: here the whole train section
    (tmp_path / "baseline.yaml").write_text(
        yaml.safe_dump({"algorithm": rec["algorithm"], "train": rec["train"]})
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "wmtp",
        "train",
        "--config",
        str(tmp_path / "config.yaml"),
        "--algorithm",
        "baseline-mtp",
        "--seed",
        "0",
        "--out",
        str(tmp_path / "two"),
        "--base-model",
        str(setup["base"]),
        "--train-data",
        str(setup["train"]),
        "--device",
        "cpu",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = run(setup, tmp_path / "one", recipe(max_steps=4, micro_batch_size=4, checkpoint_every=2))
    two_rows = pd.read_parquet(tmp_path / "two" / "metrics.parquet")
    one_rows = pd.read_parquet(tmp_path / "one" / "metrics.parquet")
    # same global batches: the same tokens per step, summed over both ranks
    assert list(two_rows["tokens"]) == list(one_rows["tokens"])
    assert two_rows["train_loss"].tolist() == pytest.approx(
        one_rows["train_loss"].tolist(), abs=1e-3
    )
    assert two_rows["val_loss"].dropna().tolist() == pytest.approx(
        one_rows["val_loss"].dropna().tolist(), abs=1e-3
    )
    a, b = final_params(tmp_path / "two" / "model"), final_params(one)
    base = final_params(setup["base"])
    for k in a:  # both moved the same way: their gap is a small share of the update
        # (norms, not max-abs: Adam's first steps move every weight by ~lr whatever its
        # gradient, so one near-zero gradient of other sign flips one element's update)
        assert (a[k] - b[k]).norm() <= 0.02 * (b[k] - base[k]).norm(), k


@pytest.mark.slow
def test_killed_process_resumes_to_identical_weights(setup, tmp_path):
    """A real kill (SIGKILL once the first checkpoint exists), then a resume."""
    rec = recipe(max_steps=8, checkpoint_every=2, log_every=1)
    straight = run(setup, tmp_path / "straight", rec)
    script = tmp_path / "job.py"
    script.write_text(
        "import sys, time\n"
        "from wmtp.stages import train as t\n"
        "from wmtp.config.schema import DataSettings, Recipe, TrackingSettings\n"
        f"rec = Recipe.model_validate_json({rec.model_dump_json()!r})\n"
        "slow = t.weighted_mtp_loss_details if hasattr(t, 'weighted_mtp_loss_details') else None\n"
        "import wmtp.core.loss as loss\n"
        "orig = loss.weighted_mtp_loss_details\n"
        "def slowed(*a, **k):\n"
        "    time.sleep(0.5)\n"
        "    return orig(*a, **k)\n"
        "loss.weighted_mtp_loss_details = slowed\n"
        f"t.train(inputs=t.TrainInputs({str(setup['base'])!r}, {str(setup['train'])!r}),\n"
        f"        out_dir={str(tmp_path / 'killed')!r}, recipe=rec,\n"
        "        data=DataSettings(max_seq_len=256, val_fraction=0.125), seed=0,\n"
        "        tracking=TrackingSettings(mlflow=False))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    job = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert latest.exists() and not (tmp_path / "killed" / "model").exists()
    resumed = run(setup, tmp_path / "killed", rec)
    a, b = final_params(straight), final_params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert list(pd.read_parquet(tmp_path / "killed" / "metrics.parquet")["step"]) == list(
        range(1, 9)
    )


def test_workflow_script_runs_the_train_rule(setup, tmp_path, monkeypatch):
    """workflow_scripts/train.py as Snakemake's `script:` runs it (stand-in object)."""
    import runpy
    from types import SimpleNamespace

    from snakemake.iocontainers import Namedlist

    out = tmp_path / "results" / "t" / "train" / "rho1-tokenskip" / "seed0"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {
        "data": DataSettings(max_seq_len=256, val_fraction=0.125).model_dump(mode="json"),
        "tracking": TrackingSettings(tracking_uri=uri).model_dump(mode="json"),
    }
    smk = SimpleNamespace(
        input=Namedlist(
            fromdict={
                "base": str(setup["base"]),
                "data": str(setup["train"]),
                "refce": str(setup["refce"]),
            }
        ),
        output=Namedlist(
            fromdict={"model": str(out / "model"), "metrics": str(out / "metrics.parquet")}
        ),
        params=Namedlist(
            fromdict={
                "algorithm": "rho1-tokenskip",
                "recipe": recipe("rho1-tokenskip", max_steps=2, log_every=1).model_dump(
                    mode="json"
                ),
                "settings": settings,
            }
        ),
        log=Namedlist([str(tmp_path / "train.log")]),
        wildcards=Namedlist(fromdict={"run": "t", "algo": "rho1-tokenskip", "seed": "0"}),
        resources=Namedlist(fromdict={"gpu": 0}),
        threads=1,
        config=yaml.safe_load((REPO / "config" / "config.yaml").read_text()),  # for the config_hash tag
    )
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    monkeypatch.chdir(REPO)  # Snakemake runs scripts in the workflow directory
    runpy.run_path(str(REPO / "workflow_scripts" / "train.py"), init_globals={"snakemake": smk})
    assert list(pd.read_parquet(out / "metrics.parquet")["step"]) == [1, 2]
    record = json.loads((out / "model" / "tracking.json").read_text())
    assert record["tracking_uri"] == uri and record["experiment"] == "wmtp/t"
    from mlflow import MlflowClient

    from wmtp.config.schema import config_hash, load_config

    tracked = MlflowClient(uri).get_run(record["run_id"])
    expected_hash = config_hash(*load_config(smk.config, base_dir=REPO))
    assert {k: tracked.data.tags[k] for k in ("run", "kind", "algorithm", "seed", "config_hash")} == {
        "run": "t", "kind": "training", "algorithm": "rho1-tokenskip", "seed": "0", "config_hash": expected_hash,
    }  # fmt: skip
    assert tracked.data.tags["git_commit"] not in ("", "unknown")  # the test runs in a checkout
    assert [a.path for a in MlflowClient(uri).list_artifacts(record["run_id"])] == ["metrics.parquet"]
    assert json.loads((out / "model" / "config.json").read_text())["algorithm"] == "rho1-tokenskip"
    assert (
        "train rho1-tokenskip" in (tmp_path / "train.log").read_text()
    )  # progress bar went to the log


@pytest.mark.parametrize(
    "train",
    [
        pytest.param(
            {"zero_stage": 1, "deepspeed_config": "config/deepspeed/zero1.json"},
            marks=pytest.mark.slow,
        ),
        {"zero_stage": 2, "deepspeed_config": "config/deepspeed/zero2.json"},
        pytest.param({"precision": "bf16"}, marks=pytest.mark.slow),
    ],
    ids=["zero1", "zero2", "bf16"],
)
def test_zero_stages_and_bf16_train_and_resume(setup, tmp_path, train):
    rec = recipe(max_steps=4, checkpoint_every=2, **train)
    straight = final_params(run(setup, tmp_path / "straight", rec))
    with pytest.raises(train_lib.TrainingInterrupted):
        run(setup, tmp_path / "resumed", rec, stop_after=3)
    resumed = final_params(run(setup, tmp_path / "resumed", rec))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    metrics = pd.read_parquet(tmp_path / "resumed" / "metrics.parquet")
    assert metrics["train_loss"].map(math.isfinite).all()
    assert metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]


STAND_IN = """
import json, sys
from types import SimpleNamespace
from snakemake.iocontainers import Namedlist
spec = json.load(open(sys.argv[1]))
snakemake = SimpleNamespace(
    **{k: Namedlist(fromdict=v) for k, v in spec.items() if k not in ("log", "script", "config")},
    log=Namedlist(spec["log"]), threads=1, config=spec["config"],
)
exec(compile(open(spec["script"]).read(), spec["script"], "exec"))
"""


@pytest.mark.slow
def test_workflow_script_relaunches_itself_under_torchrun(setup, tmp_path):
    """With resources.gpu = 2 the adapter re-executes its own file under torchrun
    (as a Snakemake `script:` job would); both ranks train on CPU, one log."""
    out = tmp_path / "results" / "t" / "train" / "baseline-mtp" / "seed0"
    rec = recipe(max_steps=2, micro_batch_size=2, log_every=1).model_dump(mode="json")
    data = DataSettings(max_seq_len=256, val_fraction=0.125).model_dump(mode="json")
    spec = {
        "script": str(REPO / "workflow_scripts" / "train.py"),
        "input": {"base": str(setup["base"]), "data": str(setup["train"])},
        "output": {"model": str(out / "model"), "metrics": str(out / "metrics.parquet")},
        "params": {
            "algorithm": "baseline-mtp",
            "recipe": rec,
            "settings": {"data": data, "tracking": {"mlflow": False, "tracking_uri": None}},
        },
        "log": [str(tmp_path / "train.log")],
        "wildcards": {"run": "t", "algo": "baseline-mtp", "seed": "0"},
        "resources": {"gpu": 2},
        "config": yaml.safe_load((REPO / "config" / "config.yaml").read_text()),  # for the config_hash tag
    }
    (tmp_path / "config").symlink_to(REPO / "config")  # the workflow root's config/, as in a job
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "job.py").write_text(STAND_IN)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "job.py"), str(tmp_path / "spec.json")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (tmp_path / "train.log").exists(), done.stderr[-3000:]
    log = (tmp_path / "train.log").read_text()
    assert done.returncode == 0, log[-3000:]
    assert list(pd.read_parquet(out / "metrics.parquet")["step"]) == [1, 2]
    resolved = json.loads((out / "model" / "config.json").read_text())["resolved config"]
    assert resolved["world_size"] == 2
    assert "train baseline-mtp" in log  # rank 0's progress bar reached the job's log


# ---- the weights each method really trains with ------------------------------
# Every expected weight below is rebuilt from the raw inputs without the trainer's own
# helpers: the reference CE straight from the parquet (matched to a batch row by its
# tokens), the head-0 CE from a full `model(...)` forward, the critic's values from the
# value head on the current trunk. `wmtp.core.weights.algorithm_weights` is the formula.

METHODS = {  # id -> (algorithm, weighting)
    "baseline-mtp": ("baseline-mtp", {}),
    "ntp": ("ntp", {}),
    "rho1-weighted": ("rho1-weighted", {}),
    "rho1-tokenskip": ("rho1-tokenskip", {}),
    "rho1-frozen": ("rho1-weighted", {"rho1_base": "frozen"}),
    "critic-wmtp": ("critic-wmtp", {"strength": "auto"}),
    # controls: the method's weights permuted (each kind, and one of each other method)
    "rho1-weighted-shuffled": ("rho1-weighted-shuffled", {}),
    "rho1-weighted-matched": ("rho1-weighted-matched", {}),
    "rho1-tokenskip-shuffled": ("rho1-tokenskip-shuffled", {}),
    "critic-wmtp-matched": ("critic-wmtp-matched", {"strength": "auto"}),
}
SPY_EV = 0.6  # the spied critic's gate statistic (rho): strength auto = 0.6


def table_ce_ref(refce_path: Path) -> dict[tuple[int, ...], np.ndarray]:
    """Token ids of positions 1.. of a sample -> its ce_ref, read with pandas alone."""
    frame = pd.read_parquet(refce_path).sort_values(["sample_id", "position"])
    return {
        tuple(group["token_id"].tolist()): group["ce_ref"].to_numpy()
        for _, group in frame.groupby("sample_id")
    }


def ce_ref_of(batch_ids: torch.Tensor, attention_mask: torch.Tensor, table: dict) -> torch.Tensor:
    """(B, S) ce_ref of target token j at [b, j]: each row found in `table` by its tokens."""
    out = torch.zeros(batch_ids.shape)
    for b in range(batch_ids.shape[0]):
        n = int(attention_mask[b].sum())
        out[b, 1:n] = torch.from_numpy(table[tuple(batch_ids[b, 1:n].tolist())].astype(np.float32))
    return out


@torch.no_grad()
def full_forward_head0_ce(model: MTPModel, input_ids, attention_mask) -> torch.Tensor:
    """(B, S): CE of target token j from head 0 of the full all-heads forward, 0 at j = 0."""
    logits = model(input_ids, attention_mask)[:, :, 0].float()  # (B, S, V)
    ce = torch.zeros(input_ids.shape)
    ce[:, 1:] = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
    return ce


def table_values(table_path: Path) -> dict[tuple[int, ...], np.ndarray]:
    """Token ids of positions 1.. of a sample -> the critic's V there (NaN before s0),
    read with pandas alone (not through wmtp.stages.value_table)."""
    frame = pd.read_parquet(table_path).sort_values(["sample_id", "position"])
    return {
        tuple(group["token_id"].tolist()): group["value"].to_numpy()
        for _, group in frame.groupby("sample_id")
    }


def critic_deltas_of(batch_ids, attention_mask, loss_mask, table: dict) -> torch.Tensor:
    """(B, S) delta_j = V_j - V_{j-1} on solution tokens (the first one against V(s0),
    the last prompt token's value), from the table's V column; 0 elsewhere."""
    out = torch.zeros(batch_ids.shape)
    for b in range(batch_ids.shape[0]):
        n = int(attention_mask[b].sum())
        value = torch.full((n,), float("nan"))
        value[1:] = torch.from_numpy(table[tuple(batch_ids[b, 1:n].tolist())].astype(np.float32))
        for j in range(1, n):
            if loss_mask[b, j]:
                out[b, j] = value[j] - value[j - 1]
    assert torch.isfinite(out).all(), "V(s0) or a solution value is missing from the table"
    return out


def expected_weights(algorithm, weighting, model, inputs: dict) -> torch.Tensor:
    """The formula's weights `(B, S)` for one optimizer step's sequences, from raw
    inputs; for a control row, those of the method it permutes."""
    from wmtp.core.weights import algorithm_weights

    ids, mask, attn = inputs["input_ids"], inputs["loss_mask"], inputs["attention_mask"]
    extra = {}
    if registry.needs(algorithm, "refce"):
        base = inputs["frozen"] if weighting.get("rho1_base") == "frozen" else model
        extra = {"ce_base": full_forward_head0_ce(base, ids, attn), "ce_ref": ce_ref_of(ids, attn, inputs["refce"])}
    if registry.needs(algorithm, "values"):
        extra = {"deltas": critic_deltas_of(ids, attn, mask, inputs["values"]),
                 "auto_strength": min(max(SPY_EV, 0.0), 1.0)}  # fmt: skip
    method = registry.method(algorithm).control_of or algorithm
    settings = recipe(algorithm, weighting=weighting).weighting
    weights = algorithm_weights(method, mask, settings, **extra)
    return torch.where(mask.bool() & attn.bool(), weights, torch.zeros_like(weights))


# The trainer's CE and the test's come from two forward paths whose float32 rounding
# differs; the z-score of rho1's excess loss amplifies it (3.4e-5 seen on a weight of 3).
# A wrong formula differs by far more (the controls' check below asks for 1e-3).
FORMULA_TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def assert_the_formulas(algorithm: str, used: torch.Tensor, expected: torch.Tensor, mask, what: str) -> None:
    """`used` is the formula's `expected` (a method), or a permutation of it: the same
    values per sequence (shuffled) or per step (matched), not at the same tokens."""
    valid = mask.bool()
    assert torch.all(used[~valid] == 0), what
    control = registry.method(algorithm).control
    if control is None:
        assert torch.allclose(used, expected, **FORMULA_TOLERANCE), what
        return
    rows = range(used.shape[0]) if control == "shuffled" else [slice(None)]
    for row in rows:
        got, want = used[row][valid[row]].sort().values, expected[row][valid[row]].sort().values
        assert torch.allclose(got, want, **FORMULA_TOLERANCE), f"{what}: not the method's values ({control}, row {row})"
    assert (used - expected)[valid].abs().max() > 1e-3, f"{what}: {control} left the weights in place"


class LossSpy:
    """Stands in for `wmtp.core.loss.weighted_mtp_loss_details` during a training: records,
    for every training micro-batch (grad enabled; validation runs under no_grad), the
    weights the loss really used, the heads it trained and the formula's weights for
    the model as it was at that moment (of this micro-batch alone; for rho1 also the
    CE inputs they were computed from)."""

    def __init__(self, real, algorithm: str, weighting: dict, sources: dict) -> None:
        self.real, self.algorithm, self.weighting, self.sources = real, algorithm, weighting, sources
        self.calls: list[dict] = []

    def __call__(self, model, input_ids, loss_mask, weights, attention_mask=None, n_heads=None):
        training = torch.is_grad_enabled()
        if training:
            inputs = {**self.sources, "input_ids": input_ids, "loss_mask": loss_mask,
                      "attention_mask": attention_mask}  # fmt: skip
            expected = expected_weights(self.algorithm, self.weighting, model, inputs)
        out = self.real(model, input_ids, loss_mask, weights, attention_mask, n_heads)
        if training:
            call = {"used": out.weights.detach().clone(), "expected": expected,
                    "n_heads": n_heads, "loss_mask": loss_mask.clone()}  # fmt: skip
            if registry.needs(self.algorithm, "refce"):  # the online rho1 inputs, as of now
                call["ce_base"] = full_forward_head0_ce(model, input_ids, attention_mask)
                call["ce_ref"] = ce_ref_of(input_ids, attention_mask, self.sources["refce"])
            self.calls.append(call)
        return out


SPIED_STEPS = 4  # checkpoints at 2 and 4; the resume tests stop after 3


@pytest.fixture(scope="module")
def value_table_path(setup) -> Path:
    """The critic stage's value table of the spied critic-wmtp trainings."""
    return value_table(setup, setup["root"] / "spy_values.parquet", gate_statistic=SPY_EV)


def method_recipe(method: str) -> Recipe:
    algorithm, weighting = METHODS[method]
    return recipe(algorithm, weighting=weighting, max_steps=SPIED_STEPS, checkpoint_every=2,
                  val_every=SPIED_STEPS)  # fmt: skip


def method_kwargs(method: str, value_table_path: Path) -> dict:
    return {"critic_path": value_table_path} if registry.needs(METHODS[method][0], "values") else {}


@pytest.fixture(scope="module")
def spied(setup, value_table_path, tmp_path_factory):
    """`spied(method)`: one uninterrupted training of `method` with the loss spied on,
    run once per module and shared (its final weights are also the reference of that
    method's resume test)."""
    import wmtp.core.loss

    sources = {"refce": table_ce_ref(setup["refce"]), "frozen": load_model(setup["base"]).eval(),
               "values": table_values(value_table_path)}  # fmt: skip
    cache: dict[str, dict] = {}

    def get(method: str) -> dict:
        if method not in cache:
            algorithm, weighting = METHODS[method]
            spy = LossSpy(wmtp.core.loss.weighted_mtp_loss_details, algorithm, weighting, sources)
            out = tmp_path_factory.mktemp(f"spied-{method}")
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(wmtp.core.loss, "weighted_mtp_loss_details", spy)
                model_dir = run(setup, out / "straight", method_recipe(method),
                                **method_kwargs(method, value_table_path))  # fmt: skip
            cache[method] = {"calls": spy.calls, "model": model_dir, "out": out}
        return cache[method]

    return get


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_with_its_formulas_weights(spied, setup, method):
    """What the training loop really hands the loss, batch by batch, equals the
    independent formula: a trainer giving one method another's weights fails here."""
    calls = spied(method)["calls"]
    algorithm = METHODS[method][0]
    assert len(calls) == SPIED_STEPS  # one micro-batch per step
    for step, call in enumerate(calls, start=1):
        valid = call["loss_mask"].bool()
        assert_the_formulas(algorithm, call["used"], call["expected"], valid, f"{method} step {step}")
        assert call["used"][valid].mean().item() == pytest.approx(1.0, abs=1e-4)
        assert call["n_heads"] == (1 if algorithm == "ntp" else setup["config"].n_future_tokens)
        spread = call["expected"][valid].std().item()
        if not registry.method(algorithm).weighted:
            assert spread < 1e-6
        else:  # the formula really differs from the baseline's all-ones on these batches
            assert spread > 0.05, f"{method} step {step}: weights too flat to tell methods apart"


def test_online_and_frozen_rho1_bases_give_different_weights(spied):
    """The same batches: equal weights at step 1 (the online model still is the base),
    different ones once it has moved; each matched its own formula above."""
    online = [call["used"] for call in spied("rho1-weighted")["calls"]]
    frozen = [call["used"] for call in spied("rho1-frozen")["calls"]]
    assert torch.allclose(online[0], frozen[0], atol=1e-5)
    for step in range(1, SPIED_STEPS):
        assert (online[step] - frozen[step]).abs().max() > 1e-3, f"step {step + 1}"


@pytest.mark.parametrize("control", [m for m in METHODS if registry.method(METHODS[m][0]).control])
def test_a_control_trains_with_its_methods_weights_permuted(spied, control):
    """At step 1 the model is the base in both trainings: the control's weights are
    exactly its method's, moved (each checked against the formula above as well)."""
    algorithm = METHODS[control][0]
    method = next(m for m, (a, w) in METHODS.items() if a == registry.method(algorithm).control_of)
    used, own = spied(control)["calls"][0], spied(method)["calls"][0]
    assert_the_formulas(algorithm, used["used"], own["used"], used["loss_mask"], control)


def test_accumulated_micro_batches_share_the_steps_weights(spied, setup, tmp_path, monkeypatch):
    """Online rho1, 2 micro-batches of 2 per step (a scoring forward gives each its
    CE before the first backward): the weights of a step's two micro-batches are
    the formula over its four sequences, and at step 1 (the same model, the same
    four sequences) those of 1 micro-batch of 4."""
    import wmtp.core.loss

    sources = {"refce": table_ce_ref(setup["refce"])}
    spy = LossSpy(wmtp.core.loss.weighted_mtp_loss_details, "rho1-weighted", {}, sources)
    monkeypatch.setattr(wmtp.core.loss, "weighted_mtp_loss_details", spy)
    rec = recipe("rho1-weighted", max_steps=2, micro_batch_size=2, grad_accum_steps=2, checkpoint_every=2)
    run(setup, tmp_path / "accumulated", rec)
    from wmtp.core.weights import algorithm_weights

    def joined(pair: list[dict], key: str) -> torch.Tensor:  # the pair's rows, right-padded
        length = max(call["used"].shape[1] for call in pair)
        return torch.cat([F.pad(call[key], (0, length - call[key].shape[1])) for call in pair])

    calls = spy.calls
    assert len(calls) == 4  # 2 steps x 2 micro-batches
    for step in range(2):
        pair = calls[2 * step : 2 * step + 2]
        mask = joined(pair, "loss_mask").bool()
        whole = algorithm_weights("rho1-weighted", mask, rec.weighting,
                                  ce_base=joined(pair, "ce_base"), ce_ref=joined(pair, "ce_ref"))  # fmt: skip
        assert torch.allclose(joined(pair, "used"), whole, atol=1e-5), f"step {step + 1}"
        alone = pair[0]["expected"]  # the formula over the first micro-batch alone
        assert (alone - whole[:2, : alone.shape[1]])[pair[0]["loss_mask"].bool()].abs().max() > 1e-3
    one = spied("rho1-weighted")["calls"][0]["used"]  # 1 x 4, step 1: the same four sequences
    for b in range(4):
        mine = calls[b // 2]["used"][b % 2]
        n = min(len(mine), one.shape[1])
        assert torch.allclose(mine[:n], one[b, :n], atol=1e-5) and not mine[n:].any() and not one[b, n:].any()


def tear_last_line(path: Path) -> None:
    """What a kill during `_append_row` leaves: the last row cut in the middle."""
    text = path.read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    path.write_text(text[: len(text) - len(last) - 1] + last[: len(last) // 2])


@pytest.mark.parametrize("method", list(METHODS))  # under a second each once DeepSpeed is warm
def test_every_method_resumes_after_a_kill_to_identical_weights(spied, setup, value_table_path, method, monkeypatch):
    """Stopped after step 3 (last checkpoint: step 2) with row 3 of metrics.jsonl torn
    mid-write, then resumed: the weights equal the uninterrupted run's bit for bit, and
    every metric row is there once, row 3 recomputed. (A real SIGKILL is
    `test_killed_process_resumes_to_identical_weights`.)"""
    straight = spied(method)
    rec, kwargs = method_recipe(method), method_kwargs(method, value_table_path)
    out = straight["out"] / "killed"
    with pytest.raises(train_lib.TrainingInterrupted):
        run(setup, out, rec, stop_after=3, **kwargs)
    tear_last_line(out / "metrics.jsonl")
    import wmtp.core.loss

    real, trained_steps = wmtp.core.loss.weighted_mtp_loss_details, []

    def counting(*args, **kw):
        trained_steps.extend([1] if torch.is_grad_enabled() else [])
        return real(*args, **kw)

    monkeypatch.setattr(wmtp.core.loss, "weighted_mtp_loss_details", counting)
    resumed = run(setup, out, rec, **kwargs)
    assert len(trained_steps) == SPIED_STEPS - 2  # it resumed at the step-2 checkpoint
    a, b = final_params(straight["model"]), final_params(resumed)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    metrics = pd.read_parquet(out / "metrics.parquet")
    reference = pd.read_parquet(straight["out"] / "straight" / "metrics.parquet")
    assert list(metrics["step"]) == list(range(1, SPIED_STEPS + 1))
    pd.testing.assert_series_equal(metrics["train_loss"], reference["train_loss"])
    assert list(metrics["tokens"]) == list(reference["tokens"])


# ---- make_weights and head0_ce on their own --------------------------------------------


@pytest.fixture(scope="module")
def one_batch(setup, tiny_tokenizer):
    """Four training examples of different lengths, right-padded: prompt, solution, padding."""
    from wmtp.data.training import collate

    examples = build_examples(read_split(setup["train"]), tiny_tokenizer, 256)
    batch = collate([examples[i] for i in (0, 3, 7, 12)], tiny_tokenizer.pad_token_id)
    assert (batch.attention_mask == 0).any() and (~batch.loss_mask & batch.attention_mask.bool()).any()
    return batch


def test_head0_ce_is_head_0_of_the_full_forward(setup, one_batch):
    model = load_model(setup["base"])
    got = train_lib.head0_ce(model, one_batch)
    expected = full_forward_head0_ce(model, one_batch.input_ids, one_batch.attention_mask)
    expected = torch.where(one_batch.loss_mask, expected, torch.zeros_like(expected))
    assert torch.allclose(got, expected, atol=1e-5)
    assert got[one_batch.loss_mask].min() > 0 and (got[:, 0] == 0).all()


def weight_sources(setup, value_table_path, algorithm: str, weighting: dict) -> train_lib.WeightSources:
    """What the trainer loads for this recipe, no more."""
    from wmtp.stages.refce import RefCETable
    from wmtp.stages.value_table import ValueTable

    return train_lib.WeightSources(
        refce=RefCETable.from_parquet(setup["refce"]) if registry.needs(algorithm, "refce") else None,
        frozen=load_model(setup["base"]).eval() if weighting.get("rho1_base") == "frozen" else None,
        value_table=ValueTable.from_parquet(value_table_path) if registry.needs(algorithm, "values") else None,
    )  # fmt: skip


def rows_of(batch, rows: slice):
    from wmtp.data.training import Batch

    return Batch(batch.input_ids[rows], batch.loss_mask[rows], batch.attention_mask[rows],
                 batch.sample_ids[rows])  # fmt: skip


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("method", list(METHODS))
def test_make_weights_gives_the_formula(setup, one_batch, value_table_path, method, accumulation):
    """What the trainer hands the loss for a step of the four sequences, in one
    micro-batch or two, is the formula over all four. In one micro-batch, online
    rho1 gets a callable that the loss feeds head 0's CE and the trunk output of
    the model being trained; in two, a scoring forward of that model gives its CE."""
    algorithm, weighting = METHODS[method]
    model = load_model(setup["base"])
    with torch.no_grad():  # a model that has moved away from the frozen base
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    sources = {"refce": table_ce_ref(setup["refce"]), "frozen": load_model(setup["base"]).eval(),
               "values": table_values(value_table_path)}  # fmt: skip
    size = one_batch.input_ids.shape[0] // accumulation
    batches = [rows_of(one_batch, slice(i, i + size)) for i in range(0, len(one_batch.sample_ids), size)]
    weights = train_lib.make_weights(
        recipe(algorithm, weighting=weighting), batches,
        weight_sources(setup, value_table_path, algorithm, weighting), model=model, seed=0, step=1,
    )  # fmt: skip
    assert len(weights) == accumulation
    online = registry.needs(algorithm, "refce") and weighting.get("rho1_base") != "frozen"
    assert [callable(w) for w in weights] == [online and accumulation == 1] * accumulation
    got = []
    for batch, w in zip(batches, weights, strict=True):
        if callable(w):
            ids, attn = batch.input_ids, batch.attention_mask
            with torch.no_grad():
                hidden, _ = model.trunk(ids, attn)
            w = w(full_forward_head0_ce(model, ids, attn) * batch.loss_mask, hidden)
        got.append(w)
    ids, attn = one_batch.input_ids, one_batch.attention_mask
    inputs = {**sources, "input_ids": ids, "loss_mask": one_batch.loss_mask, "attention_mask": attn}
    expected = expected_weights(algorithm, weighting, model, inputs)
    assert_the_formulas(algorithm, torch.cat(got), expected, one_batch.loss_mask, method)
    if accumulation == 2 and registry.method(algorithm).weighted:  # not the formula per micro-batch
        first = {**inputs, **{k: v[:size] for k, v in inputs.items() if isinstance(v, torch.Tensor)}}
        alone = expected_weights(algorithm, weighting, model, first)
        assert (alone - expected[:size])[one_batch.loss_mask[:size]].abs().max() > 1e-3


def test_warmup_beyond_the_steps_the_epochs_give_is_refused(setup, tmp_path):
    """Without a step cap the length comes from the epochs and the data: 14 training
    examples (16 minus 2 held out) in batches of 4 give 3 steps per epoch."""
    rec = recipe(epochs=2, max_steps=None, warmup_steps=6)
    with pytest.raises(ConfigError, match=r"warmup_steps = 6: must be < the optimizer steps that 2.0 epochs of 14 examples give \(6\)"):
        run(setup, tmp_path / "out", rec)
    assert not (tmp_path / "out" / "model").exists()
    run(setup, tmp_path / "out", recipe(epochs=2, max_steps=None, warmup_steps=5))
    assert list(pd.read_parquet(tmp_path / "out" / "metrics.parquet")["step"]) == list(range(1, 7))


def test_make_weights_refuses_a_frozen_model_the_recipe_does_not_ask_for(setup, one_batch):
    """rho1_base decides between the online and the frozen CE, not whether a caller
    happens to pass a frozen model."""
    from wmtp.stages.refce import RefCETable

    batches = [one_batch]
    refce = RefCETable.from_parquet(setup["refce"])
    frozen = load_model(setup["base"])
    online = recipe("rho1-weighted", weighting={"rho1_base": "online"})
    given = train_lib.WeightSources(refce=refce, frozen=frozen)
    with pytest.raises(ValueError, match="rho1_base is 'online' but a frozen base model was given"):
        train_lib.make_weights(online, batches, given, model=frozen, seed=0, step=1)
    wants_frozen = recipe("rho1-weighted", weighting={"rho1_base": "frozen"})
    with pytest.raises(ValueError, match="'frozen' but a frozen base model was not given"):
        train_lib.make_weights(
            wants_frozen, batches, train_lib.WeightSources(refce=refce), model=frozen, seed=0, step=1
        )

