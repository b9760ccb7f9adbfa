"""The training log under torchrun: when ranks fail, every rank's traceback and
torchrun's summary must all be in `logs/{run}/train/{algo}/seed{s}.log`, whole.

The train rule's script re-executes itself under torchrun when its job has several
GPUs; the launcher, torchrun and each rank then write the same log file. Here two
ranks (CPU, gloo) are given a base model directory without a tokenizer, so each
fails on its own with a traceback (torch prefixes a rank's lines with `[rankN]:`),
and torchrun reports the failures.
"""

from __future__ import annotations

import re

import pytest

from tests.integration.test_workflow import copy_workflow, snakemake

TARGET = "results/ci/train/baseline-mtp/seed0/model"


@pytest.mark.slow
def test_every_failing_rank_keeps_its_traceback_in_the_log(tmp_path):
    workdir = copy_workflow(tmp_path)
    (workdir / "results/ci/models/base").mkdir(parents=True)
    (workdir / "results/ci/models/base/config.json").write_text("{}")
    data = workdir / "results/ci/data/tiny-mbpp/train.parquet"
    data.parent.mkdir(parents=True)
    data.write_text("never read: the ranks fail on the tokenizer first\n")
    result = snakemake(
        workdir, TARGET, "--cores", "2", "--set-resources", "train:gpu=2",
        "--configfile", "config/ci.yaml", timeout=600,
    )
    assert result.returncode != 0
    log = (workdir / "logs/ci/train/baseline-mtp/seed0.log").read_text()
    summary = log.find("torch.distributed.elastic.multiprocessing.errors.ChildFailedError")
    assert summary > 0, log[-3000:]
    failed = set(re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\n\s+exitcode\s+: 1 ", log[summary:]))
    assert failed, log[summary:]
    for rank in failed:  # its whole traceback, written before torchrun's summary
        start = log.find(f"[rank{rank}]: Traceback (most recent call last):")
        error = re.search(rf"^\[rank{rank}\]: \w+(\.\w+)*: ", log, re.M)
        assert 0 <= start < error.start() < summary, log
