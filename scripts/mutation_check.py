"""Mutation check: does the test suite fail when the code computes a wrong table?

Each FAULT is a deliberate bug of the kind that would silently corrupt the paper
table (one method trained with another's weights, a wrong normalise temperature,
a reference CE shifted by one token, a report cell from the wrong seed, ...). For
each one this script copies the repository's code and tests to a temporary
directory, applies the fault there by exact text replacement (it stops with an
error if the target text is not found exactly once, so a fault that no longer
applies after a refactor is noticed, not skipped), runs the tests relevant to that
fault against the copy (`pytest -x`, PYTHONPATH and cwd on the copy) and records
which test failed. A fault the suite lets through is a missing test.

    .venv/bin/python scripts/mutation_check.py                 # every fault, ~5 min on 2 idle cores
    .venv/bin/python scripts/mutation_check.py --only report-  # faults whose name starts so
    .venv/bin/python scripts/mutation_check.py --baseline      # first check the copy passes unmutated

Exit status 0 when every fault made a test fail, 1 otherwise (the table says which).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("wmtp", "tests", "config", "workflow_scripts", "pyproject.toml")


@dataclass(frozen=True)
class Fault:
    name: str
    why: str  # what the bug would do to the table
    path: str  # file inside the repository
    old: str  # exact text, present exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids / files, most specific first


FAULTS = (
    Fault(
        "trainer-baseline-weights",
        "the trainer hands every method the baseline's weights (rho1 and critic train as baseline-mtp)",
        "wmtp/stages/train.py",
        "    weights = make_weights(\n        t.recipe, batches,",
        "    weights = make_weights(\n"
        '        t.recipe.model_copy(update={"algorithm": "baseline-mtp"}), batches,',
        ("tests/stages/test_train.py::test_each_method_trains_with_its_formulas_weights",),
    ),
    Fault(
        "make-weights-rho1-as-baseline",
        "online rho1 builds the baseline's all-ones weights",
        "wmtp/stages/train.py",
        "weigh([replace(parts[0], ce_base=ce_head0.float())])[0]]",
        "weigh([replace(parts[0], ce_base=ce_head0.float())])[0] * 0 + parts[0].mask.float()]",
        ("tests/stages/test_train.py::test_make_weights_gives_the_formula",),
    ),
    Fault(
        "frozen-base-ignored",
        "rho1_base: frozen silently trains with the online CE",
        "wmtp/stages/train.py",
        'if recipe.weighting.rho1_base == "frozen":',
        'if recipe.weighting.rho1_base == "never":',
        ("tests/stages/test_train.py::test_each_method_trains_with_its_formulas_weights",),
    ),
    Fault(
        "registry-wrong-weight-function",
        "rho1-weighted trains with tokenskip's weights (its registry entry names another function)",
        "wmtp/config/registry.py",
        '            "rho1_weighted",\n',
        '            "rho1_tokenskip",\n',
        ("tests/core/test_weights.py::test_algorithm_weights_use_each_setting",),
    ),
    Fault(
        "step-weights-per-rank",
        "each rank normalises its own sequences: weights depend on the GPU count",
        "wmtp/core/step_weights.py",
        "    everyone = _gather(local)\n",
        "    everyone = [local]\n",
        ("tests/core/test_step_weights.py::test_two_and_four_processes_give_the_same_weights_as_one",),
    ),
    Fault(
        "step-weights-per-micro-batch",
        "each accumulation micro-batch normalised alone: weights depend on how the step is split",
        "wmtp/stages/train.py",
        "    return weigh(parts)\n",
        "    return [weigh([part])[0] for part in parts]\n",
        ("tests/stages/test_train.py::test_accumulated_micro_batches_share_the_steps_weights",),
    ),
    Fault(
        "shuffled-control-not-shuffled",
        "a shuffled control trains with its method's weights in place (the control shows no gap)",
        "wmtp/core/weights.py",
        "            out[b][mask[b]] = row[order.to(row.device)]\n",
        "            out[b][mask[b]] = row\n",
        ("tests/core/test_weights.py",),
    ),
    Fault(
        "normalise-temperature-1.5x",
        "weights flatter than the configured temperature",
        "wmtp/core/weights.py",
        "return ((s - s.mean()) / std if std > 0 else torch.zeros_like(s)) / temperature",
        "return ((s - s.mean()) / std if std > 0 else torch.zeros_like(s)) / (1.5 * temperature)",
        ("tests/core/test_weights.py",),
    ),
    Fault(
        "normalise-unbiased-std",
        "z-score with the sample (n-1) instead of the population std",
        "wmtp/core/weights.py",
        "std = s.std(unbiased=False)",
        "std = s.std(unbiased=True)",
        ("tests/core/test_weights.py",),
    ),
    Fault(
        "refce-lookup-off-by-one",
        "every token weighted with its neighbour's reference CE",
        "wmtp/stages/refce.py",
        "out[b, offset + 1 : end] = np.where(finite, values[sample_id], 0.0)",
        "out[b, offset : end - 1] = np.where(finite, values[sample_id], 0.0)",
        ("tests/stages/test_train.py::test_make_weights_gives_the_formula", "tests/stages/test_refce.py"),
    ),
    Fault(
        "loss-weight-of-wrong-target",
        "head k weights position t with w[t+k] instead of the weight of its target t+k+1",
        "wmtp/core/loss.py",
        "row_scale = self.weights[:, k + 1 :][valid_k]",
        "row_scale = self.weights[:, k : seq - 1][valid_k]",
        ("tests/core/test_loss.py",),
    ),
    Fault(
        "report-cell-from-one-seed",
        "a table cell from the first seed only instead of the seed average",
        "wmtp/stages/report.py",
        "grid = [[_per_problem(problems[(algo, s)], metric, t) for s in seeds] for t in temperatures]",
        "grid = [[_per_problem(problems[(algo, seeds[0])], metric, t) for s in seeds] for t in temperatures]",
        ("tests/stages/test_report.py",),
    ),
    Fault(
        "report-pass-at-k-n-c-swapped",
        "pass@k with the sample and pass counts swapped",
        "wmtp/stages/report.py",
        "evaluate.pass_at_k(int(ni), int(ci), k)",
        "evaluate.pass_at_k(int(ci), int(ni), k)",
        ("tests/stages/test_report.py",),
    ),
    Fault(
        "report-delta-against-first-row",
        "differences taken against the first row (base) instead of baseline-mtp",
        "wmtp/stages/report.py",
        "metric: _diff_cell(estimates[algo][metric], estimates[BASELINE][metric])",
        "metric: _diff_cell(estimates[algo][metric], estimates[algorithms[0]][metric])",
        ("tests/stages/test_report.py",),
    ),
    Fault(
        "report-seeds-not-resampled",
        "intervals resample problems only: every resample keeps each seed once",
        "wmtp/stages/intervals.py",
        "seeds = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))",
        "seeds = 0 * rng.integers(0, n_seeds, size=(n_resamples, n_seeds)) + np.arange(n_seeds)",
        ("tests/stages/test_intervals.py", "tests/stages/test_report.py"),
    ),
    Fault(
        "report-oracle-outside-resample",
        "the oracle temperature chosen once on the full data, not inside each resample",
        "wmtp/stages/intervals.py",
        "resampled = resamples.means(values).max(axis=0)  # (B,)",
        "resampled = resamples.means(values)[choice]  # (B,)",
        ("tests/stages/test_intervals.py",),
    ),
    Fault(
        "report-summary-check-blind",
        "a summary json contradicting its samples is rendered",
        "wmtp/stages/report.py",
        "if abs(float(claimed) - recomputed) > 1e-6:",
        "if abs(float(claimed) - recomputed) > 1.0:",
        ("tests/stages/test_report.py",),
    ),
    Fault(
        "hf-conversion-shares-storage",
        "training the converted model also changes the HF model it came from",
        "wmtp/core/checkpoints.py",
        "return tensor.detach() if owned else tensor.detach().clone()",
        "return tensor.detach()",
        ("tests/core/test_checkpoints.py",),
    ),
)


def copy_repository(dest: Path) -> None:
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, dest / name)


def mutated(fault: Fault, text: str) -> str:
    """`text` with the fault applied; stops when its target text is not there exactly once."""
    count = text.count(fault.old)
    if count != 1:
        raise SystemExit(
            f"fault {fault.name}: its target text occurs {count} times in {fault.path} (expected 1): "
            f"the code moved, update FAULTS in {Path(__file__).name}\n  target: {fault.old!r}"
        )
    return text.replace(fault.old, fault.new)


def apply(fault: Fault, root: Path) -> None:
    path = root / fault.path
    path.write_text(mutated(fault, path.read_text()))


def environment(root: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(root))
    # reuse the JIT-built DeepSpeed op of the real checkout (a fresh build takes minutes)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return env


def check_imports_the_copy(root: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import wmtp; print(wmtp.__file__)"],
        cwd=root, env=environment(root), capture_output=True, text=True, check=True,
    )  # fmt: skip
    if not Path(done.stdout.strip()).is_relative_to(root):
        raise SystemExit(f"the copy at {root} imports wmtp from {done.stdout.strip()}, not from itself")


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[int, list[str], str]:
    """pytest -x on `tests` in `root`: (exit code, failed/errored test ids, output tail)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *tests, "-x", "-q", "-rfE", "-p", "no:cacheprovider",
         "-W", "ignore::DeprecationWarning", "-W", "ignore::FutureWarning"],
        cwd=root, env=environment(root), capture_output=True, text=True,
    )  # fmt: skip
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, flags=re.MULTILINE)
    return done.returncode, failed, done.stdout[-3000:] + done.stderr[-2000:]


def check(fault: Fault) -> list[str]:
    """The tests that failed with `fault` applied (empty: the suite let it through)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{fault.name}-") as tmp:
        root = Path(tmp)
        copy_repository(root)
        apply(fault, root)
        check_imports_the_copy(root)
        code, failed, tail = run_tests(root, fault.tests)
    if code == 0:
        return []
    if code != 1 or not failed:  # 1 = tests failed; anything else is not a verdict on the fault
        raise SystemExit(f"fault {fault.name}: pytest exited {code} without a test verdict:\n{tail}")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the faults whose name starts with this")
    parser.add_argument("--baseline", action="store_true", help="first check the unmutated copy passes")
    args = parser.parse_args(argv)
    faults = [f for f in FAULTS if f.name.startswith(args.only)]
    if not faults:
        raise SystemExit(f"no fault name starts with {args.only!r}")
    for fault in FAULTS:  # every target is checked, also those of the faults not run
        mutated(fault, (REPO / fault.path).read_text())
    if args.baseline:
        with tempfile.TemporaryDirectory(prefix="mutant-none-") as tmp:
            copy_repository(Path(tmp))
            tests = tuple(dict.fromkeys(t for f in faults for t in f.tests))
            code, failed, tail = run_tests(Path(tmp), tests)
            if code != 0:
                raise SystemExit(f"the unmutated copy fails {failed}:\n{tail}")
    rows = []
    for fault in faults:
        print(f"{fault.name}: running {' '.join(fault.tests)}", file=sys.stderr, flush=True)
        rows.append((fault, check(fault)))
    print(f"{'fault':<32} {'caught by'}")
    for fault, failed in rows:
        print(f"{fault.name:<32} {', '.join(failed) if failed else 'NOT CAUGHT'}")
    missed = [fault.name for fault, failed in rows if not failed]
    print(f"{len(rows) - len(missed)} of {len(rows)} faults caught" + (f"; missed: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
