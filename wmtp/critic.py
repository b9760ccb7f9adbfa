"""Stage 1 of critic-wmtp: a value head on the frozen base model (DESIGN.md section 4).

    rows -> m sampled completions per problem (base model, head 0)
         -> reward per completion (fraction of the problem's tests passed, each
            assert run on its own in the sandbox; or a reward model's score)
         -> cap per problem + length balancing
         -> trunk hidden states of prompt + completion + EOS (frozen base, once)
         -> value head V trained with MSE towards GAE returns on completion tokens

V_j (the value at position j, having seen x_<=j) estimates the reward to come.
In stage 2 the trainer weights token j by delta_j = V_j - V_{j-1}.

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

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from wmtp.atomic import atomic_file, write_text_atomic
from wmtp.config import CriticSettings
from wmtp.data import Example, collate, read_split, special_prefix
from wmtp.prompts import mbpp_prompt, mbpp_solution

log = logging.getLogger(__name__)

HEAD_FILE = "value_head.safetensors"
METRICS_FILE = "metrics.json"
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
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if meta.get("format") != "wmtp-value-head":
        raise ValueError(f"{path} is not a value head written by wmtp.critic (metadata {meta})")
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
    (wmtp.sample.generate: head 0, truncated at stop sequences)."""
    from wmtp.sample import generate

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
    from wmtp.sandbox import Job, run_many

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
def completion_hidden(
    model, rollouts: Sequence[Rollout], batch_size: int, device
) -> list[torch.Tensor]:
    """Frozen trunk output at the completion tokens of each rollout: (C_i, D) each,
    on CPU. Computed once, since the base model never changes in stage 1."""
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
            start = len(rollout.prompt_ids)
            out.append(hidden[b, start : start + len(rollout.completion_ids)].float().cpu())
    return out


def fit_value_head(
    hiddens: Sequence[torch.Tensor],
    rewards: Sequence[float],
    settings: CriticSettings,
    seed: int,
    device: str | torch.device = "cpu",
) -> tuple[ValueHead, dict]:
    """Train a value head on fixed (C_i, D) hidden states with MSE towards GAE
    returns (terminal reward at the last token), recomputed each step from the
    current head's values. Seeded: same inputs and seed give the same head."""
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


def _write_json(payload: dict, path: Path) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


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
) -> tuple[Path, Path]:
    """Stage 1 end to end; writes `out_dir/value_head.safetensors` and
    `out_dir/metrics.json`. Rollouts longer than `max_seq_len` (prompt +
    completion + EOS) are dropped, as training examples are."""
    from transformers import AutoTokenizer

    from wmtp.checkpoints import load_model

    if settings.reward == "reward_model" and reward_model_dir is None:
        raise ValueError("critic.reward = reward_model needs a reward model directory")
    rows = read_split(train_path)
    if settings.max_problems is not None and settings.max_problems < len(rows):
        chosen = np.sort(
            np.random.default_rng(seed).permutation(len(rows))[: settings.max_problems]
        )
        rows = rows.iloc[chosen].reset_index(drop=True)
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    model = load_model(base_model_dir, device=device).eval()
    for param in model.parameters():
        param.requires_grad_(False)

    prompts = [
        mbpp_prompt(row.text, list(row.test_list)[0]) for row in rows.itertuples(index=False)
    ]
    completions = sample_completions(model, tokenizer, prompts, settings, seed)
    if settings.include_references:
        completions = [
            group + [mbpp_solution(code)]
            for group, code in zip(completions, rows["code"], strict=True)
        ]
    flat = [(i, c) for i, group in enumerate(completions) for c in group]
    if settings.reward == "execution":
        setups = (
            rows["test_setup_code"].fillna("").tolist()
            if "test_setup_code" in rows
            else [""] * len(rows)
        )
        rewards = execution_rewards(
            [prompts[i] + c for i, c in flat],
            [list(rows["test_list"].iloc[i]) for i, _ in flat],
            [setups[i] for i, _ in flat],
            timeout=timeout,
            memory_mb=memory_mb,
            workers=workers,
        )
    else:
        rewards = reward_model_scores(
            [prompts[i] + c for i, c in flat], reward_model_dir, device=device
        )

    prefix = special_prefix(tokenizer)
    rollouts, too_long = [], 0
    for (i, completion), reward in zip(flat, rewards, strict=True):
        prompt_ids = prefix + tokenizer(prompts[i], add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        if len(prompt_ids) + len(completion_ids) > max_seq_len:
            too_long += 1
            continue
        rollouts.append(Rollout(str(rows["task_id"].iloc[i]), prompt_ids, completion_ids, reward))
    kept, selection = select_rollouts(
        rollouts, settings.max_samples_per_problem, settings.length_balance, seed
    )
    if not kept:
        raise ValueError(
            f"no rollouts left to train the value head on ({len(flat)} sampled, {too_long} too long)"
        )
    hiddens = completion_hidden(model, kept, settings.batch_size, device)
    kept_rewards = [r.reward for r in kept]
    head, curve = fit_value_head(hiddens, kept_rewards, settings, seed, device)
    with torch.no_grad():
        final_values = [float(head(h.to(device).unsqueeze(0))[0, -1]) for h in hiddens]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {
        "seed": seed,
        "settings": settings.model_dump(mode="json"),
        "n_problems": len(rows),
        "n_rollouts": len(flat),
        "n_too_long": too_long,
        "n_rollouts_kept": len(kept),
        "selection": selection,
        "reward_all": _reward_stats(rewards),
        "reward_kept": _reward_stats(kept_rewards),
        "final_value_reward_corr": _pearson(final_values, kept_rewards),
        **curve,
    }
    head_path = save_value_head(head, out_dir / HEAD_FILE)
    metrics_path = out_dir / METRICS_FILE
    _write_json(metrics, metrics_path)
    return head_path, metrics_path
