"""Snakemake adapter of the refce rule: reference CE of every training token.

input:  ref (reference model dir), base (base model dir: its tokenizer is the
        pipeline's), data (MBPP-format train parquet)
output: the ce_ref parquet (a part file when params.shard = "i/n")
params: settings = {"data": DataSettings}; optional batch_size (default 8) and
        shard ("i/n", default the whole set)
"""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

import torch  # noqa: E402

from wmtp.config import DataSettings  # noqa: E402
from wmtp.refce import refce_stage  # noqa: E402

torch.set_num_threads(snakemake.threads)  # noqa: F821
params = dict(snakemake.params.items())  # noqa: F821
ref = snakemake.config["models"]["ref"]  # noqa: F821
shard = tuple(int(x) for x in params.get("shard", "0/1").split("/"))
refce_stage(
    snakemake.input.ref,  # noqa: F821
    snakemake.input.base,  # noqa: F821
    snakemake.input.data,  # noqa: F821
    snakemake.output[0],  # noqa: F821
    DataSettings(**params["settings"]["data"]),
    model_id=f"{ref['source']}:{ref['id']}" + (f"@{ref['revision']}" if ref.get("revision") else ""),
    batch_size=int(params.get("batch_size", 8)),
    device="cuda" if torch.cuda.is_available() else "cpu",
    shard=shard,
)
