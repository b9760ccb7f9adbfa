"""Snakemake adapter of the critic rule: stage 1 of critic-wmtp.

input:  base (base model dir, with tokenizer), data (MBPP-format train parquet),
        reward (reward model dir; only when critic.reward = reward_model)
output: head (.../critic/value_head.safetensors), metrics (.../critic/metrics.json);
        both must be in the same directory
params: settings = {"critic": CriticSettings, "data": DataSettings}; the seed is
        the config's first seed, sandbox limits come from the config's eval section
"""

import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

import torch  # noqa: E402

from wmtp.config import CriticSettings, DataSettings, EvalSettings  # noqa: E402
from wmtp.critic import HEAD_FILE, METRICS_FILE, train_critic  # noqa: E402

torch.set_num_threads(snakemake.threads)  # noqa: F821
out_dir = Path(snakemake.output.head).parent  # noqa: F821
if (out_dir / HEAD_FILE, out_dir / METRICS_FILE) != (Path(snakemake.output.head), Path(snakemake.output.metrics)):  # noqa: F821
    raise ValueError(f"critic outputs must be {out_dir}/{HEAD_FILE} and {out_dir}/{METRICS_FILE}")
settings = snakemake.params.settings  # noqa: F821
evaluation = EvalSettings(**snakemake.config.get("eval", {}))  # noqa: F821
train_critic(
    snakemake.input.base,  # noqa: F821
    snakemake.input.data,  # noqa: F821
    CriticSettings(**settings["critic"]),
    int(snakemake.config["seeds"][0]),  # noqa: F821
    out_dir,
    "cuda" if torch.cuda.is_available() else "cpu",
    max_seq_len=DataSettings(**settings["data"]).max_seq_len,
    reward_model_dir=snakemake.input.get("reward"),  # noqa: F821
    timeout=evaluation.timeout,
    memory_mb=evaluation.memory_mb,
    workers=evaluation.workers,
)
