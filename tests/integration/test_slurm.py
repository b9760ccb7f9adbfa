"""The reduced DAG on a real Slurm, reading its models and data from S3 and uploading
its results there.

scripts/slurm-node.sh starts a single-node Slurm (Debian's slurm-wlm, munge) with
four fake A100s; moto's server mode serves the S3 API on loopback. The CI profile
is profiles/slurm/config.yaml with only the site settings changed (`ci_profile`).
One set of runs serves every test of this module (module-scoped fixtures):

1. `bucket`: the reduced run's models and tiny-mbpp splits, built as its download
   stage builds them and uploaded; the run's config reads them from there and
   sets storage.upload_prefix (`services_config`).
2. `local_run`: the DAG through the CI profile with the local executor: the
   uninterrupted reference, and the local half of the wall-time comparison.
3. `slurm_run`: the same DAG through the Slurm executor. Once the baseline
   training has written its first checkpoint its Slurm job is `scancel`-ed (as a
   lost node or a preemption would end it); the profile's retries submit it again in
   the same run, which resumes it, and a second run has nothing left to do.
4. `time_limited_run`: one long training whose first Slurm job gets a 1-minute
   time limit: Slurm kills it (TIMEOUT), the profile's retries submit it again, and
   the second attempt resumes from the last checkpoint, in the same Snakemake run.

Every Snakemake call has a time limit; past it the run is killed and the Slurm
node's `stop` cancels whatever is left.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import boto3
import pandas as pd
import pytest
import yaml

from tests.integration.test_profiles import local_rules
from tests.integration.test_workflow import LAUNCHER_VARIABLES, REPO, copy_workflow, planned_jobs
from tests.services import AWS_TEST_ENV, build_ci_inputs, moto_server, slurm_node
from wmtp.config.paths import TABLE_CSV
from wmtp.infra import storage

BUCKET = "wmtp-ci"
UPLOAD_PREFIX = f"s3://{BUCKET}/results/ci"
CANCELLED = ("baseline-mtp", 0)  # the training whose Slurm job is cancelled mid-way
# time to cancel it: enough epochs that max_steps decides the length
LONG_BASELINE = {"epochs": 100, "max_steps": 150, "checkpoint_every": 10, "val_every": 50}
# A training of minutes as one process on the CI node (it ran 2100 steps in the
# first minute there at load 3.7 on 2 cores), checkpointed every few seconds, so that
# a 1-minute time limit stops it early: long in steps, not slowed down.
TIME_LIMITED = ("baseline-mtp", 0)
# keep_checkpoints: the resumed attempt can finish (and would remove them) before the
# poll below sees the first attempt's TIMEOUT and looks for what it left
TIMED_BASELINE = {"epochs": 1000, "max_steps": 6000, "checkpoint_every": 100, "log_every": 100,
                  "val_every": 2000, "keep_checkpoints": True}  # fmt: skip
FIRST_ATTEMPT_MINUTES = 1  # Slurm's smallest time limit
# the report's timing columns: the training-cost table's and the critic table's
TIMING_COLUMNS = ("wall time (s)", "tokens/s", "seconds")
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def ci_profile(dest: Path, node: dict, configfiles: list[str]) -> Path:
    """profiles/slurm/ as a CI node needs it: its partition and no account (no
    accounting database), sizes that fit 2 CPUs (2 fake GPUs and 2 threads for a
    training, one per rank), the reduced config, `squeue` for job status (no
    `sacct`) and a first status check after 5 s instead of 40 (jobs last seconds)."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile |= {
        "configfile": configfiles,
        "cores": node["cpus"],
        "slurm-status-command": "squeue",
        "slurm-init-seconds-before-status-checks": 5,
        "default-resources": {"slurm_partition": node["partition"], "mem_mb": 1000, "runtime": 30},
    }
    profile["set-threads"] = {rule: 2 if rule == "train" else 1 for rule in profile["set-threads"]}
    for resources in profile["set-resources"].values():
        resources |= {"mem_mb": 2000, "runtime": 30}
        if "slurm_partition" in resources:
            resources["slurm_partition"] = node["partition"]
    profile["set-resources"]["train"]["gpu"] = 2
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


def test_ci_profile_changes_only_site_settings(tmp_path):
    cluster = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    node = {"partition": "ci", "cpus": 2}
    ci = yaml.safe_load((ci_profile(tmp_path, node, ["config/ci.yaml"]) / "config.yaml").read_text())
    site = {"configfile", "cores", "default-resources", "set-threads", "set-resources",
            "slurm-status-command", "slurm-init-seconds-before-status-checks"}
    assert {k: v for k, v in ci.items() if k not in site} == {
        k: v for k, v in cluster.items() if k not in site
    }
    assert ci["set-threads"].keys() == cluster["set-threads"].keys()
    for rule, resources in cluster["set-resources"].items():
        assert ci["set-resources"][rule].keys() == resources.keys()
        assert ci["set-resources"][rule].get("gpu_model") == resources.get("gpu_model")


# ---- running Snakemake with a time limit ---------------------------------------------


def environment() -> dict[str, str]:
    """A user's environment: no launcher rank variables, AWS credentials set."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    return env | AWS_TEST_ENV


def s3_client(endpoint: str):
    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=AWS_TEST_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=AWS_TEST_ENV["AWS_SESSION_TOKEN"], region_name=AWS_TEST_ENV["AWS_DEFAULT_REGION"],
    )


def start(workdir: Path, args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [*SNAKEMAKE, *args], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(proc: subprocess.Popen, timeout: float, log: Path) -> tuple[int, str]:
    """Wait for a Snakemake run; past `timeout` kill it and its children."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"snakemake ran over {timeout} s:\n{log.read_text()[-4000:]}")
    return proc.returncode, log.read_text()


def run(workdir: Path, args: list[str], env: dict, name: str, timeout: float) -> dict:
    log = workdir / f"{name}.log"
    began = time.monotonic()
    code, output = finish(start(workdir, args, env, log), timeout, log)
    return {"returncode": code, "output": output, "seconds": time.monotonic() - began}


# ---- the runs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def bucket(s3, tmp_path_factory):
    """The reduced run's inputs under s3://wmtp-ci/inputs/."""
    inputs = build_ci_inputs(tmp_path_factory.mktemp("inputs"))
    s3_client(s3).create_bucket(Bucket=BUCKET)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in AWS_TEST_ENV.items():
            patch.setenv(key, value)
        storage.upload_dir(inputs, f"s3://{BUCKET}/inputs", endpoint_url=s3)
    return inputs


def services_config(workdir: Path, endpoint: str) -> str:
    """config/ci.yaml's run with models and data from the bucket, results uploaded
    to it, and a longer baseline training (so that it can be cancelled mid-way)."""
    recipe = {"algorithm": "baseline-mtp", "train": LONG_BASELINE}  # the shared train: overridden
    (workdir / "config" / "recipes" / "baseline-mtp-long.yaml").write_text(yaml.safe_dump(recipe))
    overlay = {
        "recipes": {"baseline-mtp": "config/recipes/baseline-mtp-long.yaml"},
        "models": {role: {"source": "s3", "id": f"s3://{BUCKET}/inputs/models/{role}"}
                   for role in ("base", "ref")},
        "data": {"sources": {"tiny-mbpp": f"s3://{BUCKET}/inputs/data/tiny-mbpp"}},
        "storage": {"endpoint_url": endpoint, "upload_prefix": UPLOAD_PREFIX},
    }
    (workdir / "config" / "services.yaml").write_text(yaml.safe_dump(overlay))
    return "config/services.yaml"


def prepare(workdir: Path, endpoint: str, node: dict) -> Path:
    copy_workflow(workdir)
    configs = ["config/ci.yaml", services_config(workdir, endpoint)]
    return ci_profile(workdir / "ci-profile", node, configs)


def uploaded(endpoint: str) -> dict[str, str]:
    """sha256 of every object under the upload prefix, keyed by relative path."""
    client = s3_client(endpoint)
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="results/ci/"):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
            found[item["Key"].removeprefix("results/ci/")] = hashlib.sha256(body).hexdigest()
    return found


def clear_upload(endpoint: str) -> None:
    client = s3_client(endpoint)
    for key in uploaded(endpoint):
        client.delete_object(Bucket=BUCKET, Key=f"results/ci/{key}")


@pytest.fixture(scope="module")
def local_run(s3, bucket, tmp_path_factory):
    """The DAG through the CI profile, executed locally; the upload it made is
    recorded, then removed so that the Slurm run's upload is checked on its own."""
    workdir = tmp_path_factory.mktemp("local")
    profile = prepare(workdir, s3, {"partition": "ci", "cpus": os.cpu_count()})
    env = environment()
    plan = run(workdir, ["--profile", str(profile), "-n", "all"], env, "plan", 300)
    assert plan["returncode"] == 0, plan["output"][-4000:]
    # Locally, without `executor` and `jobs` (a limit on cluster jobs that, when set,
    # lifts the local limit of `cores`): at most `cores` threads at once, like the node.
    local = yaml.safe_load((profile / "config.yaml").read_text())
    del local["executor"], local["jobs"]
    (workdir / "local-profile").mkdir()
    (workdir / "local-profile" / "config.yaml").write_text(yaml.safe_dump(local))
    result = run(workdir, ["--profile", "local-profile", "all"], env, "run", 1800)
    result |= {"workdir": workdir, "planned": planned_jobs(plan["output"]), "uploaded": uploaded(s3)}
    clear_upload(s3)
    print(f"\nlocal run of the reduced DAG: {result['seconds']:.0f} s, load {os.getloadavg()}")
    return result


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with slurm_node(tmp_path_factory.mktemp("slurm")) as node:
        yield node


def slurm_job_of(algo: str, seed: int) -> str | None:
    """Slurm id of the queued or running training job of (algo, seed), from the
    comment the executor gives every job (`rule_<rule>_wildcards_<wildcards>`)."""
    lines = subprocess.run(["squeue", "-h", "-o", "%i %k %T"], capture_output=True, text=True).stdout
    for line in lines.splitlines():
        job, comment, state = line.split()
        if comment == f"rule_train_wildcards_ci_{algo}_{seed}" and state == "RUNNING":
            return job
    return None


@pytest.fixture(scope="module")
def slurm_run(slurm, s3, bucket, local_run, tmp_path_factory):
    """The DAG through Slurm; the baseline training is cancelled after its first
    checkpoint; the run resubmits and resumes it, and a second `snakemake --profile
    ci all` (the recovery a user would try) finds nothing to do."""
    workdir = tmp_path_factory.mktemp("slurm-run")
    profile = prepare(workdir, s3, slurm)
    env = environment()
    algo, seed = CANCELLED
    checkpoint = workdir / f"results/ci/train/{algo}/seed{seed}/checkpoints/latest"
    log = workdir / "first.log"
    began = time.monotonic()
    proc = start(workdir, ["--profile", str(profile), "all"], env, log)
    cancelled = None
    while proc.poll() is None and time.monotonic() - began < 1800:
        job = slurm_job_of(algo, seed)
        if job and checkpoint.exists():
            subprocess.run(["scancel", job], check=True)
            cancelled = {"job": job, "after_s": time.monotonic() - began}
            break
        time.sleep(0.25)
    code, output = finish(proc, max(60, 1800 - (time.monotonic() - began)), log)
    first = {"returncode": code, "output": output, "seconds": time.monotonic() - began,
             "cancelled": cancelled}
    recovery = run(workdir, ["--profile", str(profile), "all"], env, "recovery", 900)
    print(f"\nSlurm run: {first['seconds']:.0f} s until it stopped with job {cancelled} cancelled; "
          f"recovery {recovery['seconds']:.0f} s; load {os.getloadavg()}")
    return {"workdir": workdir, "first": first, "recovery": recovery, "uploaded": uploaded(s3)}


# ---- S3 ------------------------------------------------------------------------------


def expected_uploads(run_dir: Path) -> set[str]:
    """What the upload rule must send: the report, its table and figures, and every
    evaluation, training-metrics and critic-metrics file of the run."""
    files = {"report.md", TABLE_CSV, "manifest.json"}
    files |= {p.relative_to(run_dir).as_posix() for p in (run_dir / "figures").iterdir()}
    files |= {p.relative_to(run_dir).as_posix() for p in (run_dir / "eval").rglob("*.json*")}
    files |= {p.relative_to(run_dir).as_posix() for p in (run_dir / "train").glob("*/seed*/metrics.parquet")}
    files |= {p.relative_to(run_dir).as_posix() for p in (run_dir / "critic").glob("seed*/metrics.json")}
    return files


def check_upload(run_dir: Path, objects: dict[str, str]) -> None:
    assert set(objects) == expected_uploads(run_dir)
    manifest = json.loads((run_dir / "upload.json").read_text())
    assert manifest["prefix"] == UPLOAD_PREFIX
    assert {rel: sha for rel, sha in objects.items() if rel != "manifest.json"} == manifest["files"]
    assert manifest["files"] == {rel: storage.sha256_file(run_dir / rel) for rel in manifest["files"]}


@pytest.mark.slow
def test_local_run_reads_models_and_data_from_s3_and_uploads_results(local_run):
    assert local_run["returncode"] == 0, local_run["output"][-4000:]
    run_dir = local_run["workdir"] / "results" / "ci"
    for role in ("base", "ref"):
        manifest = json.loads((run_dir / "models" / role / "manifest.json").read_text())
        assert (manifest["source"], manifest["id"]) == ("s3", f"s3://{BUCKET}/inputs/models/{role}")
    for split in ("train", "test"):
        manifest = json.loads((run_dir / "data" / "tiny-mbpp" / f"{split}.manifest.json").read_text())
        assert manifest["repo"] == f"s3://{BUCKET}/inputs/data/tiny-mbpp"
    check_upload(run_dir, local_run["uploaded"])


@pytest.mark.slow
def test_every_row_of_the_study_is_in_its_mlflow_experiment(local_run):
    """After `snakemake all`: one experiment for the study holding a training run per
    trained (row, seed) with its metrics.parquet and pass@k, an evaluation run per
    seed of `base`, and a report run with the report; every run tagged with its row
    and the config hash the report quotes."""
    from mlflow import MlflowClient

    assert local_run["returncode"] == 0, local_run["output"][-4000:]
    run_dir = local_run["workdir"] / "results" / "ci"
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    assert {e.name for e in client.search_experiments()} - {"Default"} == {"wmtp/ci"}  # sqlite's own
    runs = client.search_runs([client.get_experiment_by_name("wmtp/ci").experiment_id])
    quoted = (run_dir / "report.md").read_text()
    report_hash = re.search(r"config hash: `(\w+)`", quoted).group(1)
    report_commit = re.search(r"git commit: `([\w-]+)`", quoted).group(1)
    assert {r.data.tags["config_hash"] for r in runs} == {report_hash}
    assert {r.data.tags["git_commit"] for r in runs} == {report_commit}  # "unknown": a copy, not a checkout
    assert all(r.info.status == "FINISHED" and r.data.tags["run"] == "ci" for r in runs)
    by_kind = {kind: [r for r in runs if r.data.tags["kind"] == kind] for kind in ("training", "evaluation", "report")}
    assert sum(map(len, by_kind.values())) == len(runs) and len(by_kind["report"]) == 1
    rows = {(r.data.tags["algorithm"], int(r.data.tags["seed"])): r for r in by_kind["training"] + by_kind["evaluation"]}
    assert len(rows) == len(by_kind["training"]) + len(by_kind["evaluation"])
    evaluated = {(p.parent.parent.name, int(p.parent.name.removeprefix("seed"))): p
                 for p in run_dir.glob("eval/*/seed*/tiny-mbpp.json")}  # fmt: skip
    assert set(rows) == set(evaluated)  # every evaluated row and seed, each in one run
    assert {key for key, r in rows.items() if r.data.tags["kind"] == "evaluation"} == {("base", 0)}
    for key, mlflow_run in rows.items():
        summary = json.loads(evaluated[key].read_text())
        metrics = mlflow_run.data.metrics
        assert metrics["tiny_mbpp_pass_at_1"] == pytest.approx(summary["pass@1"]), key
        assert metrics["tiny_mbpp_pass_at_2"] == pytest.approx(summary["pass@2"]), key
        if mlflow_run.data.tags["kind"] == "training":
            assert [a.path for a in client.list_artifacts(mlflow_run.info.run_id)] == ["metrics.parquet"]
    report = by_kind["report"][0].info.run_id
    assert sorted(a.path for a in client.list_artifacts(report)) == sorted(["figures", "report.md", TABLE_CSV])


# ---- Slurm ---------------------------------------------------------------------------


def submissions(output: str) -> Counter:
    """Slurm jobs submitted per rule, from the executor's 'submitted with SLURM jobid' lines."""
    return Counter(re.findall(r"submitted with SLURM jobid \d+ \(log: \S+/rule_(\w+)/", output))


@pytest.mark.slow
def test_every_non_local_job_goes_through_sbatch(slurm_run, local_run):
    first, recovery = slurm_run["first"], slurm_run["recovery"]
    assert recovery["returncode"] == 0, recovery["output"][-4000:]
    submitted = submissions(first["output"]) + submissions(recovery["output"])
    local = local_rules()
    expected = Counter({r: n for r, n in local_run["planned"].items() if r not in local})
    expected["train"] += 1  # the cancelled training, submitted again (the profile's retries)
    assert submitted == expected
    assert {"download_model", "download_data"} <= local & set(local_run["planned"])
    for rule in local & set(local_run["planned"]):
        assert re.search(rf"^localrule {rule}:", first["output"] + recovery["output"], re.M)


@pytest.mark.slow
def test_a_two_gpu_training_runs_two_ranks_in_one_job(slurm_run):
    trainings = sorted((slurm_run["workdir"] / "results/ci/train").glob("*/seed*/model/config.json"))
    assert trainings
    for config in trainings:
        assert json.loads(config.read_text())["resolved config"]["world_size"] == 2, config


@pytest.mark.slow
def test_scancelled_training_resumes_from_its_checkpoint(slurm_run):
    first, recovery = slurm_run["first"], slurm_run["recovery"]
    assert first["cancelled"], "the baseline training finished before it could be cancelled"
    job = first["cancelled"]["job"]
    assert f"SLURM-job '{job}' failed, SLURM status is: 'CANCELLED'" in first["output"]
    assert re.search(r"^Trying to restart job \d+\.$", first["output"], re.M)
    assert first["returncode"] == 0, first["output"][-4000:]  # resubmitted, so the run succeeded
    assert "Nothing to be done" in recovery["output"] and not planned_jobs(recovery["output"])
    algo, seed = CANCELLED
    log = (slurm_run["workdir"] / f"logs/ci/train/{algo}/seed{seed}.log").read_text()
    resumed = re.search(rf"resuming {algo} from step (\d+)", log)
    assert resumed and int(resumed.group(1)) >= LONG_BASELINE["checkpoint_every"], log[-3000:]
    metrics = pd.read_parquet(slurm_run["workdir"] / f"results/ci/train/{algo}/seed{seed}/metrics.parquet")
    assert list(metrics["step"]) == list(range(1, LONG_BASELINE["max_steps"] + 1))


def without_timing(report: str) -> str:
    """The report with the cells of its timing columns (`TIMING_COLUMNS`) blanked.

    A header row names the columns; the rows under it, up to the table's end,
    have those cells replaced by "-".
    """
    lines, columns = [], None
    for line in report.splitlines():
        cells = line.split("|")
        if any(cell.strip() in TIMING_COLUMNS for cell in cells):
            columns = [i for i, cell in enumerate(cells) if cell.strip() in TIMING_COLUMNS]
        elif columns and line.startswith("|") and not line.startswith("|---"):
            cells = [("-" if i in columns else cell) for i, cell in enumerate(cells)]
        elif not line.startswith("|"):
            columns = None
        lines.append("|".join(cells))
    return "\n".join(lines)


def untimed(summary: dict) -> dict:
    """An evaluation summary without its timings (`wall_seconds`, `..._per_s`)."""
    return {k: v for k, v in summary.items() if not k.endswith(("_seconds", "_per_s"))}


@pytest.mark.slow
def test_report_after_recovery_equals_the_uninterrupted_run(slurm_run, local_run):
    slurm_dir = slurm_run["workdir"] / "results" / "ci"
    local_dir = local_run["workdir"] / "results" / "ci"
    report = (slurm_dir / "report.md").read_text()
    assert without_timing(report) == without_timing((local_dir / "report.md").read_text())
    assert without_timing(report) != report  # the timing columns were there
    for summary in sorted(local_dir.glob("eval/*/seed*/*.json")):
        relative = summary.relative_to(local_dir)
        cluster, local = (untimed(json.loads((d / relative).read_text())) for d in (slurm_dir, local_dir))
        assert cluster == local, relative
    timing = ["wall_time", "tokens_per_s"]
    for metrics in sorted(local_dir.glob("train/*/seed*/metrics.parquet")):
        local, cluster = (pd.read_parquet(d / metrics.relative_to(local_dir)) for d in (local_dir, slurm_dir))
        pd.testing.assert_frame_equal(cluster.drop(columns=timing), local.drop(columns=timing))


@pytest.mark.slow
def test_slurm_run_uploads_its_results(slurm_run):
    check_upload(slurm_run["workdir"] / "results" / "ci", slurm_run["uploaded"])


# ---- jobs that can never start -------------------------------------------------------


def preflight(workdir: Path, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "slurm_preflight.py"), "--profile", str(profile), "all"],
        cwd=workdir, env=environment(), capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
def test_preflight_names_the_jobs_slurm_can_never_start(slurm, tmp_path):
    workdir = copy_workflow(tmp_path)
    fits = preflight(workdir, ci_profile(workdir / "fits", slurm, ["config/ci.yaml"]))
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert "CANNOT START" not in fits.stdout and re.search(r"^ok\s+train: ", fits.stdout, re.M)
    profile = ci_profile(workdir / "too-big", slurm, ["config/ci.yaml"])
    settings = yaml.safe_load((profile / "config.yaml").read_text())
    settings["cores"] = settings["set-threads"]["eval"] = slurm["cpus"] + 1  # more CPUs than the node
    settings["set-resources"]["train"]["gpu"] = 5  # it has 4
    (profile / "config.yaml").write_text(yaml.safe_dump(settings))
    too_big = preflight(workdir, profile)
    assert too_big.returncode == 1, too_big.stdout + too_big.stderr
    impossible = re.findall(r"^CANNOT START\s+([\w, ]+): ", too_big.stdout, re.M)
    assert sorted(impossible) == ["eval", "train"], too_big.stdout


# ---- a training killed at its time limit, resubmitted and resumed ---------------------


def slurm_jobs_of(algo: str, seed: int) -> dict[str, str]:
    """{Slurm job id: state} of every training job of (algo, seed) Slurm still
    lists, finished ones included (squeue keeps them for MinJobAge, 300 s)."""
    lines = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %k %T"], capture_output=True,
                           text=True).stdout  # fmt: skip
    return {
        job: state
        for job, comment, state in (line.split() for line in lines.splitlines())
        if comment == f"rule_train_wildcards_ci_{algo}_{seed}"
    }


def time_limited_profile(workdir: Path, endpoint: str, node: dict) -> Path:
    """The CI profile running one long training (TIMED_BASELINE) as one process, whose
    first attempt may run FIRST_ATTEMPT_MINUTES and every later one 30 minutes
    (`attempt` is Snakemake's count of a job's tries, starting at 1)."""
    profile = prepare(workdir, endpoint, node)
    recipe = {"algorithm": "baseline-mtp", "train": TIMED_BASELINE}
    (workdir / "config" / "recipes" / "baseline-mtp-long.yaml").write_text(yaml.safe_dump(recipe))
    settings = yaml.safe_load((profile / "config.yaml").read_text())
    settings["set-threads"]["train"] = 1
    settings["set-resources"]["train"] |= {
        "gpu": 1, "runtime": f"{FIRST_ATTEMPT_MINUTES} if attempt == 1 else 30",
    }  # fmt: skip
    (profile / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    return profile


@pytest.fixture(scope="module")
def time_limited_run(slurm, s3, bucket, tmp_path_factory):
    """`snakemake --profile ci <the training's metrics>` with the first attempt's
    time limit at 1 minute. While it runs, the state of the training's files is
    recorded when Slurm reports the first job TIMEOUT (the log of that attempt,
    which the next one starts afresh, is kept)."""
    workdir = tmp_path_factory.mktemp("time-limited")
    profile = time_limited_profile(workdir, s3, slurm)
    algo, seed = TIME_LIMITED
    target = f"results/ci/train/{algo}/seed{seed}/metrics.parquet"
    train_dir = (workdir / target).parent
    rule_log = workdir / f"logs/ci/train/{algo}/seed{seed}.log"
    log = workdir / "run.log"
    earlier = set(slurm_jobs_of(algo, seed))  # other tests' jobs of that name on this Slurm
    began = time.monotonic()
    proc = start(workdir, ["--profile", str(profile), target], environment(), log)
    killed, jobs = None, {}
    while proc.poll() is None and time.monotonic() - began < 1800:
        jobs |= {job: state for job, state in slurm_jobs_of(algo, seed).items() if job not in earlier}
        timed_out = [job for job, state in jobs.items() if state == "TIMEOUT"]
        if timed_out and killed is None:
            killed = {
                "job": timed_out[0], "after_s": time.monotonic() - began,
                "model": (train_dir / "model").exists(), "metrics": (train_dir / "metrics.parquet").exists(),
                "checkpoint": (train_dir / "checkpoints" / "latest").exists(),
                "log": rule_log.read_text() if rule_log.exists() else "",
            }  # fmt: skip
        time.sleep(0.25)
    code, output = finish(proc, max(60, 1800 - (time.monotonic() - began)), log)
    jobs |= {job: state for job, state in slurm_jobs_of(algo, seed).items() if job not in earlier}
    when = f"after {killed['after_s']:.0f} s" if killed else "never"
    print(f"\ntime-limited training: {time.monotonic() - began:.0f} s in all, first job killed "
          f"{when}; load {os.getloadavg()}")  # fmt: skip
    return {"workdir": workdir, "returncode": code, "output": output, "killed": killed,
            "jobs": jobs, "log": rule_log.read_text(), "train_dir": train_dir}


@pytest.mark.slow
def test_a_training_killed_at_its_time_limit_is_resubmitted_and_resumed(time_limited_run):
    timed, (algo, _) = time_limited_run, TIME_LIMITED
    assert timed["returncode"] == 0, timed["output"][-4000:]
    killed = timed["killed"]
    assert killed, f"no attempt reached its time limit: make TIMED_BASELINE longer\n{timed['output'][-3000:]}"
    # Slurm killed the first attempt at its time limit, Snakemake submitted it again
    assert f"SLURM-job '{killed['job']}' failed, SLURM status is: 'TIMEOUT'" in timed["output"]
    assert re.search(r"^Trying to restart job \d+\.$", timed["output"], re.M)
    assert submissions(timed["output"])["train"] == 2
    assert sorted(timed["jobs"].values()) == ["COMPLETED", "TIMEOUT"]
    # the downloads ran on the submit host, only the training went through sbatch
    assert set(submissions(timed["output"])) == {"train"}
    for rule in ("download_model", "download_data"):
        assert re.search(rf"^localrule {rule}:", timed["output"], re.M)
    # the killed attempt left checkpoints but nothing that looks like a finished training
    assert killed["checkpoint"] and not killed["model"] and not killed["metrics"]
    # the first attempt started at step 0, the second at the first one's last checkpoint
    steps = TIMED_BASELINE["max_steps"]
    assert re.search(rf"train {algo}: +0%.*\| 0/{steps} ", killed["log"]), killed["log"][-2000:]
    assert "resuming" not in killed["log"]
    resumed = re.search(rf"resuming {algo} from step (\d+)", timed["log"])
    assert resumed, timed["log"][-3000:]
    step, every = int(resumed.group(1)), TIMED_BASELINE["checkpoint_every"]
    assert every <= step < steps and step % every == 0
    assert re.search(rf"train {algo}: +\d+%.*\| {step}/{steps} ", timed["log"])  # the bar starts there
    # every metric row once, the killed attempt's and the resumed one's
    metrics = pd.read_parquet(timed["train_dir"] / "metrics.parquet")
    every_row = TIMED_BASELINE["log_every"]
    assert list(metrics["step"]) == list(range(every_row, steps + 1, every_row))
    # one MLflow run for both attempts, its rows logged once each
    from mlflow import MlflowClient

    record = json.loads((timed["train_dir"] / "model" / "tracking.json").read_text())
    client = MlflowClient(record["tracking_uri"])
    experiment = client.get_experiment_by_name("wmtp/ci").experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [record["run_id"]]
    history = client.get_metric_history(record["run_id"], "train/loss")
    assert sorted(m.step for m in history) == list(metrics["step"])
    print(f"\nresubmission evidence: {killed['job']} TIMEOUT after {killed['after_s']:.0f} s; "
          f"{resumed.group(0)}; jobs {timed['jobs']}")  # fmt: skip


@pytest.mark.slow
def test_downloads_are_submitted_when_grouped(slurm, s3, bucket, tmp_path):
    """The documented override for sites whose submit host cannot run the downloads:
    `--groups download_data=download` makes the local rule a Slurm job again."""
    profile = prepare(tmp_path, s3, slurm)
    target = "results/ci/data/tiny-mbpp/test.parquet"
    args = ["--profile", str(profile), target, "--groups", "download_data=download"]
    result = run(tmp_path, args, environment(), "grouped", 600)
    assert result["returncode"] == 0, result["output"][-4000:]
    assert len(re.findall(r"submitted with SLURM jobid \d+", result["output"])) == 1
    assert not re.search(r"^localrule download_data:", result["output"], re.M)
    assert pd.read_parquet(tmp_path / target).shape[0] > 0
