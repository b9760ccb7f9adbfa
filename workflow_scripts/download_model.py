"""Snakemake adapter of the download_model rule: fetch or build one model
(wmtp.stages.download.download_model).

output:    [0] the model directory, results/{run}/models/{role}
wildcards: role (base / ref / reward)
params:    settings = {"source": ModelSource as a dict,
                       "tiny": TinySettings as a dict (only for source: tiny),
                       "seed": int (optional, default 0: the tiny models are built the
                               same way whatever the training seeds),
                       "endpoint_url": str | None (optional, S3 endpoint; default:
                               the config's storage.endpoint_url)}
threads:   torch threads for building the tiny models
"""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from wmtp.config.schema import ModelSource, TinySettings  # noqa: E402
from wmtp.stages.download import download_model  # noqa: E402

sm = snakemake  # noqa: F821
settings = sm.params.settings
endpoint = settings.get("endpoint_url", (sm.config.get("storage") or {}).get("endpoint_url"))
out = download_model(
    ModelSource(**settings["source"]),
    sm.output[0],
    tiny=TinySettings(**settings["tiny"]) if settings.get("tiny") else None,
    seed=int(settings.get("seed", 0)),
    endpoint_url=endpoint,
    threads=sm.threads,
)
print(f"models/{sm.wildcards.role}: {out}", file=sys.stderr)
