"""Stage 1 of critic-wmtp: a value head on the frozen base model (docs/design.md).

    rows -> m sampled completions per problem (base model, head 0), plus the
            reference solution and mutants of it (wmtp.data.mutants: one code token
            changed, the matched negatives that make the critic look at code)
         -> reward per completion (fraction of the problem's tests passed, each
            assert run on its own in the sandbox; or a reward model's score)
         -> problems split into fitted and held-out ones (`holdout_fraction`)
         -> cap per problem + length balancing (in each part)
         -> trunk hidden states of prompt + completion + EOS (frozen base, once)
         -> value head V trained with MSE towards GAE returns from the last
            prompt token s0 (the state before the first solution token) to EOS
         -> explained variance of the returns on the held-out rollouts
         -> value table of the training examples (wmtp.stages.value_table)

V_j (the value at position j, having seen x_<=j) estimates the reward to come;
V at s0 is trained too, so the first solution token's delta V(first) - V(s0)
means something. In stage 2 the trainer weights token j by the table's
delta_j = V_j - V_{j-1}, scaled by the critic's held-out explained variance
when `weighting.strength` is `auto`.

Held-out problems are never fitted, so their explained variance says how well
V predicts the reward of code it has not seen: a critic that explains nothing
(EV <= 0) gets baseline weights under `strength: auto`. Returns there are the
Monte-Carlo ones (the final reward discounted by gamma), not GAE targets, which
are built from V itself.

Length balancing, because wrong solutions tend to be longer: a critic could
learn "long = bad" instead of anything about the code. After capping each
problem at `max_samples_per_problem` (keeping a mix of high and low rewards),
rollouts are split into high (reward >= 0.5) and low (< 0.5), lengths are cut
into quantile buckets of the pooled length distribution, and inside each bucket
the larger class is subsampled (seeded) to the size of the smaller one. Every
bucket then holds as many high as low samples, so their length distributions
match up to the bucket width and length carries (almost) no information about
the class. Buckets with only one class are dropped. If no bucket holds both
classes (e.g. every rollout fails), balancing is impossible and skipped, and
metrics.json says so.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from wmtp.config.schema import CriticSettings
from wmtp.core.checkpoints import load_model
from wmtp.core.sample import generate
from wmtp.data.mutants import mutants
from wmtp.data.prompts import mbpp_prompt, mbpp_solution
from wmtp.data.training import Example, build_examples, collate, read_split, special_prefix
from wmtp.infra.atomic import atomic_file, write_json_atomic
from wmtp.sandbox.runner import Job, run_many
from wmtp.stages.diagnostics import TokenClasses, class_means
from wmtp.stages.value_table import (
    auto_strength,
    compute_values,
    solution_start,
    table_metadata,
    table_values,
    write_value_table,
)

log = logging.getLogger(__name__)

HEAD_FILE = "value_head.safetensors"
METRICS_FILE = "metrics.json"
TABLE_FILE = "values.parquet"
HIGH_REWARD = 0.5  # rewards >= this are the "high" class of length balancing
N_LENGTH_BUCKETS = 4


class ValueHead(nn.Module):
    """Small MLP on the trunk output: LayerNorm -> Linear(D, hidden) -> GELU ->
    Linear(hidden, 1). The LayerNorm makes the head indifferent to the scale of
    the trunk's hidden states, which differs a lot between a tiny and a 7B model."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.dim, self.hidden_dim = dim, hidden_dim
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, S, D) trunk output -> (B, S) values, float32."""
        return self.net(hidden.float()).squeeze(-1)


def save_value_head(head: ValueHead, path: str | Path) -> Path:
    """Atomic safetensors write; the shape lives in the file's metadata."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    meta = {
        "format": "wmtp-value-head",
        "dim": str(head.dim),
        "hidden_dim": str(head.hidden_dim),
    }
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def load_value_head(path: str | Path, device: str | torch.device = "cpu") -> ValueHead:
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if meta.get("format") != "wmtp-value-head":
        raise ValueError(f"{path} is not a value head written by wmtp.stages.critic (metadata {meta})")
    head = ValueHead(int(meta["dim"]), int(meta["hidden_dim"]))
    head.load_state_dict(load_file(str(path)))
    return head.to(device).eval()


def gae_returns(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """GAE(gamma, lambda) returns `(B, S)` over each row's masked span, 0 elsewhere.

    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},
    return_t = A_t + V_t, with V and A after the last masked token taken as 0
    (the episode ends there; a gap in the mask also ends it). With gamma = lam =
    1 and a terminal reward R, every return is R. `values` are treated as
    constants (bootstrapped targets carry no gradient)."""
    values = values.detach().float()  # (B, S)
    rewards = rewards.float()
    mask = mask.bool()
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_adv = torch.zeros_like(values[:, 0])  # (B,)
    advantages = torch.zeros_like(values)  # (B, S)
    for t in range(values.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = torch.where(mask[:, t], delta + gamma * lam * next_adv, torch.zeros_like(delta))
        advantages[:, t] = adv
        next_value = torch.where(mask[:, t], values[:, t], torch.zeros_like(delta))
        next_adv = adv
    return torch.where(mask, advantages + values, torch.zeros_like(values))


@dataclass(frozen=True)
class Rollout:
    """One sampled completion and its reward; `completion_ids` end with EOS."""

    sample_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    reward: float


def sample_completions(
    model, tokenizer, prompts: list[str], settings: CriticSettings, seed: int
) -> list[list[str]]:
    """`settings.samples_per_problem` completions per prompt from the base model
    (wmtp.core.sample.generate: head 0, truncated at stop sequences)."""
    return generate(
        model,
        tokenizer,
        prompts,
        n=settings.samples_per_problem,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        seed=seed,
        progress=True,
    )


def execution_rewards(
    programs: Sequence[str],
    tests: Sequence[Sequence[str]],
    setups: Sequence[str] | None = None,
    *,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    workers: int | None = None,
) -> list[float]:
    """Fraction of each program's tests that pass, every assert run on its own in
    the sandbox (so one failing assert does not hide the others)."""
    setups = setups if setups is not None else [""] * len(programs)
    jobs, owner = [], []
    for i, (program, asserts, setup) in enumerate(zip(programs, tests, setups, strict=True)):
        if not asserts:
            raise ValueError(f"program {i} has no tests; its reward would be undefined")
        for test in asserts:
            jobs.append(
                Job(
                    program=program,
                    tests=f"{setup}\n{test}\n" if setup else f"{test}\n",
                    timeout=timeout,
                    memory_mb=memory_mb,
                )
            )
            owner.append(i)
    outcomes = run_many(jobs, workers=workers, progress=True)
    passed = np.zeros(len(programs))
    for i, outcome in zip(owner, outcomes, strict=True):
        passed[i] += outcome.passed
    return [float(passed[i] / len(tests[i])) for i in range(len(programs))]


@torch.inference_mode()
def reward_model_scores(
    texts: Sequence[str],
    reward_dir: str | Path,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> list[float]:
    """Score decoded prompt + completion texts with an HF sequence classifier:
    sigmoid of the logit for one label, else the probability of label 1 (positive)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(reward_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir)).to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    scores: list[float] = []
    for first in tqdm(range(0, len(texts), batch_size), desc="reward model", unit="batch"):
        enc = tokenizer(
            list(texts[first : first + batch_size]),
            return_tensors="pt",
            padding=True,
            truncation=True,
        ).to(device)
        logits = model(**enc).logits.float()  # (B, n_labels)
        probs = (
            torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, -1)[:, 1]
        )
        scores.extend(probs.tolist())
    return scores


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def select_rollouts(
    rollouts: Sequence[Rollout], max_per_problem: int, length_balance: bool, seed: int
) -> tuple[list[Rollout], dict]:
    """Cap each problem at `max_per_problem` (alternating high and low rewards so
    the cap keeps contrast) and, with `length_balance`, match high- and
    low-reward length distributions bucket by bucket (module docstring). Returns
    the kept rollouts in input order and statistics for metrics.json."""
    rng = np.random.default_rng(seed)
    by_problem: dict[str, list[int]] = {}
    for i, rollout in enumerate(rollouts):
        by_problem.setdefault(rollout.sample_id, []).append(i)
    capped: list[int] = []
    for indices in by_problem.values():
        high = [i for i in indices if rollouts[i].reward >= HIGH_REWARD]
        low = [i for i in indices if rollouts[i].reward < HIGH_REWARD]
        rng.shuffle(high)
        rng.shuffle(low)
        interleaved = [i for pair in zip(high, low, strict=False) for i in pair]
        rest = high[len(low) :] if len(high) > len(low) else low[len(high) :]
        capped.extend((interleaved + rest)[:max_per_problem])
    capped.sort()
    lengths = np.array([len(rollouts[i].completion_ids) for i in capped])
    is_high = np.array([rollouts[i].reward >= HIGH_REWARD for i in capped], dtype=bool)
    stats = {"n_after_cap": len(capped), "length_balance_applied": False}
    kept = capped
    if length_balance and is_high.any() and (~is_high).any():
        edges = np.unique(np.quantile(lengths, np.linspace(0, 1, N_LENGTH_BUCKETS + 1)[1:-1]))
        bucket = np.searchsorted(edges, lengths, side="right")
        chosen = []
        for b in np.unique(bucket):
            high = np.flatnonzero((bucket == b) & is_high)
            low = np.flatnonzero((bucket == b) & ~is_high)
            k = min(len(high), len(low))
            chosen.extend(
                rng.choice(high, k, replace=False).tolist()
                + rng.choice(low, k, replace=False).tolist()
            )
        if chosen:
            kept = [capped[i] for i in sorted(chosen)]
            stats.update(length_balance_applied=True, length_bucket_edges=edges.tolist())
        else:
            log.warning("length balancing impossible: no length bucket holds both reward classes")
    elif length_balance:
        log.warning("length balancing skipped: all rollouts are in one reward class")
    kept_rollouts = [rollouts[i] for i in kept]
    stats["n_kept"] = len(kept_rollouts)
    stats["length_reward_corr_before"] = _pearson(
        [len(r.completion_ids) for r in rollouts], [r.reward for r in rollouts]
    )
    stats["length_reward_corr_after"] = _pearson(
        [len(r.completion_ids) for r in kept_rollouts], [r.reward for r in kept_rollouts]
    )
    return kept_rollouts, stats


@torch.inference_mode()
def rollout_hidden(
    model, rollouts: Sequence[Rollout], batch_size: int, device
) -> list[torch.Tensor]:
    """Frozen trunk output from the last prompt token s0 to the end of each rollout:
    (1 + C_i, D) each, on CPU, row 0 being s0. Computed once, since the base model
    never changes in stage 1."""
    out: list[torch.Tensor] = []
    for first in tqdm(range(0, len(rollouts), batch_size), desc="trunk states", unit="batch"):
        chunk = rollouts[first : first + batch_size]
        seqs = [r.prompt_ids + r.completion_ids for r in chunk]
        batch = collate(
            [Example(r.sample_id, s, [0] * len(s)) for r, s in zip(chunk, seqs, strict=True)],
            pad_id=0,
        ).to(device)
        padded = bool((batch.attention_mask == 0).any())
        mask = batch.attention_mask if padded else None
        hidden = model.trunk(batch.input_ids, mask)[0]  # (B, S, D)
        for b, rollout in enumerate(chunk):
            s0 = len(rollout.prompt_ids) - 1
            out.append(hidden[b, s0 : s0 + 1 + len(rollout.completion_ids)].float().cpu())
    return out


def split_problems(problem_ids: Sequence[str], fraction: float, seed: int) -> set[str]:
    """The held-out problems: a seeded `fraction` of the distinct ids (at least one
    when there are two or more, never all of them)."""
    distinct = sorted(set(problem_ids))
    if len(distinct) < 2:
        return set()
    n = min(max(int(round(fraction * len(distinct))), 1), len(distinct) - 1)
    order = np.random.default_rng([seed, 1]).permutation(len(distinct))
    return {distinct[i] for i in order[:n]}


def monte_carlo_returns(
    hidden_lengths: Sequence[int], rewards: Sequence[float], gamma: float
) -> list[np.ndarray]:
    """Return at each position of each rollout: the final reward discounted by gamma
    per remaining token, gamma^(T-t) R (R itself everywhere when gamma = 1)."""
    return [
        r * gamma ** np.arange(n - 1, -1, -1, dtype=np.float64)
        for n, r in zip(hidden_lengths, rewards, strict=True)
    ]


@torch.no_grad()
def explained_variance(
    head: ValueHead,
    hiddens: Sequence[torch.Tensor],
    rewards: Sequence[float],
    gamma: float,
    device: str | torch.device = "cpu",
) -> float | None:
    """1 - Var(G - V) / Var(G) over every position (s0 included) of the rollouts,
    G the Monte-Carlo returns. 1 = V predicts the returns exactly, 0 = no better
    than their mean, < 0 = worse. None when the returns do not vary (every reward
    equal), where nothing can be explained."""
    if not hiddens:
        return None
    returns = np.concatenate(monte_carlo_returns([h.shape[0] for h in hiddens], rewards, gamma))
    values = np.concatenate(
        [head(h.to(device).unsqueeze(0))[0].cpu().double().numpy() for h in hiddens]
    )
    variance = returns.var()
    if variance <= 1e-12:
        return None
    return float(1.0 - (returns - values).var() / variance)


def fit_value_head(
    hiddens: Sequence[torch.Tensor],
    rewards: Sequence[float],
    settings: CriticSettings,
    seed: int,
    device: str | torch.device = "cpu",
) -> tuple[ValueHead, dict]:
    """Train a value head on fixed (1 + C_i, D) hidden states (s0, then the
    completion) with MSE towards GAE returns (terminal reward at the last token)
    at every position, s0 included, recomputed each step from the current head's
    values. Seeded: same inputs and seed give the same head."""
    torch.manual_seed(seed)
    head = ValueHead(hiddens[0].shape[-1], settings.hidden_dim).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    step_losses, epoch_losses = [], []
    steps_per_epoch = -(-len(hiddens) // settings.batch_size)
    bar = tqdm(total=settings.epochs * steps_per_epoch, desc="value head", unit="step")
    for _ in range(settings.epochs):
        order = torch.randperm(len(hiddens), generator=generator).tolist()
        total, count = 0.0, 0
        for first in range(0, len(order), settings.batch_size):
            chosen = order[first : first + settings.batch_size]
            hidden, mask, reward = _pad([hiddens[i] for i in chosen], [rewards[i] for i in chosen])
            hidden, mask, reward = hidden.to(device), mask.to(device), reward.to(device)
            values = head(hidden)  # (B, C)
            targets = gae_returns(reward, values, mask, settings.gamma, settings.lam)  # (B, C)
            loss = ((values - targets) ** 2)[mask].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_losses.append(loss.item())
            total += loss.item() * int(mask.sum())
            count += int(mask.sum())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        epoch_losses.append(total / count)
    bar.close()
    return head.eval(), {"loss_per_step": step_losses, "loss_per_epoch": epoch_losses}


def _pad(
    hiddens: Sequence[torch.Tensor], rewards: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad completions: hidden (B, C, D), mask (B, C), per-token rewards (B, C)
    with the reward on each row's last token."""
    length = max(h.shape[0] for h in hiddens)
    hidden = torch.zeros((len(hiddens), length, hiddens[0].shape[-1]))  # (B, C, D)
    mask = torch.zeros((len(hiddens), length), dtype=torch.bool)  # (B, C)
    reward = torch.zeros((len(hiddens), length))  # (B, C)
    for b, (h, r) in enumerate(zip(hiddens, rewards, strict=True)):
        hidden[b, : h.shape[0]] = h
        mask[b, : h.shape[0]] = True
        reward[b, h.shape[0] - 1] = r
    return hidden, mask, reward


def _reward_stats(rewards: Sequence[float]) -> dict:
    r = np.asarray(rewards, float)
    if not len(r):
        return {"n": 0}
    return {
        "n": len(r),
        "mean": float(r.mean()),
        "std": float(r.std()),
        "min": float(r.min()),
        "max": float(r.max()),
        "frac_zero": float((r == 0).mean()),
        "frac_one": float((r == 1).mean()),
    }


@dataclass(frozen=True)
class CriticOutputs:
    """The three files of one critic (one seed), all in one directory."""

    head: Path
    metrics: Path
    table: Path


def _problem_rows(rows, settings: CriticSettings, seed: int):
    """The training problems rolled out: all, or a seeded `max_problems` of them."""
    if settings.max_problems is not None and settings.max_problems < len(rows):
        chosen = np.sort(
            np.random.default_rng(seed).permutation(len(rows))[: settings.max_problems]
        )
        rows = rows.iloc[chosen].reset_index(drop=True)
    return rows


def collect_rollouts(
    model,
    tokenizer,
    rows,
    settings: CriticSettings,
    seed: int,
    *,
    max_seq_len: int,
    reward_model_dir: str | Path | None,
    timeout: float,
    memory_mb: int,
    workers: int | None,
    device,
) -> tuple[list[Rollout], list[float], int]:
    """Sample, reward and tokenise: (rollouts that fit `max_seq_len`, every
    sampled completion's reward, the number dropped as too long)."""
    prompts = [
        mbpp_prompt(row.text, list(row.test_list)[0]) for row in rows.itertuples(index=False)
    ]
    completions = sample_completions(model, tokenizer, prompts, settings, seed)
    references = [mbpp_solution(code) for code in rows["code"]]
    if settings.include_references:
        completions = [group + [ref] for group, ref in zip(completions, references, strict=True)]
    if settings.mutants_per_problem:
        completions = [
            group + mutants(ref, settings.mutants_per_problem, random.Random(f"{seed}-{task}"))
            for group, ref, task in zip(completions, references, rows["task_id"], strict=True)
        ]
    flat = [(i, c) for i, group in enumerate(completions) for c in group]
    texts = [prompts[i] + c for i, c in flat]
    if settings.reward == "execution":
        setups = (
            rows["test_setup_code"].fillna("").tolist()
            if "test_setup_code" in rows
            else [""] * len(rows)
        )
        rewards = execution_rewards(
            texts,
            [list(rows["test_list"].iloc[i]) for i, _ in flat],
            [setups[i] for i, _ in flat],
            timeout=timeout,
            memory_mb=memory_mb,
            workers=workers,
        )
    else:
        rewards = reward_model_scores(texts, reward_model_dir, device=device)
    prefix = special_prefix(tokenizer)
    rollouts, too_long = [], 0
    for (i, completion), reward in zip(flat, rewards, strict=True):
        prompt_ids = prefix + tokenizer(prompts[i], add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        completion_ids = completion_ids + [tokenizer.eos_token_id]
        if len(prompt_ids) + len(completion_ids) > max_seq_len:
            too_long += 1
            continue
        rollouts.append(Rollout(str(rows["task_id"].iloc[i]), prompt_ids, completion_ids, reward))
    return rollouts, rewards, too_long


def _value_stats(head: ValueHead, hiddens, rewards, gamma: float, device) -> dict:
    """Explained variance, final-value/reward correlation and V(s0) of some rollouts."""
    with torch.no_grad():
        values = [head(h.to(device).unsqueeze(0))[0].cpu() for h in hiddens]
    return {
        "n_rollouts": len(hiddens),
        "explained_variance": explained_variance(head, hiddens, rewards, gamma, device),
        "final_value_reward_corr": _pearson([float(v[-1]) for v in values], rewards),
        "v_s0_reward_corr": _pearson([float(v[0]) for v in values], rewards),
        "reward": _reward_stats(rewards),
    }


def fit_with_holdout(
    model, rollouts: Sequence[Rollout], settings: CriticSettings, seed: int, device
) -> tuple[ValueHead, dict]:
    """Hold out a seeded share of the problems, select rollouts (cap, length balance)
    in each part, fit the value head on the rest and measure it on both; returns
    the head and its metrics (`explained_variance` is the held-out one)."""
    held_out = split_problems([r.sample_id for r in rollouts], settings.holdout_fraction, seed)
    parts = {}
    for name, chosen in (("fit", False), ("held_out", True)):
        part = [r for r in rollouts if (r.sample_id in held_out) == chosen]
        parts[name] = select_rollouts(
            part, settings.max_samples_per_problem, settings.length_balance, seed
        )
    (fit_part, fit_selection), (test_part, test_selection) = parts["fit"], parts["held_out"]
    if not fit_part:
        raise ValueError(
            f"no rollouts left to train the value head on ({len(rollouts)} rolled out)"
        )
    fit_hidden = rollout_hidden(model, fit_part, settings.batch_size, device)
    fit_rewards = [r.reward for r in fit_part]
    head, curve = fit_value_head(fit_hidden, fit_rewards, settings, seed, device)
    test_hidden = rollout_hidden(model, test_part, settings.batch_size, device)
    test_rewards = [r.reward for r in test_part]
    fit_stats = _value_stats(head, fit_hidden, fit_rewards, settings.gamma, device)
    test_stats = _value_stats(head, test_hidden, test_rewards, settings.gamma, device)
    return head, {
        "explained_variance": test_stats["explained_variance"],
        "n_problems_held_out": len(held_out),
        "n_rollouts_kept": len(fit_part),
        "selection": fit_selection,
        "selection_held_out": test_selection,
        "fit": fit_stats,
        "held_out": test_stats,
        **curve,
    }


def train_critic(
    base_model_dir: str | Path,
    train_path: str | Path,
    settings: CriticSettings,
    seed: int,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    *,
    max_seq_len: int = 512,
    reward_model_dir: str | Path | None = None,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    workers: int | None = None,
) -> CriticOutputs:
    """Stage 1 end to end for one seed (it seeds the problem choice, sampling, the
    hold-out, selection and the head); writes `out_dir/value_head.safetensors`,
    `out_dir/values.parquet` (the value table of every training example, built as
    the trainer builds them) and `out_dir/metrics.json`. Rollouts longer than
    `max_seq_len` (prompt + completion + EOS) are dropped, as training examples are."""
    from transformers import AutoTokenizer

    if settings.reward == "reward_model" and reward_model_dir is None:
        raise ValueError("critic.reward = reward_model needs a reward model directory")
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    train_rows = read_split(train_path)
    examples = build_examples(train_rows, tokenizer, max_seq_len)  # exactly the trainer's
    if not examples:
        raise ValueError(f"{train_path}: no training example fits max_seq_len={max_seq_len}")
    rows = _problem_rows(train_rows, settings, seed)
    model = load_model(base_model_dir, device=device).eval().requires_grad_(False)
    rollouts, rewards, too_long = collect_rollouts(
        model,
        tokenizer,
        rows,
        settings,
        seed,
        max_seq_len=max_seq_len,
        reward_model_dir=reward_model_dir,
        timeout=timeout,
        memory_mb=memory_mb,
        workers=workers,
        device=device,
    )
    head, fit_metrics = fit_with_holdout(model, rollouts, settings, seed, device)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    values = compute_values(
        model, head, examples, pad_id=pad_id, batch_size=settings.batch_size, device=device
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ev = fit_metrics["explained_variance"]
    meta = table_metadata(base_model_dir, tokenizer, len(examples), seed, ev)
    table_path = write_value_table(examples, values, out_dir / TABLE_FILE, meta)
    metrics = {
        "seed": seed,
        "settings": settings.model_dump(mode="json"),
        "explained_variance": ev,
        "auto_strength": auto_strength(ev),
        "n_problems": len(rows),
        "n_rollouts": len(rewards),
        "n_too_long": too_long,
        "reward_all": _reward_stats(rewards),
        **fit_metrics,
        "value_table": table_summary(train_rows, tokenizer, examples, values),
    }
    head_path = save_value_head(head, out_dir / HEAD_FILE)
    metrics_path = out_dir / METRICS_FILE
    write_json_atomic(metrics_path, metrics, sort_keys=False)
    return CriticOutputs(head_path, metrics_path, table_path)


def table_summary(rows, tokenizer, examples, values) -> dict:
    """What the table's deltas do to each kind of solution token (wmtp.stages.diagnostics),
    and V(s0) over the training examples: the first look at a critic's weights."""
    classes = TokenClasses.from_rows(rows, tokenizer, examples)
    deltas, s0 = [], []
    for example, v in zip(examples, values, strict=True):
        start = solution_start(example)
        s0.append(float(v[start - 1]))
        deltas.append(np.concatenate([[np.nan], table_values(np.asarray(v), example.loss_mask)[1]]))
    return {
        "n_samples": len(examples),
        "v_s0": {"mean": float(np.mean(s0)), "std": float(np.std(s0))},
        "mean_delta_by_class": class_means(classes, examples, deltas),
        "mean_abs_delta_by_class": class_means(classes, examples, [np.abs(d) for d in deltas]),
    }
