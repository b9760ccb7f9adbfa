"""Snakemake adapter of the finetune_reference rule: models.ref fine-tuned on a clean split.

input:  ref (reference model dir), base (base model dir: its tokenizer is the
        pipeline's prompt format), splits (the fine-tuning parquet files), exclude
        (the training split, checked to share no problem with them)
output: the fine-tuned reference model directory (HF format, with a checksum manifest)
params: settings = {"reference_finetune": ReferenceFinetuneSettings, "data": DataSettings}
resources: gpu (> 1: re-executed under torchrun, one rank per GPU, as the train rule)
"""

import os
import sys

log = snakemake.log[0]  # noqa: F821
if "LOCAL_RANK" not in os.environ:
    open(log, "w").close()
sys.stderr = open(log, "a", buffering=1)

from wmtp.cli import relaunch_distributed  # noqa: E402

gpus = int(getattr(snakemake.resources, "gpu", 0) or 0)  # noqa: F821
if gpus > 1 and "LOCAL_RANK" not in os.environ:
    os.dup2(sys.stderr.fileno(), 2)  # torchrun and its ranks inherit the log as stderr
relaunch_distributed(gpus)

import logging  # noqa: E402

import torch  # noqa: E402

from wmtp.config.schema import DataSettings, ReferenceFinetuneSettings  # noqa: E402
from wmtp.stages.reference import finetune_reference  # noqa: E402

logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger("wmtp").setLevel(logging.INFO)
torch.set_num_threads(max(1, snakemake.threads // max(1, gpus)))  # noqa: F821
smk = snakemake  # noqa: F821
settings = dict(smk.params.items())["settings"]
ref = smk.config["models"]["ref"]
model_id = f"{ref['source']}:{ref['id']}" + (f"@{ref['revision']}" if ref.get("revision") else "")
finetune_reference(
    smk.input.ref,
    smk.input.base,
    list(smk.input.splits),
    smk.output[0],
    ReferenceFinetuneSettings(**settings["reference_finetune"]),
    DataSettings(**settings["data"]),
    exclude=list(smk.input.exclude),
    model_id=model_id,
)
