"""Snakemake adapter of the critic rule: stage 1 of the methods with a critic
(critic-wmtp), for one seed.

input:  base (base model dir, with tokenizer), data (MBPP-format train parquet),
        reward (reward model dir; only when critic.reward = reward_model)
output: table (.../critic/seed{s}/values.parquet), metrics (.../metrics.json),
        in the same directory
params: settings = {"critic": CriticSettings, "data": DataSettings, "sandbox":
        {timeout, memory_mb, workers} of the eval section}; the seed is the {seed}
        wildcard
"""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 (injected by Snakemake)
sys.stderr = open(smk.log[0], "w", buffering=1)

import torch  # noqa: E402

from wmtp.config.schema import CriticSettings, DataSettings  # noqa: E402
from wmtp.stages.critic import METRICS_FILE, TABLE_FILE, train_critic  # noqa: E402

torch.set_num_threads(smk.threads)
out_dir = Path(smk.output.table).parent
expected = {"table": TABLE_FILE, "metrics": METRICS_FILE}
for key, name in expected.items():
    if Path(smk.output[key]) != out_dir / name:
        raise ValueError(f"critic output {key} must be {out_dir / name}, got {smk.output[key]}")
settings = smk.params.settings
sandbox = settings["sandbox"]
train_critic(
    smk.input.base,
    smk.input.data,
    CriticSettings(**settings["critic"]),
    int(smk.wildcards.seed),
    out_dir,
    "cuda" if torch.cuda.is_available() else "cpu",
    max_seq_len=DataSettings(**settings["data"]).max_seq_len,
    reward_model_dir=smk.input.get("reward"),
    timeout=sandbox["timeout"],
    memory_mb=sandbox["memory_mb"],
    workers=sandbox["workers"],
)
