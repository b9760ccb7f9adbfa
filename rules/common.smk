# Config loading and validation, path helpers and input functions shared by the rules.
# The config is validated here, when the Snakefile loads, so a bad value stops the
# run before any job starts with a message naming the key, the value and what is allowed.

import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

from wmtp.config.schema import (
    ALGORITHMS,
    BASE_ROW,
    BENCHMARKS,
    TRAINED,
    ConfigError,
    config_hash,
    load_config,
)

min_version("9.0")

try:
    CONFIG, RECIPES = load_config(config, base_dir=workflow.basedir)
except ConfigError as error:
    raise WorkflowError(f"Invalid configuration:\n{error}") from None
validate(config, "../config/schema/config.schema.json", set_default=False)

RUN = CONFIG.run
REPORT_COPY = "results/report.md"
TRAIN_SPLIT = "train"
TEST_SPLIT = "test"


def _alternatives(names):
    return "|".join(re.escape(name) for name in names)


wildcard_constraints:
    run=re.escape(RUN),
    algo=_alternatives(ALGORITHMS),
    seed=r"\d+",
    benchmark=_alternatives(BENCHMARKS),
    dataset=_alternatives(BENCHMARKS),
    split=_alternatives((TRAIN_SPLIT, TEST_SPLIT)),
    role="base|ref|reward",


# ---- paths -------------------------------------------------------------------------


def model_dir(role):
    return f"results/{RUN}/models/{role}"


def data_path(dataset, split):
    return f"results/{RUN}/data/{dataset}/{split}.parquet"


def train_data():
    return data_path(CONFIG.data.train_dataset, TRAIN_SPLIT)


def refce_path():
    return f"results/{RUN}/refce/{CONFIG.data.train_dataset}.parquet"


def critic_dir(seed):
    return f"results/{RUN}/critic/seed{seed}"


def critic_table(seed):
    return f"{critic_dir(seed)}/values.parquet"


def critic_metrics(seed):
    return f"{critic_dir(seed)}/metrics.json"


def trained_model(algo, seed):
    return f"results/{RUN}/train/{algo}/seed{seed}/model"


def train_metrics(algo, seed):
    return f"results/{RUN}/train/{algo}/seed{seed}/metrics.parquet"


def eval_file(algo, seed, benchmark, ext):
    return f"results/{RUN}/eval/{algo}/seed{seed}/{benchmark}.{ext}"


def report_path():
    return f"results/{RUN}/report.md"


def trained_alternatives():
    """The `algo` wildcard of the train rule: training methods only ('base' is not trained)."""
    return _alternatives(TRAINED)


def upload_manifest():
    return f"results/{RUN}/upload.json"


def get_final_outputs():
    """What `snakemake all` builds: the run's report and its copy at results/report.md,
    and with storage.upload_prefix set, the record of their upload."""
    outputs = [report_path(), REPORT_COPY]
    if CONFIG.storage.upload_prefix is not None:
        outputs.append(upload_manifest())
    return outputs


# ---- input functions ---------------------------------------------------------------


def get_train_inputs(wildcards):
    """Every algorithm needs the base model and the training split; rho1-* also the
    reference CE table, critic-wmtp also its seed's value table. Nothing else, so a
    change upstream of one method reruns only that method."""
    inputs = {"base": model_dir("base"), "data": train_data()}
    if wildcards.algo.startswith("rho1-"):
        inputs["refce"] = refce_path()
    if wildcards.algo == "critic-wmtp":
        inputs["critic"] = critic_table(wildcards.seed)
    return inputs


def get_critic_inputs(wildcards):
    inputs = {"base": model_dir("base"), "data": train_data()}
    if RECIPES["critic-wmtp"].critic.reward == "reward_model":
        inputs["reward"] = model_dir("reward")
    return inputs


def get_eval_inputs(wildcards):
    """The model a row evaluates: the `base` row the downloaded base model itself
    (same protocol, no training), every other row its fine-tuned model."""
    if wildcards.algo == BASE_ROW:
        model = model_dir("base")
    else:
        model = trained_model(wildcards.algo, wildcards.seed)
    return {"model": model, "data": data_path(wildcards.benchmark, TEST_SPLIT)}


def get_report_inputs(wildcards):
    """All evaluations of the configured table and the training metrics of its trained
    rows, in a fixed order."""
    runs = [(a, s) for a in CONFIG.algorithms for s in CONFIG.seeds]
    trained = [(a, s) for a in CONFIG.trained_algorithms for s in CONFIG.seeds]
    return {
        "evals": [
            eval_file(a, s, b, "json") for a, s in runs for b in CONFIG.benchmarks
        ],
        "samples": [
            eval_file(a, s, b, "jsonl") for a, s in runs for b in CONFIG.benchmarks
        ],
        "metrics": [train_metrics(a, s) for a, s in trained],
        "critics": (
            [critic_metrics(s) for s in CONFIG.seeds]
            if "critic-wmtp" in CONFIG.algorithms
            else []
        ),
    }


def get_upload_inputs(wildcards):
    """The report with its figures, and every file behind it: evaluations, training
    metrics and (with critic-wmtp) the critics' metrics."""
    return {
        "report": report_path(),
        "figures": f"results/{RUN}/figures",
        **get_report_inputs(wildcards),
    }


# ---- params: the resolved settings each job depends on -----------------------------
# Snakemake reruns a job when its params change (rerun trigger `params`), so each rule
# gets exactly the settings it reads: editing one recipe reruns only that method.


def get_model_params(wildcards):
    source = getattr(CONFIG.models, wildcards.role)
    if source is None:
        raise WorkflowError(f"models.{wildcards.role} is not configured")
    params = {"source": source.model_dump(mode="json")}
    if source.source == "tiny":
        params["tiny"] = CONFIG.tiny.model_dump(mode="json")
    return params


def get_data_params(wildcards):
    """data.sources names a directory or s3:// prefix for the dataset; otherwise its
    default source (tiny-mbpp: generated from the tiny settings)."""
    source = CONFIG.data.sources.get(wildcards.dataset)
    if source is not None:
        return {"source": source}
    if wildcards.dataset == "tiny-mbpp":
        return {"tiny": CONFIG.tiny.model_dump(mode="json")}
    return {}


def get_refce_params(wildcards):
    return {"data": CONFIG.data.model_dump(mode="json")}


def get_critic_params(wildcards):
    """The critic reads its recipe section, the data settings and the sandbox limits
    of the eval section (for rollout rewards); its seed is the {seed} wildcard."""
    sandbox = ("timeout", "memory_mb", "workers")
    return {
        "critic": RECIPES["critic-wmtp"].critic.model_dump(mode="json"),
        "data": CONFIG.data.model_dump(mode="json"),
        "sandbox": {key: getattr(CONFIG.eval, key) for key in sandbox},
    }


def get_recipe_params(wildcards):
    return RECIPES[wildcards.algo].model_dump(mode="json")


def get_train_params(wildcards):
    return {
        "data": CONFIG.data.model_dump(mode="json"),
        "tracking": CONFIG.tracking.model_dump(mode="json"),
    }


def get_eval_params(wildcards):
    return CONFIG.eval.model_dump(mode="json")


def get_report_params(wildcards):
    return {
        "report": CONFIG.report.model_dump(mode="json"),
        "config_hash": config_hash(CONFIG, RECIPES),
    }


def get_upload_params(wildcards):
    return {
        "prefix": CONFIG.storage.upload_prefix,
        "endpoint_url": CONFIG.storage.endpoint_url,
    }
