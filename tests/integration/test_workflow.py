"""The Snakemake workflow: lint, the DAG of a dry run, config errors that stop it
before any job, and (slow) the reduced tiny DAG end to end: a no-op rerun, a
single-target regeneration and a recipe change that reruns only its algorithm.

Each test runs Snakemake in a copy of the workflow files in a temporary directory,
so results/, logs/ and .snakemake/ of the repository are never touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from wmtp.config import registry
from wmtp.config.paths import DEFAULT_CONFIG
from wmtp.config.schema import PipelineConfig, load_config, load_config_files

REPO = Path(__file__).resolve().parents[2]


def setting(*configfiles: str) -> PipelineConfig:
    """The config Snakemake sees with these `--configfile`s: its rows, trained rows
    and seeds are what the plan must hold."""
    data = load_config_files([REPO / f for f in configfiles], base=REPO / DEFAULT_CONFIG)
    return load_config(data, REPO)[0]
WORKFLOW = ("Snakefile", "rules", "config", "profiles", "envs", "workflow_scripts")
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return copy_workflow(tmp_path)


def copy_workflow(tmp_path: Path) -> Path:
    for name in WORKFLOW:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, tmp_path / name)
    return tmp_path


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def snakemake(workdir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run snakemake as a user would: without a launcher's rank variables, which
    would make every lone training job rendezvous on the same TCP port."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    return subprocess.run(
        [*SNAKEMAKE, *args], cwd=workdir, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def planned_jobs(output: str) -> Counter:
    """Job counts from the 'Job stats' table of a (dry) run, without the total."""
    counts: Counter = Counter()
    if "Job stats:" not in output:
        return counts
    table = output.split("Job stats:", 1)[1].splitlines()
    for line in table[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        if parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def write_config(workdir: Path, name: str, update: dict) -> str:
    path = workdir / "config" / name
    path.write_text(yaml.safe_dump(update))
    return str(path.relative_to(workdir))


def test_lint_is_clean(workdir):
    result = snakemake(workdir, "--lint")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Lints for" not in output
    assert "your workflow is in a good condition" in output


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory) -> str:
    """Output of one dry run of `all` on the tiny default (Snakemake starts slowly here)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("plan"))
    result = snakemake(workdir, "all", "-n")
    assert result.returncode == 0, result.stderr
    return result.stdout


def planned_inputs(output: str, rule: str) -> dict[str, str]:
    """{output line: input line} of every planned job of `rule`."""
    blocks = re.findall(rf"^rule {rule}:\n((?:    .*\n)+)", output, flags=re.M)
    fields = [dict(re.findall(r"^    (\w+): (.*)$", block, flags=re.M)) for block in blocks]
    return {field["output"]: field.get("input", "") for field in fields}


def test_dry_run_plans_the_whole_table(tiny_plan):
    tiny = setting()
    rows, trained, seeds = tiny.algorithms, tiny.trained_algorithms, len(tiny.seeds)
    assert planned_jobs(tiny_plan) == Counter(
        download_model=2,  # base and ref; no reward model in the tiny default
        download_data=2,  # tiny-mbpp train and test
        refce=1,  # shared by both rho1 algorithms
        critic=seeds,  # one critic per seed: its randomness is inside the interval
        train=len(trained) * seeds,  # every row but base
        eval=len(rows) * seeds,  # every row, one benchmark
        report=1,
        publish_report=1,
        all=1,
    )
    for algo in rows:
        for seed in range(seeds):
            assert f"results/tiny/eval/{algo}/seed{seed}/tiny-mbpp.json" in tiny_plan


def test_each_algorithm_reads_only_what_it_needs(tiny_plan):
    """baseline-mtp trains without refce and critic; rho1-* need refce, critic-wmtp the
    value table of its own seed's critic; so a change upstream of one method reruns
    only that method."""
    tiny = setting()
    trainings = planned_inputs(tiny_plan, "train")
    assert len(trainings) == len(tiny.seeds) * len(tiny.trained_algorithms)
    for output, inputs in trainings.items():
        algo = re.search(r"train/([\w-]+)/seed", output).group(1)
        assert "results/tiny/models/base" in inputs
        assert "results/tiny/data/tiny-mbpp/train.parquet" in inputs
        assert ("refce/tiny-mbpp.parquet" in inputs) == registry.needs(algo, "refce")
        seed = re.search(r"/seed(\d+)/", output).group(1)
        assert ("critic/" in inputs) == registry.needs(algo, "values")
        if registry.needs(algo, "values"):
            assert f"results/tiny/critic/seed{seed}/values.parquet" in inputs
    critics = planned_inputs(tiny_plan, "critic")
    assert sorted(o.split(",")[0] for o in critics) == [
        f"results/tiny/critic/seed{s}/values.parquet" for s in tiny.seeds
    ]
    evals = planned_inputs(tiny_plan, "eval")
    assert len(evals) == len(tiny.seeds) * len(tiny.algorithms)
    for output, inputs in evals.items():
        model = output.split(",")[0].replace("/eval/", "/train/").rsplit("/", 1)[0] + "/model"
        if "/eval/base/" in output:  # the base row: the downloaded model, never trained
            model = "results/tiny/models/base"
        assert inputs == f"{model}, results/tiny/data/tiny-mbpp/test.parquet"
    assert not any("/train/base/" in output for output in trainings)


@pytest.mark.slow
def test_paper_dry_run_plans_three_benchmarks(workdir):
    result = snakemake(workdir, "all", "-n", "--configfile", "config/paper.yaml")
    assert result.returncode == 0, result.stderr
    jobs, paper = planned_jobs(result.stdout), setting("config/paper.yaml")
    assert jobs["train"] == len(paper.trained_algorithms) * 3 and jobs["eval"] == len(paper.algorithms) * 3 * 3
    assert jobs["critic"] == 3  # one per seed
    # mbpp train + the three test splits + the reference's mbpp validation and prompt splits
    assert jobs["download_data"] == 1 + 3 + 2
    assert "results/paper/eval/critic-wmtp/seed2/codecontests.json" in result.stdout


REFERENCE = "results/{run}/reference/model"


def assert_refce_reads_the_finetuned_reference(output: str, run: str, splits: list[str]) -> None:
    """One finetune_reference job on the given splits (and the training split it is
    checked against), whose model the refce job scores with instead of models/ref."""
    model = REFERENCE.format(run=run)
    assert planned_jobs(output)["finetune_reference"] == 1, output[-3000:]
    [inputs] = planned_inputs(output, "finetune_reference").values()
    assert inputs.startswith(f"results/{run}/models/ref, results/{run}/models/base, ")
    assert all(split in inputs for split in splits), inputs
    [refce_inputs] = planned_inputs(output, "refce").values()
    assert refce_inputs.split(", ")[0] == model, refce_inputs


def test_paper_dry_run_fine_tunes_the_reference_on_mbpp_validation_and_prompt(workdir):
    result = snakemake(workdir, "all", "-n", "--configfile", "config/paper.yaml")
    assert result.returncode == 0, result.stderr
    assert_refce_reads_the_finetuned_reference(
        result.stdout, "paper", ["data/mbpp/validation.parquet", "data/mbpp/prompt.parquet"]
    )
    [inputs] = planned_inputs(result.stdout, "finetune_reference").values()
    assert inputs.endswith("results/paper/data/mbpp/train.parquet")  # checked for overlap


def test_tiny_dry_run_fine_tunes_the_reference_when_enabled(workdir, tiny_plan):
    assert "finetune_reference" not in planned_jobs(tiny_plan)  # off in the tiny default
    [refce_inputs] = planned_inputs(tiny_plan, "refce").values()
    assert refce_inputs.startswith("results/tiny/models/ref, ")
    configfile = write_config(workdir, "reference.yaml", {"reference_finetune": {"enabled": True}})
    result = snakemake(workdir, "all", "-n", "--configfile", configfile)
    assert result.returncode == 0, result.stderr
    assert_refce_reads_the_finetuned_reference(result.stdout, "tiny", ["data/tiny-mbpp/validation.parquet"])


def test_three_shot_mbpp_evaluations_read_the_prompt_split(workdir):
    """eval.mbpp_prompt three-shot: every MBPP evaluation (and no other) takes MBPP's
    prompt split, whose tasks 2-4 are its examples."""
    configfile = write_config(workdir, "three_shot.yaml", {"eval": {"mbpp_prompt": "three-shot"}})
    result = snakemake(workdir, "all", "-n", "--configfile", "config/paper.yaml", configfile)
    assert result.returncode == 0, result.stderr
    evals = planned_inputs(result.stdout, "eval")
    assert len(evals) == len(setting("config/paper.yaml").algorithms) * 3 * 3
    for output, inputs in evals.items():
        shots = "results/paper/data/mbpp/prompt.parquet" in inputs
        assert shots == ("/mbpp.json" in output), (output, inputs)


def test_reference_finetuning_on_a_test_split_stops_the_dry_run(workdir):
    update = {"reference_finetune": {"enabled": True, "splits": ["validation", "test"]}}
    result = snakemake(workdir, "all", "-n", "--configfile", write_config(workdir, "bad.yaml", update))
    assert_stopped_before_any_job(result, ["reference_finetune.splits: 'test' is tiny-mbpp's test split"])


@pytest.mark.slow
def test_paper_codecontests_dry_run_trains_on_the_codecontests_train_split(workdir):
    """The paper's CodeContests setting: every training reads CodeContests' train
    split (and the reference CE of it), every row is evaluated on its test split."""
    configfile = "config/paper_codecontests.yaml"
    result = snakemake(workdir, "all", "-n", "--configfile", configfile)
    assert result.returncode == 0, result.stderr
    jobs, contests = planned_jobs(result.stdout), setting(configfile)
    seeds = len(contests.seeds)
    assert jobs["train"] == len(contests.trained_algorithms) * seeds and jobs["eval"] == len(contests.algorithms) * seeds
    assert jobs["download_data"] == 2 and jobs["refce"] == 1 and "critic" not in jobs
    data = "results/paper-codecontests/data/codecontests"
    for output, inputs in planned_inputs(result.stdout, "train").items():
        assert f"{data}/train.parquet" in inputs, output
    assert "results/paper-codecontests/refce/codecontests.parquet" in result.stdout
    assert "results/paper-codecontests/eval/rho1-weighted/seed2/codecontests.json" in result.stdout


@pytest.mark.slow
def test_smol_dry_run_plans_a_hub_model_with_heads(workdir):
    result = snakemake(workdir, "all", "-n", "--configfile", "config/smol.yaml")
    assert result.returncode == 0, result.stderr
    jobs = planned_jobs(result.stdout)
    # six rows: the base model is evaluated untrained, the five others are trainings
    assert jobs["train"] == 5 and jobs["eval"] == 6 * 2
    assert "results/smol/eval/rho1-weighted/seed0/humaneval.json" in result.stdout


def assert_stopped_before_any_job(result: subprocess.CompletedProcess, expected: list[str]):
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Invalid configuration" in output
    for text in expected:
        assert text in output, output
    assert not planned_jobs(output) and "rule " not in result.stdout


def test_bad_config_stops_before_any_job_with_every_problem(workdir):
    configfile = write_config(
        workdir,
        "bad.yaml",
        {"eval": {"n_samples": 3}, "algorithms": ["baseline-mtp", "rho2"], "temprature": 0.2},
    )
    result = snakemake(workdir, "all", "-n", "--configfile", configfile)
    assert_stopped_before_any_job(
        result,
        [
            "eval.ks",
            "n_samples (3)",
            'algorithms.1 = "rho2"',
            "rho1-weighted",
            "temprature = 0.2",
            "unknown key",
        ],
    )


@pytest.mark.parametrize(
    "update, expected",
    [
        ({"eval": {"n_samples": 3}}, ["eval.ks", "n_samples (3)"]),
        ({"algorithms": ["baseline-mtp", "rho2"]}, ['algorithms.1 = "rho2"', "rho1-weighted"]),
        ({"eval": {"temprature": 0.2}}, ["eval.temprature = 0.2", "unknown key", "temperature"]),
        (
            {"recipes": {"critic-wmtp": "config/recipes/none.yaml"}},
            ["recipes.critic-wmtp", "not found"],
        ),
        ({"seeds": [-1]}, ["seeds.0 = -1", "greater than or equal to 0"]),
    ],
    ids=["k-above-n", "unknown-algorithm", "unknown-key", "missing-recipe", "negative-seed"],
)
@pytest.mark.slow
def test_each_bad_config_stops_before_any_job(workdir, update, expected):
    configfile = write_config(workdir, "bad.yaml", update)
    result = snakemake(workdir, "all", "-n", "--configfile", configfile)
    assert_stopped_before_any_job(result, expected)


def test_negative_learning_rate_in_a_recipe_stops_the_dry_run(workdir):
    recipe = workdir / "config" / "recipes" / "rho1-weighted.yaml"
    recipe.write_text(recipe.read_text() + "train:\n  lr: -1.0e-3  # an override\n")
    result = snakemake(workdir, "-n", "all")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "train.lr = -0.001" in output and "greater than 0" in output
    assert not planned_jobs(output)


# ---- end to end (slow): the reduced tiny DAG ------------------------------------------

CI = ("--configfile", "config/ci.yaml")  # always after the targets: it takes several values


@pytest.mark.slow
def test_end_to_end_rerun_regenerate_and_recipe_change(workdir):
    result = snakemake(workdir, "all", "--cores", "2", *CI, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = workdir / "results" / "report.md"
    assert report.exists() and report.read_text() == (workdir / "results/ci/report.md").read_text()
    assert "baseline-mtp" in report.read_text()
    assert "Report: results/report.md" in result.stdout + result.stderr

    # the Snakemake HTML report embeds the files marked with report()
    html = snakemake(workdir, "--report", "results/report.html", *CI)
    assert html.returncode == 0 and (workdir / "results/report.html").stat().st_size > 0, (
        html.stderr
    )

    # nothing changed: nothing to do
    again = snakemake(workdir, "all", "-n", *CI)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout, again.stdout[-3000:]

    # one deleted result: only its job reruns
    target = "results/ci/eval/rho1-tokenskip/seed0/tiny-mbpp.json"
    (workdir / target).unlink()
    plan = snakemake(workdir, target, "-n", *CI)
    assert planned_jobs(plan.stdout) == Counter(eval=1), plan.stdout[-3000:]
    regenerated = snakemake(workdir, target, "--cores", "2", *CI, timeout=300)
    assert regenerated.returncode == 0 and (workdir / target).exists(), regenerated.stderr[-3000:]

    # a shared knob changed in its one place: every training reruns (and nothing else
    # upstream of them)
    ci_config = workdir / "config" / "ci.yaml"
    shared = ci_config.read_text()
    ci_config.write_text(re.sub(r"(?m)^  lr: 1.0e-3", "  lr: 2.0e-3", shared, count=1))
    plan = snakemake(workdir, "all", "-n", *CI)
    assert planned_jobs(plan.stdout)["train"] == len(setting("config/ci.yaml").trained_algorithms), plan.stdout[-3000:]
    ci_config.write_text(shared)

    # one method's own setting changed: only that algorithm's trainings and evaluations,
    # and the report
    recipe = workdir / "config" / "recipes" / "rho1-weighted.yaml"
    recipe.write_text(recipe.read_text() + "weighting:\n  temperature: 0.5  # an override\n")
    plan = snakemake(workdir, "all", "-n", *CI)
    assert plan.returncode == 0, plan.stderr
    assert planned_jobs(plan.stdout) == Counter(
        train=1, eval=1, report=1, publish_report=1, all=1
    ), plan.stdout[-3000:]
    changed = re.findall(r"results/ci/train/([\w-]+)/seed\d/model", plan.stdout)
    assert set(changed) == {"rho1-weighted"}


@pytest.mark.slow
def test_tiny_fine_tunes_the_reference_and_refce_reads_it(workdir):
    """The reduced tiny DAG with reference_finetune on, run for real up to the refce
    table: a few steps of fine-tuning, whose model the table records it was scored with."""
    update = {"reference_finetune": {"enabled": True, "max_steps": 3, "micro_batch_size": 4, "lr": 1.0e-3}}
    configfile = write_config(workdir, "reference.yaml", update)
    target = "results/ci/refce/tiny-mbpp.parquet"
    result = snakemake(workdir, target, "--cores", "2", *CI, configfile, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert planned_jobs(result.stdout + result.stderr)["finetune_reference"] == 1
    model = workdir / REFERENCE.format(run="ci")
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["steps"] == 3 and manifest["fine_tuned_from"] == "tiny:ref"
    assert manifest["splits"] == ["results/ci/data/tiny-mbpp/validation.parquet"]
    meta = pq.read_schema(workdir / target).metadata
    assert meta[b"wmtp.ref_model"] == b"tiny:ref fine-tuned on tiny-mbpp:validation"


@pytest.mark.slow
def test_slurm_profile_puts_gpu_rules_on_a100s(workdir):
    result = snakemake(
        workdir, "all", "-n", "--configfile", "config/paper.yaml", "--profile", "profiles/slurm"
    )
    assert result.returncode == 0, result.stderr
    trainings = re.findall(r"^rule train:\n(?:    .*\n)*?    resources: (.*)$", result.stdout, re.M)
    assert len(trainings) == len(setting("config/paper.yaml").trained_algorithms) * 3
    assert all("gpu=4" in line and "gpu_model=a100" in line for line in trainings)
    assert "slurm_partition=<gpu-partition>" in trainings[0]
    [reference] = re.findall(r"^rule finetune_reference:\n(?:    .*\n)*?    resources: (.*)$", result.stdout, re.M)
    assert "gpu=4" in reference and "gpu_model=a100" in reference  # a 7B's full fine-tuning, as train
