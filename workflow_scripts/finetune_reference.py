"""Snakemake adapter of the finetune_reference rule: models.ref fine-tuned on a clean split.

input:  ref (reference model dir), base (base model dir: its tokenizer is the
        pipeline's prompt format), splits (the fine-tuning parquet files), exclude
        (the training split, checked to share no problem with them)
output: the fine-tuned reference model directory (HF format, with a checksum manifest)
params: settings = {"reference_finetune": ReferenceFinetuneSettings, "data": DataSettings}
resources: gpu (> 1: re-executed under torchrun, one rank per GPU, as the train rule)
"""

from wmtp.cli import start_gpu_job

gpus = int(getattr(snakemake.resources, "gpu", 0) or 0)  # noqa: F821
start_gpu_job(snakemake.log[0], gpus)  # noqa: F821  (several GPUs: re-executed under torchrun, one rank each)

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
