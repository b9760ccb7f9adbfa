# Config loading and validation, path helpers and input functions shared by the rules.
# The config is validated here, when the Snakefile loads, so a bad value stops the
# run before any job starts with a message naming the key, the value and what is allowed.

import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

from wmtp.config import registry
from wmtp.config.paths import PROMPT_SPLIT, REPORT_COPY, TEST_SPLIT, TRAIN_SPLIT, VALIDATION_SPLIT, Layout
from wmtp.config.schema import BENCHMARKS, ConfigError, config_hash, load_config

min_version("9.0")

try:
    CONFIG, RECIPES = load_config(config, base_dir=workflow.basedir)
except ConfigError as error:
    raise WorkflowError(f"Invalid configuration:\n{error}") from None
validate(config, "../config/schema/config.schema.json", set_default=False)

RUN = CONFIG.run
# Every results/ path comes from wmtp.config.paths: LAYOUT is this run's (inputs),
# PATTERN the same layout with the {run} wildcard (the rules' outputs).
LAYOUT = Layout.of_run(RUN)
PATTERN = Layout.of_run("{run}")


def _alternatives(names):
    return "|".join(re.escape(name) for name in names)


wildcard_constraints:
    run=re.escape(RUN),
    algo=_alternatives(registry.ROWS),
    seed=r"\d+",
    benchmark=_alternatives(BENCHMARKS),
    dataset=_alternatives(BENCHMARKS),
    split=_alternatives((TRAIN_SPLIT, VALIDATION_SPLIT, TEST_SPLIT, PROMPT_SPLIT)),
    role="base|ref|reward",


def train_data():
    return LAYOUT.data(CONFIG.data.train_dataset, TRAIN_SPLIT)


def trained_alternatives():
    """The `algo` wildcard of the train rule: the registry's trained methods ('base' is not)."""
    return _alternatives(registry.TRAINED)


def critic_settings():
    """The critic stage's `critic:` section: that of the configured rows with a critic
    (load_config checks they agree, since one critic per seed serves them all)."""
    if not CONFIG.critic_rows:
        raise WorkflowError(f"no row of algorithms {CONFIG.algorithms} has a critic")
    return RECIPES[CONFIG.critic_rows[0]].critic


def get_final_outputs():
    """What `snakemake all` builds: the run's report and its copy at results/report.md,
    and with storage.upload_prefix set, the record of their upload."""
    outputs = [LAYOUT.report(), REPORT_COPY]
    if CONFIG.storage.upload_prefix is not None:
        outputs.append(LAYOUT.upload_manifest())
    return outputs


# ---- input functions ---------------------------------------------------------------


def get_train_inputs(wildcards):
    """Every method needs the base model and the training split, and besides exactly
    the stage outputs its registry entry names (the reference CE table, its seed's
    value table), so a change upstream of one method reruns only that method."""
    inputs = {"base": LAYOUT.model("base"), "data": train_data()}
    if registry.needs(wildcards.algo, "refce"):
        inputs["refce"] = LAYOUT.refce(CONFIG.data.train_dataset)
    if registry.needs(wildcards.algo, "values"):
        inputs["critic"] = LAYOUT.critic_table(wildcards.seed)
    return inputs


def get_reference_inputs(wildcards):
    """The downloaded reference, the base (its tokenizer), the fine-tuning splits and the
    training split they are checked against."""
    section = CONFIG.reference_finetune
    dataset = section.dataset or CONFIG.data.train_dataset
    return {
        "ref": LAYOUT.model("ref"),
        "base": LAYOUT.model("base"),
        "splits": [LAYOUT.data(dataset, split) for split in section.splits],
        "exclude": [train_data()],
    }


def get_refce_inputs(wildcards):
    """The reference the refce stage scores with: fine-tuned when reference_finetune is
    enabled, else as downloaded."""
    ref = LAYOUT.finetuned_ref() if CONFIG.reference_finetune.enabled else LAYOUT.model("ref")
    return {"ref": ref, "base": LAYOUT.model("base"), "data": LAYOUT.data(wildcards.dataset, TRAIN_SPLIT)}


def get_critic_inputs(wildcards):
    inputs = {"base": LAYOUT.model("base"), "data": train_data()}
    if critic_settings().reward == "reward_model":
        inputs["reward"] = LAYOUT.model("reward")
    return inputs


def get_eval_inputs(wildcards):
    """The model a row evaluates: an untrained row (`base`) the downloaded base model
    itself (same protocol, no training), every other row its fine-tuned model; and
    MBPP's prompt split when its prompt is three-shot."""
    if registry.method(wildcards.algo).trained:
        model = LAYOUT.trained_model(wildcards.algo, wildcards.seed)
    else:
        model = LAYOUT.model("base")
    inputs = {"model": model, "data": LAYOUT.data(wildcards.benchmark, TEST_SPLIT)}
    if wildcards.benchmark == "mbpp" and CONFIG.eval.mbpp_prompt == "three-shot":
        inputs["shots"] = LAYOUT.data("mbpp", PROMPT_SPLIT)  # Code Llama's 3-shot examples
    return inputs


def get_report_inputs(wildcards):
    """All evaluations of the configured table and the training metrics of its trained
    rows, in a fixed order (Layout.report_inputs: the CLI's report reads the same
    list)."""
    return LAYOUT.report_inputs(CONFIG)


def get_upload_inputs(wildcards):
    """The report with its figures, and every file behind it: evaluations, training
    metrics and (with a critic row) the critics' metrics."""
    return {
        "report": LAYOUT.report(),
        "table": LAYOUT.table_csv(),
        "figures": LAYOUT.figures(),
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
    """The data settings, and what the reference was fine-tuned on (recorded in the
    table's model id), None when it is scored as downloaded."""
    section, finetuned_on = CONFIG.reference_finetune, None
    if section.enabled:
        finetuned_on = f"{section.dataset or CONFIG.data.train_dataset}:" + "+".join(section.splits)
    return {"data": CONFIG.data.model_dump(mode="json"), "ref_finetuned_on": finetuned_on}


def get_reference_params(wildcards):
    return {
        "reference_finetune": CONFIG.reference_finetune.model_dump(mode="json"),
        "data": CONFIG.data.model_dump(mode="json"),
    }


def get_critic_params(wildcards):
    """The critic reads its recipe section, the data settings and the sandbox limits
    of the eval section (for rollout rewards); its seed is the {seed} wildcard."""
    sandbox = ("timeout", "memory_mb", "workers")
    return {
        "critic": critic_settings().model_dump(mode="json"),
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
