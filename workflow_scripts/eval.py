"""Snakemake adapter of the `eval` rule: sample from one trained model and execute
the samples against one benchmark's tests (wmtp.stages.evaluate.evaluate_model).

Inputs: model (trained model directory), data (the benchmark's test parquet), shots
(MBPP's prompt split, only for MBPP with eval.mbpp_prompt three-shot).
Outputs: summary (json with pass@k), samples (jsonl, one line per problem).
Params: settings (EvalSettings as a dict). Wildcards: benchmark, seed.
Torch threads follow the rule's threads (Snakemake sets OMP_NUM_THREADS); so do the
sandbox workers unless eval.workers is set.
"""

import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake is injected)

import torch  # noqa: E402

from wmtp.config.schema import EvalSettings  # noqa: E402
from wmtp.stages.evaluate import evaluate_model  # noqa: E402

sm = snakemake  # noqa: F821
settings = EvalSettings.model_validate(sm.params.settings)
if settings.workers is None:
    settings = settings.model_copy(update={"workers": sm.threads})
evaluate_model(
    model_dir=sm.input.model,
    benchmark=sm.wildcards.benchmark,
    data_path=sm.input.data,
    settings=settings,
    seed=int(sm.wildcards.seed),
    out_json=sm.output.summary,
    out_jsonl=sm.output.samples,
    device="cuda" if torch.cuda.is_available() else "cpu",
    shots_path=sm.input.get("shots"),
)
