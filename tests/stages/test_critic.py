"""Critic stage 1: GAE targets, value-head training (V(s0) included), hold-out and
explained variance, rollout selection, rewards, the value table, end to end."""

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
from wmtp.core.checkpoints import load_model, save_model
from wmtp.core.model import MTPModel
from wmtp.core.weights import critic_deltas
from wmtp.data.training import build_examples, collate, read_split
from wmtp.stages.critic import (
    Rollout,
    ValueHead,
    execution_rewards,
    explained_variance,
    fit_value_head,
    gae_returns,
    load_value_head,
    rollout_hidden,
    save_value_head,
    select_rollouts,
    split_problems,
    train_critic,
)
from wmtp.stages.value_table import ValueTable


def test_gae_matches_hand_computation():
    # One episode on positions 1..3 (mask), terminal reward 1 at position 3.
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[9.0, 0.2, 0.5, 0.7, 9.0]])
    mask = torch.tensor([[False, True, True, True, False]])
    got = gae_returns(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=3: delta = 1 - 0.7 = 0.3;            A = 0.3;                return 1.0
    # t=2: delta = 0.9*0.7 - 0.5 = 0.13;     A = 0.13 + 0.72*0.3;    return A + 0.5
    # t=1: delta = 0.9*0.5 - 0.2 = 0.25;     A = 0.25 + 0.72*A_2;    return A + 0.2
    a2 = 0.13 + 0.72 * 0.3
    a1 = 0.25 + 0.72 * a2
    expected = torch.tensor([[0.0, a1 + 0.2, a2 + 0.5, 1.0, 0.0]])
    torch.testing.assert_close(got, expected)


def test_gae_with_gamma_lam_one_returns_the_reward_and_rows_are_independent():
    values = torch.randn(3, 6)
    mask = torch.tensor(
        [[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool
    )
    rewards = torch.zeros(3, 6)
    rewards[0, 2], rewards[1, 5], rewards[2, 5] = 0.5, 1.0, 0.0
    got = gae_returns(rewards, values, mask, gamma=1.0, lam=1.0)
    expected = torch.where(
        mask, torch.tensor([[0.5], [1.0], [0.0]]).expand(3, 6), torch.zeros(3, 6)
    )
    torch.testing.assert_close(got, expected)
    # lam = 0: one-step TD targets r_t + gamma V_{t+1}
    td = gae_returns(rewards, values, mask, gamma=0.5, lam=0.0)
    torch.testing.assert_close(td[0, :2], 0.5 * values[0, 1:3])
    assert td[0, 2] == pytest.approx(0.5)


def toy_problem(n: int = 64, dim: int = 16, seed: int = 0):
    """Reward = 1 when feature 0 of the hidden states is positive, else 0."""
    g = torch.Generator().manual_seed(seed)
    hiddens, rewards = [], []
    for i in range(n):
        h = torch.randn(int(torch.randint(3, 12, (1,), generator=g)), dim, generator=g)
        sign = 1.0 if i % 2 else -1.0
        h[:, 0] = sign * (1.0 + h[:, 0].abs())
        hiddens.append(h)
        rewards.append(1.0 if sign > 0 else 0.0)
    return hiddens, rewards


def test_value_head_learns_toy_reward_deterministically():
    hiddens, rewards = toy_problem()
    settings = CriticSettings(hidden_dim=32, lr=3e-3, epochs=15, batch_size=8, lam=1.0)
    head, curve = fit_value_head(hiddens, rewards, settings, seed=0)
    losses = curve["loss_per_epoch"]
    assert len(losses) == 15 and len(curve["loss_per_step"]) == 15 * 8
    assert losses[-1] < 0.3 * losses[0]
    with torch.no_grad():
        final = [float(head(h.unsqueeze(0))[0, -1]) for h in hiddens]
    assert np.corrcoef(final, rewards)[0, 1] > 0.9
    again, _ = fit_value_head(hiddens, rewards, settings, seed=0)
    for a, b in zip(head.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_value_head_save_load_roundtrip(tmp_path):
    head = ValueHead(8, 16)
    path = save_value_head(head, tmp_path / "v" / "value_head.safetensors")
    loaded = load_value_head(path)
    x = torch.randn(2, 5, 8)
    assert loaded(x).shape == (2, 5)
    torch.testing.assert_close(loaded(x), head.eval()(x))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "junk.safetensors"))
    with pytest.raises(ValueError, match="not a value head"):
        load_value_head(tmp_path / "junk.safetensors")


def biased_rollouts(seed: int = 0) -> list[Rollout]:
    """Correct rollouts tend to be short, wrong ones long (with overlap)."""
    rng = np.random.default_rng(seed)
    rollouts = []
    for problem in range(40):
        for _ in range(6):
            good = rng.random() < 0.5
            length = int(rng.integers(5, 40) if good else rng.integers(20, 60))
            rollouts.append(Rollout(str(problem), [1, 2], [3] * length, 1.0 if good else 0.0))
    return rollouts


def test_length_balancing_matches_lengths_and_caps_problems():
    rollouts = biased_rollouts()
    kept, stats = select_rollouts(rollouts, max_per_problem=4, length_balance=True, seed=0)
    per_problem = pd.Series([r.sample_id for r in kept]).value_counts()
    assert per_problem.max() <= 4
    assert stats["length_balance_applied"] and stats["n_kept"] == len(kept) > 20
    edges = np.array(stats["length_bucket_edges"])
    lengths = np.array([len(r.completion_ids) for r in kept])
    high = np.array([r.reward >= 0.5 for r in kept])
    buckets = np.searchsorted(edges, lengths, side="right")
    for b in np.unique(buckets):
        assert (high & (buckets == b)).sum() == (~high & (buckets == b)).sum()
    assert stats["length_reward_corr_before"] < -0.5
    assert abs(stats["length_reward_corr_after"]) < 0.5 * abs(stats["length_reward_corr_before"])
    unbalanced, plain = select_rollouts(rollouts, max_per_problem=4, length_balance=False, seed=0)
    assert not plain["length_balance_applied"] and len(unbalanced) == plain["n_after_cap"] == 160
    # the cap keeps both classes when a problem has both
    mixed = [Rollout("p", [1], [3] * n, r) for n, r in [(5, 1.0), (6, 1.0), (7, 1.0), (8, 0.0)]]
    kept_mixed, _ = select_rollouts(mixed, max_per_problem=2, length_balance=False, seed=0)
    assert sorted(r.reward for r in kept_mixed) == [0.0, 1.0]


def test_length_balancing_skipped_when_one_class():
    rollouts = [Rollout(str(i), [1], [3] * (i + 1), 0.0) for i in range(10)]
    kept, stats = select_rollouts(rollouts, max_per_problem=4, length_balance=True, seed=0)
    assert len(kept) == 10 and not stats["length_balance_applied"]


ADD_TESTS = ["assert add(1, 2) == 3", "assert add(5, 5) == 10"]


def test_execution_reward_is_fraction_of_tests_passed():
    programs = [
        "def add(a, b):\n    return a + b\n",
        "def add(a, b):\n    return a + b if a < 5 else 0\n",
        "def add(a, b):\n    return a - b\n",
        "def add(a, b)\n    return a + b\n",
        "def add(a, b):\n    while True:\n        pass\n",
    ]
    rewards = execution_rewards(programs, [ADD_TESTS] * len(programs), timeout=1.0, workers=2)
    assert rewards == [1.0, 0.5, 0.0, 0.0, 0.0]
    assert execution_rewards(["x = 1\n"], [["assert y == 2"]], ["y = 2"], workers=1) == [1.0]


def test_train_critic_end_to_end(tiny_tokenizer, tmp_path, monkeypatch):
    """Rollouts stubbed (no sampling), rewards executed for real."""
    model = MTPModel(tiny_config(vocab_size=len(tiny_tokenizer)))
    model.init_weights(seed=0)
    base = save_model(model, tmp_path / "base", tokenizer=tiny_tokenizer)
    rows = pd.DataFrame(
        {
            "task_id": [11, 12, 13],
            "text": ["Add two numbers.", "Multiply two numbers.", "Subtract."],
            "code": [
                "def add(a, b):\n    return a + b\n",
                "def mul(a, b):\n    return a * b\n",
                "def sub(a, b):\n    return a - b\n",
            ],
            "test_list": [
                ADD_TESTS,
                ["assert mul(2, 3) == 6", "assert mul(0, 3) == 0"],
                ["assert sub(3, 1) == 2", "assert sub(1, 1) == 0"],
            ],
        }
    )
    rows.to_parquet(tmp_path / "train.parquet")
    answers = {
        "add": ["def add(a, b):\n    return a + b", "def add(a, b):\n    return 0"],
        "mul": ["def mul(a, b):\n    return a * b", "def mul(a, b):\n    return a * b if a else 1"],
        "sub": ["def sub(a, b):\n    return a - b", "def sub(a, b):\n    return b"],
    }
    calls = []

    def fake_sample(model_, tokenizer_, prompts, settings_, seed_):
        calls.append((len(prompts), settings_.samples_per_problem, seed_))
        return [answers[next(k for k in answers if f"{k}(" in p)] for p in prompts]

    monkeypatch.setattr(critic, "sample_completions", fake_sample)
    settings = CriticSettings(
        samples_per_problem=2,
        max_samples_per_problem=2,
        hidden_dim=16,
        epochs=3,
        batch_size=2,
        max_new_tokens=16,
        include_references=False,
        mutants_per_problem=0,
    )
    outputs = train_critic(
        base,
        tmp_path / "train.parquet",
        settings,
        seed=5,
        out_dir=tmp_path / "critic",
        max_seq_len=256,
        timeout=2.0,
    )
    assert calls == [(3, 2, 5)]
    metrics = json.loads(outputs.metrics.read_text())
    assert metrics["n_rollouts"] == 6
    assert metrics["reward_all"]["mean"] == pytest.approx((1 + 0 + 1 + 0.5 + 1 + 0) / 6)
    assert len(metrics["loss_per_epoch"]) == 3 and all(np.isfinite(metrics["loss_per_step"]))
    assert metrics["n_rollouts_kept"] == metrics["selection"]["n_kept"] > 0
    # one of the three problems is held out: never fitted, only measured
    assert metrics["n_problems_held_out"] == 1 and metrics["held_out"]["n_rollouts"] == 2
    assert metrics["n_rollouts_kept"] + metrics["held_out"]["n_rollouts"] <= 6
    assert metrics["explained_variance"] == metrics["held_out"]["explained_variance"]
    assert metrics["auto_strength"] == ValueTable.from_parquet(outputs.table).strength
    assert set(metrics["value_table"]["mean_delta_by_class"]) == {"comment", "code", "first", "eos"}
    assert_table_is_head_on_frozen_base(outputs, base, tmp_path / "train.parquet", tiny_tokenizer)

    # The Snakemake adapter gives the same files for the same settings and seed.
    smk = tmp_path / "smk" / "seed5"
    run_workflow_script(
        "critic.py",
        monkeypatch,
        input={"base": str(base), "data": str(tmp_path / "train.parquet")},
        output={
            "table": str(smk / "values.parquet"),
            "head": str(smk / "value_head.safetensors"),
            "metrics": str(smk / "metrics.json"),
        },
        params={
            "settings": {
                "critic": settings.model_dump(mode="json"),
                "data": DataSettings(max_seq_len=256).model_dump(mode="json"),
                "sandbox": {"timeout": 2.0, "memory_mb": 1024, "workers": None},
            }
        },
        log=[str(tmp_path / "critic.log")],
        wildcards={"seed": "5"},
    )
    assert calls[-1] == (3, 2, 5)
    head = load_value_head(outputs.head)
    from_script = load_value_head(smk / "value_head.safetensors")
    for a, b in zip(head.state_dict().values(), from_script.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert pd.read_parquet(smk / "values.parquet").equals(pd.read_parquet(outputs.table))


def assert_table_is_head_on_frozen_base(outputs, base, train_path, tokenizer) -> None:
    """Every value in the table is the saved value head applied to the frozen base
    trunk over the training example, as the trainer builds it; deltas follow
    wmtp.core.weights.critic_deltas, the first solution token's against V(s0)."""
    head, model = load_value_head(outputs.head), load_model(base).eval()
    table = pd.read_parquet(outputs.table)
    examples = build_examples(read_split(train_path), tokenizer, 256)
    assert set(table["sample_id"]) == {e.sample_id for e in examples}
    for example in examples:
        with torch.no_grad():
            values = head(model.trunk(torch.tensor([example.input_ids]))[0])[0]  # (L,)
        rows = table[table["sample_id"] == example.sample_id]
        assert rows["position"].tolist() == list(range(1, len(example.input_ids)))
        assert rows["token_id"].tolist() == example.input_ids[1:]
        s0 = example.loss_mask.index(1) - 1
        stored = torch.tensor(rows["value"].to_numpy())  # positions 1..L-1
        torch.testing.assert_close(stored[s0 - 1 :], values[s0:], atol=1e-5, rtol=1e-5)
        assert stored[: s0 - 1].isnan().all()  # the critic never learned earlier prompt states
        mask = torch.tensor([example.loss_mask], dtype=torch.bool)
        expected = critic_deltas(values[None], mask)[0]  # (L,)
        deltas = torch.tensor(rows["delta"].to_numpy())
        torch.testing.assert_close(deltas[s0:], expected[s0 + 1 :], atol=1e-5, rtol=1e-5)
        assert float(expected[s0 + 1]) == pytest.approx(
            float(values[s0 + 1] - values[s0]), abs=1e-6
        )
        assert deltas[:s0].isnan().all()
    lookup = ValueTable.from_parquet(outputs.table, tokenizer=tokenizer, base_model_dir=base)
    batch = collate(examples, tokenizer.pad_token_id)
    deltas = lookup.lookup(batch.sample_ids, batch.input_ids, batch.loss_mask)
    assert (deltas[~batch.loss_mask] == 0).all() and deltas[batch.loss_mask].abs().sum() > 0


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


def test_train_critic_with_real_sampling(tiny_tokenizer, tmp_path):
    """Rollouts from wmtp.core.sample.generate on a random tiny model: garbage code, so
    every reward is 0, balancing is skipped, and the stage still finishes."""
    model = MTPModel(tiny_config(vocab_size=len(tiny_tokenizer)))
    model.init_weights(seed=0)
    base = save_model(model, tmp_path / "base", tokenizer=tiny_tokenizer)
    pd.DataFrame(
        {
            "task_id": [1, 2],
            "text": ["Add.", "Negate."],
            "code": ["def add(a, b):\n    return a + b\n", "def neg(a):\n    return -a\n"],
            "test_list": [["assert add(1, 2) == 3"], ["assert neg(1) == -1"]],
        }
    ).to_parquet(tmp_path / "train.parquet")
    settings = CriticSettings(
        samples_per_problem=2,
        hidden_dim=8,
        epochs=1,
        batch_size=4,
        max_new_tokens=8,
        include_references=False,
        mutants_per_problem=0,
    )
    outputs = train_critic(
        base, tmp_path / "train.parquet", settings, seed=0, out_dir=tmp_path / "c", timeout=2.0
    )
    metrics = json.loads(outputs.metrics.read_text())
    assert metrics["n_rollouts"] == 4 and metrics["reward_all"]["max"] == 0.0
    assert not metrics["selection"]["length_balance_applied"]
    # every return is 0: nothing to explain, so strength auto gives baseline weights
    assert metrics["explained_variance"] is None and metrics["auto_strength"] == 0.0

    # With the reference solutions as extra rollouts the critic sees both reward
    # classes even though the base model solves nothing; references are executed
    # like any sample, not assumed correct.
    settings = settings.model_copy(update={"include_references": True})
    outputs = train_critic(
        base, tmp_path / "train.parquet", settings, seed=0, out_dir=tmp_path / "r", timeout=2.0
    )
    metrics = json.loads(outputs.metrics.read_text())
    assert metrics["n_rollouts"] == 6
    assert metrics["reward_all"]["max"] == 1.0
    assert metrics["reward_all"]["mean"] == pytest.approx(2 / 6)


def test_value_of_s0_is_trained():
    """Rollouts of two problems whose prompts end in different states (row 0 of the
    hidden states is s0): problem A's rollouts all succeed, B's all fail, so only
    V(s0) being fitted makes V(s0_A) ~ 1 and V(s0_B) ~ 0. Untrained, the head's
    V(s0) says nothing about the problem."""
    g = torch.Generator().manual_seed(0)
    s0 = {"A": torch.randn(16, generator=g), "B": torch.randn(16, generator=g)}
    hiddens, rewards = [], []
    for i in range(40):
        problem = "AB"[i % 2]
        body = torch.randn(int(torch.randint(3, 8, (1,), generator=g)), 16, generator=g)
        hiddens.append(torch.cat([s0[problem][None], body]))  # (1 + C, D)
        rewards.append(1.0 if problem == "A" else 0.0)
    settings = CriticSettings(hidden_dim=32, lr=3e-3, epochs=20, batch_size=8, lam=1.0)
    head, _ = fit_value_head(hiddens, rewards, settings, seed=0)
    with torch.no_grad():
        v_a, v_b = (float(head(s0[p][None, None])[0, 0]) for p in "AB")
    assert v_a > 0.8 and v_b < 0.2
    # and in the critic's own pipeline, the hidden states start at s0
    model = MTPModel(tiny_config(vocab_size=50))
    model.init_weights(seed=0)
    rollout = Rollout("1", [3, 4, 5], [6, 7, 1], 1.0)
    (hidden,) = rollout_hidden(model, [rollout], batch_size=1, device="cpu")
    with torch.no_grad():
        full = model.trunk(torch.tensor([[3, 4, 5, 6, 7, 1]]))[0][0]
    torch.testing.assert_close(hidden, full[2:])  # s0 = the last prompt token, then C tokens


def test_explained_variance_and_held_out_problems():
    hiddens, rewards = toy_problem(n=40)
    constant = ValueHead(16, 8)
    with torch.no_grad():  # V = 0.5, the mean reward, everywhere: explains nothing
        constant.net[3].weight.zero_()
        constant.net[3].bias.fill_(0.5)
    assert explained_variance(constant, hiddens, rewards, gamma=1.0) == pytest.approx(0.0, abs=0.02)
    settings = CriticSettings(hidden_dim=32, lr=3e-3, epochs=15, batch_size=8, lam=1.0)
    head, _ = fit_value_head(hiddens, rewards, settings, seed=0)
    test_hiddens, test_rewards = toy_problem(n=40, seed=1)  # unseen rollouts
    assert explained_variance(head, test_hiddens, test_rewards, gamma=1.0) > 0.7
    assert explained_variance(head, test_hiddens, [1.0] * 40, gamma=1.0) is None
    ids = [str(i // 3) for i in range(60)]  # 20 problems, 3 rollouts each
    held_out = split_problems(ids, 0.2, seed=0)
    assert len(held_out) == 4 and held_out == split_problems(ids[::-1], 0.2, seed=0)
    assert held_out != split_problems(ids, 0.2, seed=1)
    assert split_problems(["x", "x"], 0.2, seed=0) == set()


def test_strength_auto_only_for_the_critic(tmp_path):
    path = tmp_path / "rho1-weighted.yaml"
    path.write_text("algorithm: rho1-weighted\nweighting: {strength: auto}\n")
    with pytest.raises(ConfigError, match="only critic-wmtp has a confidence measure"):
        load_recipe(path)
    shipped = load_recipe(REPO / "config" / "recipes" / "critic-wmtp.yaml")
    assert shipped.weighting.strength == "auto"


def test_mutants_change_one_code_token_and_fail():
    """Mutants of tiny-mbpp's noisy references differ from the reference in exactly
    one Python token (never a comment), are seeded, and mostly fail the tests."""
    import io
    import random
    import tokenize

    from wmtp.data.mutants import mutants
    from wmtp.data.prompts import mbpp_solution
    from wmtp.tiny.data import make_tiny_mbpp

    def tokens(code):
        return [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(code).readline)]

    rows = make_tiny_mbpp(12, 2, seed=0, noise_comment_prob=0.5)["train"]
    programs, tests = [], []
    for code, asserts in zip(rows["code"], rows["test_list"], strict=True):
        reference = mbpp_solution(code)
        found = mutants(reference, 3, random.Random("0-1"))
        assert found == mutants(reference, 3, random.Random("0-1")) and len(found) == 3
        for mutant in found:
            a, b = tokens(reference), tokens(mutant)
            assert len(a) == len(b)
            changed = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
            assert len(changed) == 1 and changed[0][0][0] != tokenize.COMMENT
            programs.append(mutant)
            tests.append(list(asserts))
    assert mutants("x = 'unterminated\n", 2, random.Random(0)) == []
    rewards = execution_rewards(programs, tests, timeout=2.0, workers=2)
    assert np.mean(np.array(rewards) < 1) > 0.7
