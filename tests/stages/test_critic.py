"""Critic stage 1: Monte-Carlo values of gold-solution line boundaries (the sandbox
judges every continuation for real), the value table they give, the value head
on boundary states, and the stage end to end (also through its Snakemake adapter)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, tiny_config

import wmtp.stages.critic as critic
from tests.stages.test_refce import run_workflow_script
from wmtp.config.schema import ConfigError, CriticSettings, DataSettings, load_recipe
from wmtp.core.checkpoints import save_model
from wmtp.core.model import MTPModel
from wmtp.data.prompts import training_pair
from wmtp.data.training import build_examples, collate
from wmtp.stages import critic_mc
from wmtp.stages.critic import choose_problems, train_critic
from wmtp.stages.value_table import ValueTable

# One line decides: the stand-in base writes every line of the gold solution but
# this one, which it gets wrong (y * 3), unless the line is already in its prompt.
DECISIVE, WRONG = "    z = y * 2\n", "    z = y * 3\n"
GOLD = "def f(x):\n    y = x + 1\n" + DECISIVE + "    return z\n"
GOLD_TESTS = ["assert f(1) == 4", "assert f(3) == 8"]


def synthetic_rows() -> pd.DataFrame:
    """The decisive-line problem and two more whose stand-in continuations are right
    from any prefix (their advantage is all in s0: V = 1 everywhere)."""
    return pd.DataFrame(
        {
            "task_id": [1, 2, 3],
            "text": ["Double x plus one.", "Add two numbers.", "Negate."],
            "code": [GOLD, "def add(a, b):\n    c = a + b\n    return c\n", "def neg(a):\n    return -a\n"],
            "test_list": [GOLD_TESTS, ["assert add(1, 2) == 3"], ["assert neg(1) == -1"]],
        }
    )


def stand_in_base(tokenizer, rows: pd.DataFrame):
    """A deterministic continuation function in place of sampling from the base: the
    rest of the gold text after the prompt, with the decisive line written wrong
    whenever the prompt does not already hold it (up to its decisive character)."""
    full = [
        "".join(training_pair(tokenizer, r.text, r.test_list[0], r.code))
        for r in rows.itertuples(index=False)
    ]

    def continuations(prompts: list[str], rollouts: int = 3) -> list[list[str]]:
        out = []
        for prompt in prompts:
            text = next(t for t in full if t.startswith(prompt))
            wrong = text.replace(DECISIVE, WRONG)  # what it writes unless the prompt holds the line
            rest = (wrong if wrong.startswith(prompt) else text)[len(prompt) :]
            out.append([rest] * rollouts)
        return out

    return continuations


def synthetic_solutions(tokenizer, rows: pd.DataFrame, max_lines=None):
    examples = build_examples(rows, tokenizer, 256)
    by_id = {str(r.task_id): r for r in rows.itertuples(index=False)}
    return [critic_mc.solution_lines(tokenizer, e, by_id[e.sample_id], max_lines) for e in examples]


def line_texts(tokenizer, solution) -> list[str]:
    """The text of each segment of a solution, from its tokens."""
    ids = solution.example.input_ids[solution.start :]
    b = solution.boundaries
    return [tokenizer.decode(ids[b[i] : b[i + 1]]) for i in range(solution.n_segments)]


def test_solutions_are_cut_after_each_newline_token(tiny_tokenizer):
    rows = synthetic_rows()
    (solution, *_) = synthetic_solutions(tiny_tokenizer, rows)
    prompt, target = training_pair(tiny_tokenizer, rows.text[0], GOLD_TESTS[0], GOLD)
    assert solution.prompt_text == prompt and solution.boundaries[0] == 0
    assert solution.boundaries[-1] == len(solution.example.input_ids) - solution.start
    # every sampled prefix is the solution text up to (and with) a newline token
    for prefix in solution.prefixes[1:]:
        assert target.startswith(prefix) and "\n" in prefix
    assert "".join(line_texts(tiny_tokenizer, solution)).startswith(GOLD.rstrip("\n"))
    prompts, mismatched = critic_mc.prefix_prompts(tiny_tokenizer, [solution])
    assert len(prompts) == solution.n_segments and mismatched == 0
    # max_lines keeps that many line ends, the last one always
    (short, *_) = synthetic_solutions(tiny_tokenizer, rows, max_lines=2)
    assert short.n_segments == 3 and short.boundaries[-2] == solution.boundaries[-2]


def test_monte_carlo_advantage_lands_on_the_decisive_line(tiny_tokenizer):
    """The stand-in base fails from every prefix without the decisive line and passes
    from every prefix with it; the real sandbox judges. The whole advantage of the
    problem (gold reward 1 - V(s0) 0) falls on that line's tokens."""
    rows = synthetic_rows()
    solutions = synthetic_solutions(tiny_tokenizer, rows)
    judge = critic_mc.execution_judge(timeout=3.0, memory_mb=512, workers=2)
    estimate = critic_mc.estimate_values(solutions, stand_in_base(tiny_tokenizer, rows), judge, tiny_tokenizer)
    decisive, easy, _ = estimate.line_deltas()
    texts = line_texts(tiny_tokenizer, solutions[0])
    line = int(np.argmax(decisive))
    assert "z = y * 2" in texts[line] and "y = x + 1" not in texts[line] and "return" not in texts[line]
    assert decisive[line] == 1.0 and np.count_nonzero(decisive) == 1
    assert estimate.values[0][0] == 0.0 and estimate.values[0][-1] == 1.0
    assert estimate.values[1][0] == 1.0 and not np.any(easy)  # solved from s0: no line matters
    # in the table every token of the line gets the line's advantage, the rest 0
    deltas = critic_mc.token_deltas(solutions[0], decisive)
    example = solutions[0].example
    solved = [j for j in range(solutions[0].start, len(example.input_ids)) if deltas[j] == 1.0]
    assert "z = y * 2" in tiny_tokenizer.decode([example.input_ids[j] for j in solved])
    assert np.isnan(deltas[: solutions[0].start]).all()
    assert set(np.unique(deltas[solutions[0].start :])) == {0.0, 1.0}


def test_execution_judge_runs_tests_together_and_skips_what_does_not_compile(tiny_tokenizer):
    (solution, *_) = synthetic_solutions(tiny_tokenizer, synthetic_rows())
    judge = critic_mc.execution_judge(timeout=1.0, memory_mb=512, workers=2)
    programs = [
        GOLD,
        GOLD.replace("y * 2", "y * 2 if x < 3 else 0"),  # passes one test of two: a fail
        GOLD.replace("def f(x):", "def f(x)"),  # does not compile
        "def f(x):\n    while True:\n        pass\n",  # times out
        GOLD,  # judged once with the first
    ]
    assert judge(programs, [solution] * len(programs)) == [1.0, 0.0, 0.0, 0.0, 1.0]


def tiny_base(tokenizer, tmp_path):
    model = MTPModel(tiny_config(vocab_size=len(tokenizer)))
    model.init_weights(seed=0)
    return save_model(model, tmp_path / "base", tokenizer=tokenizer)


def test_train_critic_puts_the_decisive_lines_advantage_in_the_table(tiny_tokenizer, tmp_path, monkeypatch):
    """The stage end to end with the stand-in base in place of sampling: the value
    table gives the decisive line's tokens the largest delta; the gate compares the
    same lines of a second estimate; the adapter writes the same files."""
    rows = synthetic_rows()
    rows.to_parquet(tmp_path / "train.parquet")
    base = tiny_base(tiny_tokenizer, tmp_path)
    base_says = stand_in_base(tiny_tokenizer, rows)
    calls = []

    def sample(model, tokenizer, prompts, *, rollouts, seed, **_):
        calls.append((len(prompts), rollouts, seed))
        return base_says(prompts, rollouts)

    monkeypatch.setattr(critic_mc, "sample_continuations", sample)
    settings = CriticSettings(rollouts=3, gate_problems=2, gate_rollouts=2, gate_resamples=50)
    outputs = train_critic(base, tmp_path / "train.parquet", settings, 5, tmp_path / "critic", timeout=3.0)
    valued, gated = choose_problems(3, settings, 5)
    assert valued == [0, 1, 2] and len(gated) == 2
    n_boundaries = sum(s.n_segments for s in synthetic_solutions(tiny_tokenizer, rows))
    assert calls[0] == (n_boundaries, 3, 5) and calls[1][1:] == (2, 5 + critic.FRESH_SEED_OFFSET)
    metrics = json.loads(outputs.metrics.read_text())
    assert metrics["n_continuations"] == 3 * n_boundaries and metrics["n_prefix_mismatch"] == 0
    assert metrics["values"]["gold_pass_rate"] == 1.0 and metrics["n_zero"] == 0
    table = ValueTable.from_parquet(outputs.table, tokenizer=tiny_tokenizer, base_model_dir=base)
    assert table.gate == {"monte_carlo": metrics["gate"], "head": None}
    assert table.strength == metrics["auto_strength"]
    examples = build_examples(rows, tiny_tokenizer, 256)
    batch = collate(examples, tiny_tokenizer.pad_token_id)
    deltas = table.lookup(batch.sample_ids, batch.input_ids, batch.loss_mask)  # (B, S) by target
    first = batch.sample_ids.index("1")
    top = (deltas[first] == deltas.max()).nonzero().flatten()
    assert "z = y * 2" in tiny_tokenizer.decode(batch.input_ids[first, top].tolist())
    assert (deltas[~batch.loss_mask] == 0).all()

    smk = tmp_path / "smk" / "seed5"
    run_workflow_script(
        "critic.py",
        monkeypatch,
        input={"base": str(base), "data": str(tmp_path / "train.parquet")},
        output={"table": str(smk / "values.parquet"), "metrics": str(smk / "metrics.json")},
        params={
            "settings": {
                "critic": settings.model_dump(mode="json"),
                "data": DataSettings(max_seq_len=256).model_dump(mode="json"),
                "sandbox": {"timeout": 3.0, "memory_mb": 1024, "workers": None},
            }
        },
        log=[str(tmp_path / "critic.log")],
        wildcards={"seed": "5"},
    )
    assert calls[-2:] == calls[:2]
    assert pd.read_parquet(smk / "values.parquet").equals(pd.read_parquet(outputs.table))


def test_train_critic_with_real_sampling_and_a_value_head(tiny_tokenizer, tmp_path):
    """Continuations from wmtp.core.sample.generate on a random tiny model: garbage
    code, so V = 0 before the end and the gold's own reward 1 after it. With
    max_problems below the data, the value head values the rest (its gate problems
    never fitted) and lambda is the smaller of the two gates'."""
    base = tiny_base(tiny_tokenizer, tmp_path)
    rows = synthetic_rows()
    extra = rows.assign(task_id=rows.task_id + 10)
    pd.concat([rows, extra]).to_parquet(tmp_path / "train.parquet")
    settings = CriticSettings(
        rollouts=2, max_new_tokens=8, batch_size=8, max_problems=4, gate_problems=2, gate_rollouts=1,
        gate_resamples=50, value_head=True, head_hidden_dim=8, head_epochs=5,
    )  # fmt: skip
    outputs = train_critic(base, tmp_path / "train.parquet", settings, 0, tmp_path / "c", timeout=2.0)
    metrics = json.loads(outputs.metrics.read_text())
    assert metrics["n_valued"] == 4 and metrics["n_head"] == 2 and metrics["n_zero"] == 0
    assert metrics["head"]["n_fitted"] == 2
    assert metrics["values"]["v_s0_mean"] == 0.0 and metrics["values"]["gold_pass_rate"] == 1.0
    assert metrics["gate_head"] is not None
    assert metrics["auto_strength"] <= min(1.0, max(0.0, metrics["gate"]["value"] or 0.0))
    table = pd.read_parquet(outputs.table)
    on_solution = table["delta"].notna()
    assert np.isfinite(table.loc[on_solution, "delta"]).all() and on_solution.sum() > 0
    # without the head the problems beyond max_problems get delta 0
    plain = settings.model_copy(update={"value_head": False})
    outputs = train_critic(base, tmp_path / "train.parquet", plain, 0, tmp_path / "p", timeout=2.0)
    assert json.loads(outputs.metrics.read_text())["n_zero"] == 2


def test_reward_model_scores_are_probabilities(tiny_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    for n_labels in (1, 2):
        config = LlamaConfig(
            vocab_size=len(tiny_tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_labels=n_labels,
            pad_token_id=tiny_tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        directory = tmp_path / f"rm{n_labels}"
        LlamaForSequenceClassification(config).save_pretrained(directory)
        tiny_tokenizer.save_pretrained(directory)
        texts = ["def f():\n    return 1\n", "x", "def g(a):\n    return a * 2\n"]
        scores = critic.reward_model_scores(texts, directory, batch_size=2)
        assert len(scores) == 3 and all(0 < s < 1 for s in scores)
        assert scores == pytest.approx(
            critic.reward_model_scores(texts[::-1], directory, batch_size=3)[::-1], abs=1e-5
        )


def test_value_head_fits_boundary_values_deterministically():
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(4, 16, generator=g) for _ in range(30)]
    values = [(s[:, 0] > 0).double().numpy() for s in states]
    settings = CriticSettings(head_hidden_dim=32, head_lr=3e-3, head_epochs=150)
    head, losses = critic.fit_boundary_head(states, values, settings, 0)
    assert losses[-1] < 0.3 * losses[0]
    fitted = np.concatenate(critic.head_values(head, states))
    assert np.corrcoef(fitted, np.concatenate(values))[0, 1] > 0.9
    again, _ = critic.fit_boundary_head(states, values, settings, 0)
    for a, b in zip(head.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_strength_auto_only_for_the_critic(tmp_path):
    path = tmp_path / "rho1-weighted.yaml"
    path.write_text("algorithm: rho1-weighted\nweighting: {strength: auto}\n")
    with pytest.raises(ConfigError, match="only critic-wmtp has a confidence measure"):
        load_recipe(path)
    shipped = load_recipe(REPO / "config" / "recipes" / "critic-wmtp.yaml")
    assert shipped.weighting.strength == "auto"
