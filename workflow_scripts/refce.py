"""Snakemake adapter of the refce rule: reference CE of every training token.

input:  ref (reference model dir: the finetune_reference rule's with reference_finetune
        enabled), base (base model dir: its tokenizer is the pipeline's), data
        (MBPP-format train parquet)
output: the ce_ref parquet (a part file when params.shard = "i/n")
params: settings = {"data": DataSettings, "ref_finetuned_on": "dataset:split+split" or
        None}; optional batch_size (default 8) and shard ("i/n", default the whole set)
"""

import sys

smk = snakemake  # noqa: F821 (injected by Snakemake)
sys.stderr = open(smk.log[0], "w", buffering=1)

import torch  # noqa: E402

from wmtp.config.schema import DataSettings  # noqa: E402
from wmtp.stages.refce import refce_stage  # noqa: E402

torch.set_num_threads(smk.threads)
params = dict(smk.params.items())
ref = smk.config["models"]["ref"]
model_id = f"{ref['source']}:{ref['id']}" + (f"@{ref['revision']}" if ref.get("revision") else "")
if params["settings"].get("ref_finetuned_on"):  # input.ref is the finetune_reference rule's model
    model_id += f" fine-tuned on {params['settings']['ref_finetuned_on']}"
refce_stage(
    smk.input.ref,
    smk.input.base,
    smk.input.data,
    smk.output[0],
    DataSettings(**params["settings"]["data"]),
    model_id=model_id,
    batch_size=int(params.get("batch_size", 8)),
    device="cuda" if torch.cuda.is_available() else "cpu",
    shard=tuple(int(x) for x in params.get("shard", "0/1").split("/")),
)
