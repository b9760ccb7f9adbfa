"""Snakemake adapter that merges the part files of a sharded refce run.

input:  the part parquets (any order; every shard 0..n-1 exactly once)
output: the merged ce_ref parquet (identical to an unsharded run)
"""

import sys

smk = snakemake  # noqa: F821 (injected by Snakemake)
sys.stderr = open(smk.log[0], "w", buffering=1)

from wmtp.stages.refce import merge_shards  # noqa: E402

merge_shards(list(smk.input), smk.output[0])
