"""Snakemake adapter of the critic rule: stage 1 of critic-wmtp.

input:  base (base model dir, with tokenizer), data (MBPP-format train parquet),
        reward (reward model dir; only when critic.reward = reward_model)
output: head (.../critic/value_head.safetensors), metrics (.../critic/metrics.json);
        both in the same directory
params: settings = {"critic": CriticSettings, "data": DataSettings}; the seed is
        the config's first seed, sandbox limits come from the config's eval section
"""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 (injected by Snakemake)
sys.stderr = open(smk.log[0], "w", buffering=1)

import torch  # noqa: E402

from wmtp.config import CriticSettings, DataSettings, EvalSettings  # noqa: E402
from wmtp.critic import HEAD_FILE, METRICS_FILE, train_critic  # noqa: E402

torch.set_num_threads(smk.threads)
out_dir = Path(smk.output.head).parent
if (Path(smk.output.head), Path(smk.output.metrics)) != (
    out_dir / HEAD_FILE,
    out_dir / METRICS_FILE,
):
    raise ValueError(f"critic outputs must be {out_dir}/{HEAD_FILE} and {out_dir}/{METRICS_FILE}")
settings = smk.params.settings
evaluation = EvalSettings(**smk.config.get("eval", {}))
train_critic(
    smk.input.base,
    smk.input.data,
    CriticSettings(**settings["critic"]),
    int(smk.config["seeds"][0]),
    out_dir,
    "cuda" if torch.cuda.is_available() else "cpu",
    max_seq_len=DataSettings(**settings["data"]).max_seq_len,
    reward_model_dir=smk.input.get("reward"),
    timeout=evaluation.timeout,
    memory_mb=evaluation.memory_mb,
    workers=evaluation.workers,
)
