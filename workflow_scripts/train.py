"""Snakemake adapter of the train rule: weighted-MTP fine-tuning of one (algorithm, seed).

input:  base (base model dir), data (MBPP-format train parquet), refce (ref-CE
        parquet, rho1-* only), critic (the critic stage's value table, critic-wmtp only)
output: model (model dir), metrics (metrics.parquet; same directory as model)
params: algorithm, recipe (Recipe as a dict), settings = {"data": DataSettings,
        "tracking": TrackingSettings} as dicts
config: the study's config, for the run's `config_hash` tag only (not a param: a
        change elsewhere in the config must not rerun the training)
resources: gpu (> 1: the script re-executes itself under torchrun, one process
        per GPU, via wmtp.cli.start_gpu_job)
The DeepSpeed checkpoints in `<output dir>/checkpoints/` are not outputs: a rerun
after a failed or killed job resumes from them.
"""

from wmtp.cli import start_gpu_job

gpus = int(getattr(snakemake.resources, "gpu", 0) or 0)  # noqa: F821
start_gpu_job(snakemake.log[0], gpus)  # noqa: F821  (several GPUs: re-executed under torchrun, one rank each)

import logging  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from wmtp.config.schema import (  # noqa: E402
    DataSettings,
    Recipe,
    TrackingSettings,
    config_hash,
    load_config,
)
from wmtp.infra.tracking import (  # noqa: E402
    log_model_artifacts,
    provenance_tags,
    run_name,
    study_tracking_uri,
)
from wmtp.stages.train import TrainInputs, train  # noqa: E402

logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger("wmtp").setLevel(logging.INFO)  # e.g. "resuming ... from step N"
# The job's threads are shared by its ranks (one per GPU), so the CPUs are not oversubscribed.
torch.set_num_threads(max(1, snakemake.threads // max(1, gpus)))  # noqa: F821
inputs, wildcards = snakemake.input, snakemake.wildcards  # noqa: F821
params = dict(snakemake.params.items())  # noqa: F821
recipe = Recipe.model_validate(params["recipe"])
tracking = TrackingSettings(**params["settings"]["tracking"])
data = DataSettings(**params["settings"]["data"])
out_dir = Path(snakemake.output.model).parent  # noqa: F821
if Path(snakemake.output.metrics).parent != out_dir:  # noqa: F821
    raise ValueError("the train rule must write model/ and metrics.parquet into the same directory")
store = study_tracking_uri(tracking.tracking_uri, wildcards.run)
study_config, recipes = load_config(dict(snakemake.config), base_dir=".")  # noqa: F821
model_dir = train(
    inputs=TrainInputs(inputs.base, inputs.data, inputs.get("refce"), inputs.get("critic")),
    out_dir=out_dir,
    recipe=recipe,
    data=data,
    seed=int(wildcards.seed),
    tracking=tracking.model_copy(update={"tracking_uri": store}),
    study=wildcards.run,
    run_name=run_name(params["algorithm"], wildcards.seed),
    tags=provenance_tags(config_hash(study_config, recipes)),
)
if os.environ.get("RANK", "0") == "0":  # one process attaches the metric rows to the run
    log_model_artifacts(model_dir, [snakemake.output.metrics])  # noqa: F821
