"""Check that Slurm can ever start every job the workflow would submit, before submitting.

A job asking for more CPUs, memory or GPUs than any node of its partition has (or for
a partition or GPU type the cluster does not have) is often accepted by sbatch and
then stays PENDING forever (Reason=PartitionConfig) while Snakemake keeps polling.
This script plans the workflow with a dry run of your own command, collects the
distinct Slurm requests of the jobs that would be submitted (partition, account,
CPUs, memory, GPUs, time), and asks Slurm about each with `sbatch --test-only`,
which answers at once and queues nothing:

    .venv/bin/python scripts/slurm_preflight.py --profile slurm all

It prints one line per request with the rules asking for it and Slurm's answer, and
exits with status 1 if any cannot start. The knobs are in the profile: `set-threads`
(CPUs), `set-resources` (mem_mb, gpu, gpu_model, slurm_partition, runtime),
`default-resources` (CPU rules), and `cores` (the most CPUs any job asks for).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

SNAKEMAKE = [str(Path(sys.executable).parent / "snakemake")]


def local_rules(workflow_dir: Path) -> set[str]:
    """Rules named in a `localrules:` block of the Snakefile or rules/*.smk: they run on
    the submit host (a dry run prints them like the others)."""
    names: set[str] = set()
    for path in [workflow_dir / "Snakefile", *sorted((workflow_dir / "rules").glob("*.smk"))]:
        if path.exists():
            for block in re.findall(r"^localrules:\n((?:[ \t]+\w+,?\n)+)", path.read_text(), re.M):
                names |= set(block.replace(",", " ").split())
    return names


def planned_requests(dry_run: str, local: set[str]) -> dict[tuple[str, ...], list[str]]:
    """{sbatch arguments: rules} of the jobs a dry run plans for Slurm (the `local`
    rules, which run on the submit host, are left out)."""
    requests: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for rule, block in re.findall(r"^rule (\w+):\n((?:    .*\n)+)", dry_run, flags=re.M):
        if rule in local:
            continue
        fields = dict(re.findall(r"^    (\w+): (.*)$", block, flags=re.M))
        args = sbatch_args(int(fields.get("threads", 1)), parse_resources(fields.get("resources", "")))
        if rule not in requests[args]:
            requests[args].append(rule)
    return dict(requests)


def parse_resources(text: str) -> dict[str, str]:
    """`mem_mb=4000, mem=4 GB, gpu=2` -> {"mem_mb": "4000", "mem": "4 GB", "gpu": "2"}."""
    return dict(item.split("=", 1) for item in text.split(", ") if "=" in item)


def sbatch_args(threads: int, resources: dict[str, str]) -> tuple[str, ...]:
    """The resource part of the sbatch call snakemake-executor-plugin-slurm makes for
    a job (its submit_string.py and set_gres_string)."""
    args = []
    for key, flag in (("slurm_partition", "--partition"), ("slurm_account", "--account"),
                      ("runtime", "--time"), ("constraint", "--constraint"), ("qos", "--qos"),
                      ("nodes", "--nodes")):
        if key in resources:
            args.append(f"{flag}={resources[key]}")
    if "mem_mb_per_cpu" in resources:
        args.append(f"--mem-per-cpu={resources['mem_mb_per_cpu']}")
    elif "mem_mb" in resources:
        args.append(f"--mem={resources['mem_mb']}")
    gpus = int(resources.get("gpu", 0))
    if gpus:
        model = resources.get("gpu_model")
        args.append(f"--gpus={model}:{gpus}" if model else f"--gpus={gpus}")
    elif "gres" in resources:
        args.append(f"--gres={resources['gres']}")
    else:
        args.append(f"--ntasks={resources.get('tasks', 1)}")
    args.append(f"--cpus-per-task={resources.get('cpus_per_task', threads)}")
    return tuple(args)


def test_only(args: tuple[str, ...]) -> tuple[bool, str]:
    """Slurm's own answer to whether a job with these arguments can ever start."""
    result = subprocess.run(
        ["sbatch", "--test-only", *args, "--wrap=true"], capture_output=True, text=True, timeout=60
    )
    answer = (result.stderr.strip() or result.stdout.strip()).splitlines()
    return result.returncode == 0, answer[-1] if answer else f"exit status {result.returncode}"


def main(argv: list[str]) -> int:
    if shutil.which("sbatch") is None:
        print("slurm_preflight: no sbatch on PATH: run it where you submit jobs", file=sys.stderr)
        return 2
    plan = subprocess.run(
        [*SNAKEMAKE, "--dry-run", *(argv or ["--profile", "slurm", "all"])],
        capture_output=True, text=True,
    )
    if plan.returncode != 0:
        print(plan.stdout[-3000:] + plan.stderr[-3000:], file=sys.stderr)
        return plan.returncode
    requests = planned_requests(plan.stdout, local_rules(Path.cwd()))
    impossible = 0
    for args, rules in sorted(requests.items(), key=lambda item: item[1]):
        ok, answer = test_only(args)
        impossible += not ok
        print(f"{'ok' if ok else 'CANNOT START':12} {', '.join(rules)}: {' '.join(args)}\n{'':13}{answer}")
    if impossible:
        print(
            f"{impossible} request(s) cannot start (Slurm's answers above): fix slurm_partition, "
            "slurm_account or gpu_model, or lower set-threads / set-resources (mem_mb, gpu, runtime)",
            file=sys.stderr,
        )
    return 1 if impossible else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
