"""Which settings a run really gets from the profiles.

Snakemake loads the workflow profile (profiles/default/) on every run and applies it
over `--profile slurm` key by key, so a key in both would silently replace the
cluster's value. These tests resolve the command lines as Snakemake's own parser
does (`snakemake.cli.parse_args`) and plan the paper run through the cluster
profile, comparing with what profiles/slurm/config.yaml says.
"""

from __future__ import annotations

import re

import pytest
import yaml
from snakemake.cli import parse_args

from tests.integration.test_workflow import REPO, planned_jobs, snakemake

WORKFLOW_PROFILE = yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text())
CLUSTER_PROFILE = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())


def local_rules() -> set[str]:
    """The rules the Snakefile's `localrules:` runs on the submit host."""
    listed = re.search(r"^localrules:\n((?:    \w+,\n)+)", (REPO / "Snakefile").read_text(), re.M)
    return set(listed.group(1).replace(",", " ").split())


@pytest.fixture
def resolve(monkeypatch):
    """The effective arguments of a `snakemake ...` command run from the repository root."""
    monkeypatch.chdir(REPO)
    return lambda *argv: parse_args(list(argv))[1]


def test_workflow_profile_shares_no_key_with_the_cluster_profile():
    assert not set(WORKFLOW_PROFILE) & set(CLUSTER_PROFILE)
    assert (REPO / "slurm").resolve() == REPO / "profiles" / "slurm"


def test_profile_slurm_resolves_to_the_cluster_profile(resolve):
    args = resolve("--profile", "slurm", "-n", "all")
    assert args.executor == "slurm"
    assert args.keep_going is CLUSTER_PROFILE["keep-going"] is True
    assert args.latency_wait == CLUSTER_PROFILE["latency-wait"]
    assert args.cores == CLUSTER_PROFILE["cores"]
    assert args.jobs == CLUSTER_PROFILE["jobs"]
    threads = {rule: resource.value for rule, resource in args.set_threads.items()}
    assert threads == CLUSTER_PROFILE["set-threads"]
    assert [str(path) for path in args.configfile] == CLUSTER_PROFILE["configfile"]
    # trainings, and only they, are resubmitted after a time-limit kill (they resume)
    assert args.preemptible_rules == {"train"} and args.preemptible_retries >= 1
    assert args.retries == 0
    # and the workflow profile's own keys still apply
    assert args.rerun_incomplete is True and args.printshellcmds is True


def test_tiny_default_keeps_its_own_settings(resolve):
    args = resolve("--cores", "all", "all")
    assert args.executor is None  # local
    assert args.keep_going is False and args.latency_wait == 5
    assert args.set_threads == {} and args.configfile in (None, [])
    assert {trigger.name.lower() for trigger in args.rerun_triggers} == set(
        WORKFLOW_PROFILE["rerun-triggers"]
    )


def job_blocks(output: str) -> list[tuple[str, dict[str, str]]]:
    """(`rule name`, {field: value}) of every job printed by a dry run."""
    blocks = re.findall(r"^((?:local)?rule \w+):\n((?:    .*\n)+)", output, flags=re.M)
    return [(head, dict(re.findall(r"^    (\w+): (.*)$", body, flags=re.M))) for head, body in blocks]


def test_cluster_dry_run_asks_slurm_for_the_profiles_resources():
    """`snakemake --profile slurm -n all` on the paper config: every rule that is not
    local goes to Slurm with the profile's threads (capped by `cores`) and resources."""
    result = snakemake(REPO, "--profile", "slurm", "-n", "all", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    blocks = job_blocks(result.stdout)
    assert len(blocks) == sum(planned_jobs(result.stdout).values())
    local = local_rules()
    # the network's rules run on the submit host: compute nodes often have no internet
    assert {"all", "download_model", "download_data", "publish_report", "upload_results"} <= local
    cap = CLUSTER_PROFILE["cores"]
    for head, fields in blocks:
        rule = head.split()[1]
        if rule in local:
            continue
        threads = int(fields.get("threads", 1))
        assert threads == min(CLUSTER_PROFILE["set-threads"].get(rule, 1), cap), (rule, threads)
        resources = dict(item.split("=", 1) for item in fields["resources"].split(", "))
        # where a job goes comes from default-resources (rules declare only sizes)
        defaults = CLUSTER_PROFILE["default-resources"]
        wanted = {key: defaults[key] for key in ("slurm_partition", "slurm_account")}
        wanted |= CLUSTER_PROFILE["set-resources"].get(rule, {})
        for key, value in wanted.items():
            assert resources[key] == str(value), (rule, key, resources[key], value)
    trainings = [fields for head, fields in blocks if head == "rule train"]
    assert trainings and all("gpu=4" in f["resources"] and "gpu_model=a100" in f["resources"] for f in trainings)
    # all of a training's GPUs on one node: torchrun --standalone does not leave it
    assert all(", nodes=1," in f"{f['resources']}," for f in trainings)
