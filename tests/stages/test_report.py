"""Report: metric math on hand-checkable cases, and rendering from fixture results."""

from __future__ import annotations

import json
import re
import zlib
from math import comb
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from yaml import safe_dump as yaml_dump

from wmtp.config.schema import load_config
from wmtp.stages import report

REPO = Path(__file__).resolve().parents[2]
ALGOS = ["base", "ntp", "baseline-mtp", "critic-wmtp", "rho1-weighted", "rho1-tokenskip"]
TRAINED = [a for a in ALGOS if a != "base"]
SEEDS = [0, 1]
BENCHES = ["tiny-mbpp", "humaneval"]
N = 10
P = 30
KS = {"tiny-mbpp": [1, 5], "humaneval": [1]}
# success probability per algorithm: rho1-weighted clearly better, tokenskip clearly worse
RATE = {"base": 0.2, "ntp": 0.38, "baseline-mtp": 0.4, "critic-wmtp": 0.42, "rho1-weighted": 0.8,
        "rho1-tokenskip": 0.1}


# ---------------------------------------------------------------- pure math


def test_pass_at_k_matches_binomial_formula():
    n = np.array([10, 10, 10, 5, 5])
    c = np.array([0, 1, 10, 2, 4])
    for k in (1, 2, 5):
        expected = [1 - comb(ni - ci, k) / comb(ni, k) for ni, ci in zip(n, c, strict=True)]
        assert np.allclose(report.pass_at_k(n, c, k), expected)
    assert np.allclose(report.pass_at_k(n, c, 1), c / n)


def test_pass_at_k_rejects_too_few_samples():
    with pytest.raises(ValueError, match="undefined"):
        report.pass_at_k(np.array([3]), np.array([1]), 5)


# ---------------------------------------------------------------- fixtures


def _write_results(root: Path) -> dict[str, list[Path]]:
    """Eval json/jsonl for 4 algorithms x 2 seeds x 2 benchmarks and metrics.parquet
    per run, from a seeded generator (so the test knows the truth)."""
    rng = np.random.default_rng(0)
    files = {"jsons": [], "jsonls": [], "parquets": []}
    for algo in ALGOS:
        for seed in SEEDS:
            run = root / "eval" / algo / f"seed{seed}"
            run.mkdir(parents=True)
            for bench in BENCHES:
                c = rng.binomial(N, RATE[algo], size=P)
                lines = [
                    {"task_id": f"{bench}/{i}", "n": N, "c": int(ci),
                     "statuses": ["passed"] * int(ci) + ["failed"] * int(N - ci),
                     "exact": int(ci) // 2}
                    for i, ci in enumerate(c)
                ]
                rng.shuffle(lines)  # order in the file must not matter
                (run / f"{bench}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
                summary = {"benchmark": bench, "n_samples": N, "exact_match": float(np.mean(c // 2) / N), **{
                    f"pass@{k}": float(np.mean([1 - comb(N - ci, k) / comb(N, k) for ci in c])) for k in KS[bench]}}
                (run / f"{bench}.json").write_text(json.dumps(summary))
                files["jsonls"].append(run / f"{bench}.jsonl")
                files["jsons"].append(run / f"{bench}.json")
            if algo == "base":
                continue  # evaluated, never trained: no metrics
            train = root / "train" / algo / f"seed{seed}"
            train.mkdir(parents=True)
            steps = np.arange(0, 50, 5)
            skip = 0.3 if algo == "rho1-tokenskip" else 0.0
            pd.DataFrame({
                "step": steps,
                "train_loss": 3.0 * np.exp(-steps / 30) + 0.01 * seed,
                "tokens": (steps + 5) * 1000,
                "wall_time": (steps + 5) * (2.0 if algo == "critic-wmtp" else 1.0),
                "weight_mean": np.ones(len(steps)),
                "weight_std": np.full(len(steps), 0.0 if algo == "baseline-mtp" else 0.5),
                "weight_min": np.full(len(steps), 1.0 - (algo != "baseline-mtp")),
                "weight_max": np.full(len(steps), 1.0 + 2 * (algo != "baseline-mtp")),
                "weight_frac_zero": np.full(len(steps), skip),
                "val_loss": np.where(steps % 20 == 0, 2.5 - steps / 100, np.nan),
                "val_head_ce_0": np.where(steps % 20 == 0, 2.0 - steps / 100, np.nan),
            }).to_parquet(train / "metrics.parquet")
            files["parquets"].append(train / "metrics.parquet")
    return files


def _config_data(bootstrap: int = 300) -> dict:
    return {
        "run": "fixture",
        "seeds": SEEDS,
        "algorithms": ALGOS,
        "benchmarks": BENCHES,
        "recipes": {a: f"config/recipes/{a}.yaml" for a in TRAINED},
        "models": {"base": {"source": "tiny", "id": "base"}, "ref": {"source": "tiny", "id": "ref"}},
        "data": {"train_dataset": "tiny-mbpp", "max_seq_len": 512},
        "train": {"epochs": 3, "micro_batch_size": 8, "grad_accum_steps": 1, "lr": 1e-4, "warmup_steps": 10},
        "eval": {"n_samples": N, "ks": KS},
        "report": {"bootstrap_samples": bootstrap},
    }


def _config(bootstrap: int = 300, recipes: dict | None = None):
    data = _config_data(bootstrap)
    data["recipes"].update(recipes or {})
    return load_config(data, REPO)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    files = _write_results(root)
    config, recipes = _config()
    out = report.build_report(files["jsons"], files["jsonls"], files["parquets"], config, recipes,
                              root / "report.md", root / "figures", git_commit="abc123")
    return root, out.read_text(), config, recipes


def _row(text: str, heading: str, label: str) -> list[str]:
    """Cells of the first table row starting with `| label |` after `heading`."""
    section = text[text.index(heading):]
    line = next(ln for ln in section.splitlines() if ln.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def _numbers(cell: str) -> tuple[float, float, float]:
    mean, low, high = (float(x) for x in re.findall(r"[-+]?\d+\.\d", cell))
    return mean, low, high


def _direct(root: Path, algo: str, bench: str, k: int) -> float:
    """pass@k straight from the fixture files: per problem, mean over seeds, mean over problems."""
    per_seed = []
    for seed in SEEDS:
        rows = [json.loads(x) for x in (root / "eval" / algo / f"seed{seed}" / f"{bench}.jsonl").read_text().splitlines()]
        rows.sort(key=lambda r: r["task_id"])
        per_seed.append([1 - comb(r["n"] - r["c"], k) / comb(r["n"], k) for r in rows])
    return float(np.mean(per_seed))


def test_table_has_rows_and_columns(rendered):
    _, text, _, _ = rendered
    for bench, metrics in {"tiny-mbpp": ["pass@1", "pass@5"], "humaneval": ["pass@1"]}.items():
        header = text[text.index(f"### {bench}"):].splitlines()[2]
        assert header == "| algorithm |" + "".join(f" {m} |" for m in [*metrics, "exact_match"])
        for algo in ALGOS:
            assert len(_row(text, f"### {bench}", algo)) == len(metrics) + 1
    assert "`abc123`" in text
    assert report.config_hash(*rendered[2:]) in text


# ---------------------------------------------------------------- the table against the eval files
# Every cell and every difference recomputed from the per-problem jsonl files with
# nothing from wmtp.stages.report: math.comb for pass@k, numpy for the bootstrap. Shared with
# the end-to-end workflow test (`assert_report_matches_eval_files`).


def _load_runs(eval_root: Path, algorithms, seeds, bench) -> dict[tuple[str, int], list[dict]]:
    runs = {}
    for algo in algorithms:
        for seed in seeds:
            path = eval_root / algo / f"seed{seed}" / f"{bench}.jsonl"
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            runs[(algo, seed)] = sorted(records, key=lambda r: str(r["task_id"]))  # the report's problem order
    return runs


def _per_problem_values(records: list[dict], metric: str) -> np.ndarray | None:
    if metric == "exact_match":
        return None if "exact" not in records[0] else np.array([r["exact"] / r["n"] for r in records])
    k = int(metric.split("@")[1])
    return np.array([1 - comb(r["n"] - r["c"], k) / comb(r["n"], k) for r in records])


def _interval(grid: np.ndarray, seed_idx: np.ndarray, problem_idx: np.ndarray) -> tuple[float, float, float]:
    """Mean of a (S, P) grid and the 95% percentile interval of its means over the
    resampled (seeds, problems) sub-grids, by plain indexing."""
    means = [grid[s_idx][:, p_idx].mean() for s_idx, p_idx in zip(seed_idx, problem_idx, strict=True)]
    return float(grid.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def expected_table(eval_root: Path, algorithms, seeds, bench: str, ks, n_resamples: int) -> dict:
    """{"cells": {algo: {metric: (mean, low, high) | None}}, "diffs": {algo: {metric:
    (diff, low, high, excludes_zero) | None}}} in fractions, from the eval files:
    seeds and problems resampled with replacement (seeds first, from the benchmark's
    crc32-seeded generator), the same draws for every row."""
    runs = _load_runs(eval_root, algorithms, seeds, bench)
    metrics = [f"pass@{k}" for k in ks] + ["exact_match"]
    n_problems = len(runs[(algorithms[0], seeds[0])])
    rng = np.random.default_rng(zlib.crc32(bench.encode()))
    seed_idx = rng.integers(0, len(seeds), (n_resamples, len(seeds)))
    problem_idx = rng.integers(0, n_problems, (n_resamples, n_problems))
    grids = {}
    for algo in algorithms:
        for metric in metrics:
            per_seed = [_per_problem_values(runs[(algo, seed)], metric) for seed in seeds]
            grids[(algo, metric)] = None if per_seed[0] is None else np.array(per_seed)
    out = {"cells": {}, "diffs": {}}
    for algo in algorithms:
        out["cells"][algo] = {
            m: None if grids[(algo, m)] is None else _interval(grids[(algo, m)], seed_idx, problem_idx)
            for m in metrics
        }
        if algo == "baseline-mtp":
            continue
        out["diffs"][algo] = {}
        for m in metrics:
            if grids[(algo, m)] is None:
                out["diffs"][algo][m] = None
                continue
            diff, low, high = _interval(grids[(algo, m)] - grids[("baseline-mtp", m)], seed_idx, problem_idx)
            out["diffs"][algo][m] = (diff, low, high, low > 0 or high < 0)
    return out


def _report_rows(text: str, bench: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The (cells, differences) table rows of one benchmark's section, by algorithm."""
    section = text[text.index(f"### {bench} ("):]
    section = section[: section.index("\n### ")]
    cells_part, _, diffs_part = section.partition("Difference to")

    def rows(part: str) -> dict[str, list[str]]:
        """The rows of the first table in `part` (it ends at the first non-table line)."""
        lines = part[part.index("| algorithm"):].splitlines()
        table = lines[: next((i for i, ln in enumerate(lines) if not ln.startswith("|")), len(lines))]
        return {
            cells[0]: cells[1:]
            for line in table
            if line.startswith("| ") and not line.startswith("| algorithm")
            for cells in [[c.strip() for c in line.strip().strip("|").split("|")]]
        }

    return rows(cells_part), rows(diffs_part)


def assert_report_matches_eval_files(text: str, eval_root: Path, algorithms, seeds, ks_by_bench, n_resamples):
    """Every table cell and every difference of `text` equals (to the printed 0.1 %)
    the number recomputed from `eval_root/{algo}/seed{s}/{bench}.jsonl`."""
    for bench, ks in ks_by_bench.items():
        expected = expected_table(eval_root, algorithms, seeds, bench, ks, n_resamples)
        cells, diffs = _report_rows(text, bench)
        assert sorted(cells) == sorted(algorithms), bench
        assert sorted(diffs) == sorted(a for a in algorithms if a != "baseline-mtp"), bench
        metrics = [f"pass@{k}" for k in ks] + ["exact_match"]
        for algo in algorithms:
            for col, metric in enumerate(metrics):
                where = f"{bench} {algo} {metric}"
                want = expected["cells"][algo][metric]
                if want is None:
                    assert cells[algo][col] == "n/a", where
                else:
                    assert _numbers(cells[algo][col]) == pytest.approx([100 * x for x in want], abs=0.051), where
                if algo == "baseline-mtp":
                    continue
                want = expected["diffs"][algo][metric]
                if want is None:
                    assert diffs[algo][col] == "n/a", where
                    continue
                assert _numbers(diffs[algo][col]) == pytest.approx([100 * x for x in want[:3]], abs=0.051), where
                assert ("(excludes 0)" in diffs[algo][col]) == want[3], where


def test_every_cell_and_difference_matches_the_eval_files(rendered):
    root, text, config, _ = rendered
    ks = {"tiny-mbpp": [1, 5], "humaneval": [1]}
    assert_report_matches_eval_files(text, root / "eval", ALGOS, SEEDS, ks, config.report.bootstrap_samples)
    # the fixture's rows really differ, so a row holding another algorithm's numbers fails
    assert len({_row(text, "### tiny-mbpp", algo)[0] for algo in ALGOS}) == len(ALGOS)


def test_a_cell_moved_by_one_tenth_is_noticed(rendered):
    """The comparison is as tight as the printed precision: a report off by 0.1 fails it."""
    root, text, config, _ = rendered
    cell = _row(text, "### humaneval", "ntp")[0]
    mean = _numbers(cell)[0]
    wrong = text.replace(f"| ntp | {cell} |", f"| ntp | {mean + 0.1:.1f}{cell[len(f'{mean:.1f}'):]} |", 1)
    assert wrong != text
    with pytest.raises(AssertionError, match="humaneval ntp pass@1"):
        assert_report_matches_eval_files(wrong, root / "eval", ALGOS, SEEDS, {"humaneval": [1]},
                                         config.report.bootstrap_samples)


def test_difference_sign_and_exclusion(rendered):
    _, text, _, _ = rendered
    heading = "### tiny-mbpp"
    better = _row(text[text.index(heading):], "Difference to", "rho1-weighted")[0]
    worse = _row(text[text.index(heading):], "Difference to", "rho1-tokenskip")[0]
    assert _numbers(better)[0] > 0 and "(excludes 0)" in better
    assert _numbers(worse)[0] < 0 and "(excludes 0)" in worse
    assert "| baseline-mtp |" not in text[text.index("Difference to"):text.index("### humaneval")]


def test_cost_and_weight_tables(rendered):
    _, text, _, _ = rendered
    steps, tokens, wall, rate = _row(text, "## Training cost", "critic-wmtp")
    assert (steps, tokens, wall, rate) == ("45", "50,000", "100.0", "500.0")
    stats = _row(text, "## Token weights", "rho1-tokenskip")
    assert stats == ["1.000", "0.500", "0.000", "3.000", "0.300"]


def test_published_figures_are_quoted_beside_the_table(rendered):
    _, text, _, _ = rendered
    block = text[text.index("### Published figures (quoted)"):]
    assert "arXiv:2404.19737" in block and "oracle" in block
    assert _row(block, "### Published", "7B_1T_4 (n = 4 heads, the released base)") == [
        "43.1", "65.9", "83.7", "31.6", "57.3", "86.2"]
    assert _row(block, "### Published", "7B_1T_1 (next-token)") == [
        "40.7", "65.4", "83.4", "31.7", "57.6", "83.0"]


def test_base_and_ntp_are_rows_with_differences_but_only_trained_rows_cost(rendered):
    _, text, _, _ = rendered
    diffs = text[text.index("Difference to"):text.index("### humaneval")]
    assert "| base |" in diffs and "| ntp |" in diffs
    assert _numbers(_row(diffs, "Difference to", "base")[0])[0] < 0  # 0.2 vs 0.4
    cost = text[text.index("## Training cost"):text.index("## Token weights")]
    assert "| ntp |" in cost and "| base |" not in cost


def test_recipe_overrides_are_listed_under_the_table(tmp_path):
    files = _write_results(tmp_path)
    recipe = tmp_path / "rho1-tokenskip.yaml"
    recipe.write_text("algorithm: rho1-tokenskip\ntrain: {lr: 0.5}\nweighting: {skip_ratio: 0.5}\n")
    config, recipes = _config(bootstrap=10, recipes={"rho1-tokenskip": str(recipe)})
    out = report.build_report(files["jsons"], files["jsonls"], files["parquets"], config, recipes,
                              tmp_path / "r.md", tmp_path / "f")
    text = out.read_text()
    assert _row(text, "Per-method settings", "rho1-tokenskip") == ["`train.lr`", "0.5"]
    lines = [ln for ln in text.splitlines() if ln.startswith("| rho1-tokenskip | `")]
    assert lines == ["| rho1-tokenskip | `train.lr` | 0.5 |", "| rho1-tokenskip | `weighting.skip_ratio` | 0.5 |"]


def test_shipped_recipes_override_only_the_critics_strength(rendered):
    _, text, _, _ = rendered
    rows = [ln for ln in text.splitlines() if re.match(r"^\| [\w-]+ \| `(train|weighting)\.", ln)]
    assert rows == ["| critic-wmtp | `weighting.strength` | auto |"]


def test_figures_are_valid_deterministic_pngs(rendered, tmp_path):
    root, text, config, recipes = rendered
    names = ["loss_curves.png", "weights.png", "pass_at_k.png"]
    for name in names:
        data = (root / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
        assert f"](figures/{name})" in text
    files = {k: sorted(v) for k, v in {
        "jsons": (root / "eval").rglob("*.json"), "jsonls": (root / "eval").rglob("*.jsonl"),
        "parquets": (root / "train").rglob("*.parquet")}.items()}
    again = report.build_report(files["jsons"], files["jsonls"], files["parquets"], config, recipes,
                                tmp_path / "report.md", tmp_path / "figures", git_commit="abc123")
    assert again.read_text() == text
    for name in names:
        assert (tmp_path / "figures" / name).read_bytes() == (root / "figures" / name).read_bytes()


def test_missing_results_are_named(tmp_path):
    files = _write_results(tmp_path)
    config, recipes = _config(bootstrap=10)
    jsonls = [p for p in files["jsonls"] if "rho1-weighted/seed1/humaneval" not in p.as_posix()]
    with pytest.raises(ValueError, match="rho1-weighted/seed1/humaneval"):
        report.build_report(files["jsons"], jsonls, files["parquets"], config, recipes,
                            tmp_path / "r.md", tmp_path / "f")


def test_different_problem_sets_are_rejected(tmp_path):
    files = _write_results(tmp_path)
    path = tmp_path / "eval" / "critic-wmtp" / "seed0" / "humaneval.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    config, recipes = _config(bootstrap=10)
    with pytest.raises(ValueError, match="different problem set"):
        report.build_report(files["jsons"], files["jsonls"], files["parquets"], config, recipes,
                            tmp_path / "r.md", tmp_path / "f")


def _build(files, root: Path, config, recipes) -> str:
    return report.build_report(files["jsons"], files["jsonls"], files["parquets"], config, recipes,
                               root / "r.md", root / "f").read_text()


def test_summary_disagreeing_with_its_records_is_refused(tmp_path):
    """A summary saying pass@1 = 1.2 % whose samples say far more."""
    files = _write_results(tmp_path)
    config, recipes = _config(bootstrap=10)
    summary_path = tmp_path / "eval" / "rho1-weighted" / "seed1" / "tiny-mbpp.json"
    records = [json.loads(x) for x in summary_path.with_suffix(".jsonl").read_text().splitlines()]
    truth = np.mean([r["c"] / r["n"] for r in records])
    assert truth > 0.6
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "pass@1": 0.012}))
    with pytest.raises(ValueError) as error:
        _build(files, tmp_path, config, recipes)
    message = str(error.value)
    assert str(summary_path) in message and "pass@1" in message
    assert "0.012" in message and f"{truth:.6g}" in message


@pytest.mark.parametrize("key", ["pass@5", "exact_match"])
def test_every_summary_number_is_checked(tmp_path, key):
    files = _write_results(tmp_path)
    config, recipes = _config(bootstrap=10)
    summary_path = tmp_path / "eval" / "base" / "seed0" / "tiny-mbpp.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({"metrics": {**summary, key: summary[key] + 0.01}}))
    with pytest.raises(ValueError, match=f"{re.escape(str(summary_path))}: {key} = "):
        _build(files, tmp_path, config, recipes)
    summary_path.write_text(json.dumps({"metrics": summary}))  # under `metrics:` and right: accepted
    assert "| base |" in _build(files, tmp_path, config, recipes)


def test_per_temperature_summary_is_checked_against_its_records(tmp_path):
    files = _write_results(tmp_path)
    config, recipes = _config(bootstrap=10)
    jsonl = tmp_path / "eval" / "ntp" / "seed0" / "humaneval.jsonl"
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    jsonl.write_text("".join(json.dumps({**x, "by_temperature": {"0.2": {"n": N, "c": 3}}}) + "\n" for x in lines))
    summary_path = jsonl.with_suffix(".json")
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "by_temperature": {"0.2": {"pass@1": 0.3}}}))
    assert "| ntp |" in _build(files, tmp_path, config, recipes)
    summary_path.write_text(json.dumps({**summary, "by_temperature": {"0.2": {"pass@1": 0.4}}}))
    with pytest.raises(ValueError, match=r"pass@1 at T = 0.2 = 0.4 in the summary but 0.3 recomputed"):
        _build(files, tmp_path, config, recipes)


def run_workflow_script(name: str, monkeypatch, wildcards: dict | None = None, **fields):
    """Run workflow_scripts/<name> as Snakemake's `script:` would, with a stand-in
    `snakemake` object; stderr is restored afterwards."""
    import runpy
    import sys
    from types import SimpleNamespace

    from snakemake.iocontainers import Namedlist

    monkeypatch.setattr(sys, "stderr", sys.stderr)
    parts = {k: Namedlist(fromdict=v) if isinstance(v, dict) else Namedlist(v) for k, v in fields.items()
             if k in ("input", "output", "params", "log")}
    smk = SimpleNamespace(**parts, config=fields.get("config", {}), threads=1,
                          wildcards=Namedlist(fromdict=wildcards or {}))
    runpy.run_path(str(REPO / "workflow_scripts" / name), init_globals={"snakemake": smk})


def test_report_workflow_script(tmp_path, monkeypatch):
    files = _write_results(tmp_path)
    config, recipes = _config(bootstrap=50)
    monkeypatch.chdir(REPO)  # recipe paths are relative to the repository root
    run_workflow_script(
        "report.py", monkeypatch,
        input={"evals": [str(p) for p in files["jsons"]], "samples": [str(p) for p in files["jsonls"]],
               "metrics": [str(p) for p in files["parquets"]]},
        output={"report": str(tmp_path / "report.md"), "table": str(tmp_path / "table.csv"),
                "figures": str(tmp_path / "figures")},
        params={"settings": {"report": config.report.model_dump(mode="json"),
                             "config_hash": report.config_hash(config, recipes)}},
        log=[str(tmp_path / "report.log")],
        config=config.model_dump(mode="json"),
    )
    text = (tmp_path / "report.md").read_text()
    assert f"config hash: `{report.config_hash(config, recipes)}`" in text
    assert re.search(r"git commit: `[0-9a-f]{40}(-dirty)?`", text)  # HEAD moves as others commit
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "loss_curves.png", "pass_at_k.png", "weights.png"]
    assert "report written to" in (tmp_path / "report.log").read_text()


def test_oracle_temperature_picks_the_best_per_row_and_k_and_is_marked(tmp_path):
    """eval.oracle_temperatures: each pass@k cell is the row's best temperature on the
    test scores (the paper's protocol), computed from the by_temperature records."""
    files = _write_results(tmp_path)
    # every problem: at T=0.2 a pass rate that beats pass@1 at 0.8 for base only,
    # at T=1.0 one that beats pass@5 for every row (more diverse samples)
    for path in files["jsonls"]:
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        for line in lines:
            line["by_temperature"] = {
                "0.8": {"n": line["n"], "c": line["c"]},
                "0.2": {"n": N, "c": 9 if "/base/" in path.as_posix() else 0},
                "1.0": {"n": N, "c": 1},
            }
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    data_eval = {"n_samples": N, "ks": {"tiny-mbpp": [1, 5], "humaneval": [1]},
                 "oracle_temperatures": [0.2, 1.0]}
    config, recipes = _config(bootstrap=10)
    config = config.model_copy(update={"eval": config.eval.model_validate(
        {**config.eval.model_dump(), **data_eval})})
    text = report.build_report(files["jsons"], files["jsonls"], files["parquets"], config, recipes,
                               tmp_path / "r.md", tmp_path / "f").read_text()
    base = _row(text, "### tiny-mbpp", "base")
    assert base[0].endswith("(oracle T = 0.2)")
    assert _numbers(base[0].split(" (oracle")[0])[0] == pytest.approx(90.0)
    best = _row(text, "### tiny-mbpp", "rho1-weighted")  # 0.8 rate at T=0.8 beats 0.1 at 1.0
    assert best[0].endswith("(oracle T = 0.8)")
    assert "oracle, the paper's protocol" in text


def test_without_oracle_no_cell_is_marked(rendered):
    _, text, _, _ = rendered
    assert "(oracle T =" not in text and "for every k" in text


# ---------------------------------------------------------------- table.csv, seeds, the report command


def test_table_csv_holds_the_tables_cells_as_fractions(rendered):
    root, text, _, _ = rendered
    table = pd.read_csv(root / "table.csv")
    assert list(table.columns) == list(report.TABLE_COLUMNS)
    assert set(table["algorithm"]) == set(ALGOS) and set(table["benchmark"]) == set(BENCHES)
    assert table[["value", "low", "high"]].stack().between(0, 1).all()
    baseline = table[table["algorithm"] == "baseline-mtp"]
    assert baseline[["delta", "delta_low", "delta_high"]].isna().all().all()
    row = table[(table["benchmark"] == "humaneval") & (table["algorithm"] == "rho1-weighted")].iloc[0]
    assert row["metric"] == "pass@1"
    cells, diffs = _report_rows(text, "humaneval")
    assert _numbers(cells["rho1-weighted"][0]) == pytest.approx(100 * row[["value", "low", "high"]], abs=0.051)
    assert _numbers(diffs["rho1-weighted"][0]) == pytest.approx(
        100 * row[["delta", "delta_low", "delta_high"]], abs=0.051)


def _write_effects(root: Path, effects_pp: dict[str, dict[int, float]], problems: int = 400) -> tuple[list, list]:
    """Evaluation files of baseline-mtp and the rows of `effects_pp` over 3 seeds:
    row a's effect in seed s is effects_pp[a][s] points of success probability over
    baseline-mtp (10 samples per problem)."""
    rng = np.random.default_rng(7)
    difficulty = rng.uniform(0.1, 0.7, size=problems)
    jsons, jsonls = [], []
    seeds = next(iter(effects_pp.values())).keys()
    for algo, effects in {"baseline-mtp": dict.fromkeys(seeds, 0.0), **effects_pp}.items():
        for seed, effect in effects.items():
            c = rng.binomial(10, np.clip(difficulty + effect / 100, 0, 1))
            run = root / "eval" / algo / f"seed{seed}"
            run.mkdir(parents=True)
            records = [{"task_id": f"t/{i:03d}", "n": 10, "c": int(x)} for i, x in enumerate(c)]
            (run / "tiny-mbpp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            (run / "tiny-mbpp.json").write_text(json.dumps({"pass@1": float(np.mean(c / 10))}))
            jsons.append(run / "tiny-mbpp.json")
            jsonls.append(run / "tiny-mbpp.jsonl")
    return jsons, jsonls


def _effect_config(rows: tuple[str, ...] = ("rho1-weighted",)):
    algorithms = ["baseline-mtp", *rows]
    data = {
        "run": "effects", "seeds": [0, 1, 2], "algorithms": algorithms,
        "benchmarks": ["tiny-mbpp"],
        "recipes": {a: f"config/recipes/{a}.yaml" for a in algorithms},
        "models": {"base": {"source": "tiny", "id": "base"}, "ref": {"source": "tiny", "id": "ref"}},
        "data": {"train_dataset": "tiny-mbpp", "max_seq_len": 512},
        "train": {"epochs": 3, "micro_batch_size": 8, "grad_accum_steps": 1, "lr": 1e-4, "warmup_steps": 10},
        "eval": {"n_samples": 10, "ks": {"tiny-mbpp": [1]}},
        "report": {"bootstrap_samples": 1000},
    }
    return load_config(data, REPO)


@pytest.mark.parametrize(
    ("effects", "excludes"),
    [({0: 10, 1: -8, 2: 7}, False), ({0: -6, 1: 9, 2: -4}, False), ({0: 4, 1: 3, 2: 5}, True)],
    ids=["flips-with-seed", "flips-other-way", "consistent"],
)
def test_intervals_cover_the_variation_between_seeds(tmp_path, effects, excludes):
    """A method whose effect changes sign with the seed is not called a sure effect;
    one a few points up in every seed is. Per-seed Δs are printed."""
    jsons, jsonls = _write_effects(tmp_path, {"rho1-weighted": effects})
    config, recipes = _effect_config()
    out = report.build_report(jsons, jsonls, [], config, recipes, tmp_path / "report.md", tmp_path / "f",
                              metrics_required=False)
    text = out.read_text()
    row = pd.read_csv(tmp_path / "table.csv").set_index("algorithm").loc["rho1-weighted"]
    assert (row["delta_low"] > 0 or row["delta_high"] < 0) == excludes
    assert ("(excludes 0)" in _row(text, "Difference to", "rho1-weighted")[0]) == excludes
    per_seed = _row(text, "Δ of each seed", "rho1-weighted")[0]
    shown = [float(x) for x in re.findall(r"[-+]\d+\.\d", per_seed)]
    assert shown == pytest.approx(list(effects.values()), abs=3.0)
    assert f"({sum(x > 0 for x in shown)} of 3 > 0)" in per_seed
    assert "3 seeds" in text and "Left out" in text  # no training metrics given


@pytest.mark.parametrize(
    ("control_effect", "method_beats_control"),
    [({0: 5, 1: 6, 2: 4}, False), ({0: 0, 1: 1, 2: -1}, True)],
    ids=["reweighting-as-such", "which-tokens"],
)
def test_each_method_is_compared_with_its_controls(tmp_path, control_effect, method_beats_control):
    """A method 5 points up in every seed: when its controls are as far up, the gain
    is reweighting as such and method - control includes 0; when the controls sit at
    the baseline, method - control excludes 0 (which tokens it weights matters)."""
    effects = {"rho1-weighted": {0: 5, 1: 6, 2: 4}}
    effects |= {f"rho1-weighted-{kind}": control_effect for kind in ("shuffled", "matched")}
    jsons, jsonls = _write_effects(tmp_path, effects)
    config, recipes = _effect_config(tuple(effects))
    text = report.build_report(jsons, jsonls, [], config, recipes, tmp_path / "report.md", tmp_path / "f",
                               metrics_required=False).read_text()
    for kind in ("shuffled", "matched"):
        cells = _row(text, "Each method against its controls", f"rho1-weighted-{kind}")
        assert cells[0] == "rho1-weighted"
        mean, low, high = _numbers(cells[1])
        assert mean == pytest.approx(5 - np.mean(list(control_effect.values())), abs=2.0)
        assert (low > 0) == method_beats_control and ("(excludes 0)" in cells[1]) == method_beats_control


def test_report_command_renders_copied_back_results(tmp_path, monkeypatch, capsys):
    """`python -m wmtp report` on a results folder: evaluations only (training metrics
    left out, and said), then with the metrics copied beside them."""
    from wmtp import cli

    run = tmp_path / "results" / "fixture"
    files = _write_results(run)
    config_file = tmp_path / "fixture.yaml"
    config_file.write_text(yaml_dump(_config_data()))
    for parquet in files["parquets"]:
        parquet.rename(parquet.with_suffix(".away"))
    monkeypatch.chdir(REPO)
    argv = ["report", "--configfile", str(config_file), "--results", str(tmp_path / "results")]
    assert cli.main(argv) == 0
    assert "training metrics files absent" in capsys.readouterr().out
    text = (run / "report.md").read_text()
    assert "Left out" in text and "## Token weights" not in text
    assert sorted(p.name for p in (run / "figures").iterdir()) == ["pass_at_k.png"]
    assert len(pd.read_csv(run / "table.csv")) > 0
    for parquet in files["parquets"]:
        parquet.with_suffix(".away").rename(parquet)
    assert cli.main(argv[:-1] + [str(run)]) == 0  # the run's folder itself
    text = (run / "report.md").read_text()
    assert "## Token weights" in text and "Left out" not in text
    (run / "eval" / "ntp" / "seed1" / "humaneval.jsonl").unlink()
    assert cli.main(argv) == 2
    assert "evaluation files missing" in capsys.readouterr().err
