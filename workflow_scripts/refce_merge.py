"""Snakemake adapter that merges the part files of a sharded refce run.

input:  parts (the part parquets, any order; every shard 0..n-1 exactly once)
output: the merged ce_ref parquet (identical to an unsharded run)
"""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from wmtp.refce import merge_shards  # noqa: E402

merge_shards(list(snakemake.input), snakemake.output[0])  # noqa: F821
