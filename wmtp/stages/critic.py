"""Stage 1 of critic-wmtp: Monte-Carlo values of the gold solutions on the frozen base, and the gate (docs/design.md).

    training examples (the trainer's own, wmtp.data.training.build_examples)
      -> each cut at its line ends (wmtp.stages.critic_mc.solution_lines)
      -> a seeded `max_problems` of them valued by Monte Carlo: K continuations
         per boundary from the frozen base, executed in the sandbox; a boundary's
         value is their pass rate, a line's delta the value after it minus the
         value before it (VinePPO; Math-Shepherd)
      -> the other problems, if any: with `value_head`, a head fitted to those
         values (frozen trunk state at each boundary -> value) predicts their
         boundaries' values; without, their tokens get delta 0
      -> the value table (wmtp.stages.value_table): every token of a line gets
         that line's delta
      -> the gate (wmtp.stages.critic_gate): on `gate_problems` of the valued
         problems (the training split's: never validation or test), Spearman's rho of the table's per-line deltas against a fresh
         Monte-Carlo estimate from other samples (and, with a head, of the head's
         deltas, the gate problems never being fitted) -> lambda of `strength: auto`

Why Monte Carlo on the gold solutions: training weights the tokens of the gold
solutions, so that is where the values are needed, and a pass rate of the base's
own continuations is an estimate of the value with no model in between (the
earlier value head, fitted on the base's rollouts and read on gold solutions,
was judged by the explained variance of returns, which problem difficulty alone
can earn). Each training seed has its own critic (the seed fixes its sampling and
its choice of problems), so the critic's sampling noise is inside the seeds'
interval, as it was for the value-head critic; the gate measures how much of it
the weights carry.

Why a line's delta goes to every token of the line: the line is the unit that
was valued (VinePPO gives each token of a step the step's advantage), and
normalise() z-scores the deltas, so a line whose completion decides the tests
gets its whole text weighted up, not one newline token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from wmtp.config.schema import CriticSettings
from wmtp.core.checkpoints import load_model
from wmtp.data.training import Example, build_examples, collate, read_split
from wmtp.infra.atomic import write_json_atomic
from wmtp.stages import critic_mc
from wmtp.stages.critic_gate import gate_statistic
from wmtp.stages.critic_mc import Estimate, Judge, Solution
from wmtp.stages.diagnostics import TokenClasses, class_means
from wmtp.stages.value_table import auto_strength, table_metadata, write_value_table

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
TABLE_FILE = "values.parquet"
FRESH_SEED_OFFSET = 1  # the gate's fresh estimate samples with the seed + this


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
        """(..., D) trunk output -> (...) values, float32."""
        return self.net(hidden.float()).squeeze(-1)


@dataclass(frozen=True)
class CriticOutputs:
    """The critic's two files, in one directory."""

    metrics: Path
    table: Path


def choose_problems(n: int, settings: CriticSettings, seed: int) -> tuple[list[int], list[int]]:
    """(valued, gate): the seeded `max_problems` of n examples valued by Monte Carlo
    (all when None) and the `gate_problems` of those the gate re-estimates."""
    order = np.random.default_rng([seed, 0]).permutation(n)
    valued = order if settings.max_problems is None else order[: settings.max_problems]
    gate = valued[: min(settings.gate_problems, len(valued))]
    return sorted(int(i) for i in valued), sorted(int(i) for i in gate)


def reward_model_judge(reward_dir: str | Path, device) -> Judge:
    """A reward model's score of the prompt and program, instead of execution."""

    def judge(programs: Sequence[str], owners: Sequence[Solution]) -> list[float]:
        texts = [o.prompt_text + p for p, o in zip(programs, owners, strict=True)]
        return reward_model_scores(texts, reward_dir, device=device)

    return judge


@torch.inference_mode()
def reward_model_scores(
    texts: Sequence[str],
    reward_dir: str | Path,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> list[float]:
    """Score texts with an HF sequence classifier: sigmoid of the logit for one
    label, else the probability of label 1 (positive)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(reward_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir)).to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    scores: list[float] = []
    for first in tqdm(range(0, len(texts), batch_size), desc="reward model", unit="batch"):
        enc = tokenizer(
            list(texts[first : first + batch_size]), return_tensors="pt", padding=True, truncation=True
        ).to(device)
        logits = model(**enc).logits.float()  # (B, n_labels)
        probs = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, -1)[:, 1]
        scores.extend(probs.tolist())
    return scores


class Timer:
    """Seconds spent per phase, for metrics.json (the stage's cost, docs/tiny.md)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

        return timed


def monte_carlo(
    model, tokenizer, solutions: Sequence[Solution], settings: CriticSettings, *,
    rollouts: int, seed: int, judge: Judge, timer: Timer,
) -> Estimate:
    """Values of every boundary of `solutions` from `rollouts` continuations each."""

    def continuations(prompts: list[str]) -> list[list[str]]:
        return critic_mc.sample_continuations(
            model, tokenizer, prompts, rollouts=rollouts, temperature=settings.temperature,
            top_p=settings.top_p, max_new_tokens=settings.max_new_tokens, seed=seed,
            batch_size=settings.batch_size,
        )  # fmt: skip

    return critic_mc.estimate_values(
        solutions, timer.wrap("sampling", continuations), timer.wrap("judging", judge), tokenizer
    )


@torch.inference_mode()
def boundary_states(model, solutions: Sequence[Solution], pad_id: int, batch_size: int, device) -> list[torch.Tensor]:
    """Frozen trunk output at every boundary of each solution, (n_boundaries, D) on
    CPU: at the last token of the boundary's prefix (s0: the last prompt token;
    the end: EOS)."""
    out: list[torch.Tensor] = []
    for first in range(0, len(solutions), batch_size):
        chunk = solutions[first : first + batch_size]
        batch = collate([s.example for s in chunk], pad_id).to(device)
        padded = bool((batch.attention_mask == 0).any())
        hidden = model.trunk(batch.input_ids, batch.attention_mask if padded else None)[0]  # (B, S, D)
        for b, solution in enumerate(chunk):
            positions = [solution.start - 1 + k for k in solution.boundaries]
            out.append(hidden[b, positions].float().cpu())
    return out


def fit_boundary_head(
    states: Sequence[torch.Tensor], values: Sequence[np.ndarray], settings: CriticSettings, seed: int
) -> tuple[ValueHead, list[float]]:
    """A value head fitted (MSE, full batch, seeded) to the Monte-Carlo values of the
    boundaries whose frozen-trunk states are `states`; returns it and its loss per epoch."""
    torch.manual_seed(seed)
    x = torch.cat(list(states))  # (N, D)
    y = torch.from_numpy(np.concatenate(values)).float()  # (N,)
    head = ValueHead(x.shape[-1], settings.head_hidden_dim)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.head_lr, weight_decay=0.0)
    losses = []
    for _ in tqdm(range(settings.head_epochs), desc="value head", unit="epoch"):
        loss = ((head(x) - y) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return head.eval(), losses


def head_values(head: ValueHead, states: Sequence[torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        return [head(s).double().numpy() for s in states]


def _value_stats(solutions: Sequence[Solution], values: Sequence[np.ndarray]) -> dict:
    if not values:
        return {"n_problems": 0}
    deltas = np.concatenate([np.diff(v) for v in values])
    return {
        "n_problems": len(values),
        "n_lines": int(len(deltas)),
        "v_s0_mean": float(np.mean([v[0] for v in values])),
        "gold_pass_rate": float(np.mean([v[-1] for v in values])),
        "mean_abs_line_delta": float(np.abs(deltas).mean()),
        "share_lines_nonzero": float((deltas != 0).mean()),
        "mean_lines_per_problem": float(np.mean([s.n_segments for s in solutions])),
    }


def gate(
    table_deltas: Sequence[np.ndarray], fresh: Estimate, head_deltas: Sequence[np.ndarray] | None,
    settings: CriticSettings,
    seed: int,
) -> tuple[dict, dict | None, float]:
    """The gate record of the table's Monte-Carlo deltas, that of the head's deltas
    (None without a head) and lambda: the smaller of their auto_strength, since the
    one lambda scales the weights from both sources."""
    kwargs = {"n_resamples": settings.gate_resamples, "seed": seed}
    fresh_deltas = fresh.line_deltas()
    mc = gate_statistic(list(table_deltas), fresh_deltas, **kwargs)
    lam = gate_strength(mc)
    head = None
    if head_deltas is not None:
        head = gate_statistic(list(head_deltas), fresh_deltas, **kwargs)
        lam = min(lam, gate_strength(head))
    return mc, head, lam


def gate_strength(record: dict) -> float:
    """lambda of one gate record: auto_strength of rho and its interval; 0 without an
    interval (fewer than two gate problems with lines to rank): a rho nothing can
    tell from noise moves no weight."""
    if record["interval"] is None:
        return 0.0
    return auto_strength(record["value"], record["interval"])


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
    """Stage 1 end to end (module docstring); writes `out_dir/values.parquet` (the table
    of every training example, built as the trainer builds them) and
    `out_dir/metrics.json` (the gate, lambda, the values' statistics, the cost)."""
    from transformers import AutoTokenizer

    if settings.reward == "reward_model" and reward_model_dir is None:
        raise ValueError("critic.reward = reward_model needs a reward model directory")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    train_rows = read_split(train_path)
    examples = build_examples(train_rows, tokenizer, max_seq_len)  # exactly the trainer's
    if not examples:
        raise ValueError(f"{train_path}: no training example fits max_seq_len={max_seq_len}")
    rows = {str(r.task_id): r for r in train_rows.itertuples(index=False)}
    solutions = [
        critic_mc.solution_lines(tokenizer, e, rows[e.sample_id], settings.max_lines) for e in examples
    ]
    valued, gated = choose_problems(len(solutions), settings, seed)
    model = load_model(base_model_dir, device=device).eval().requires_grad_(False)
    judge = (
        reward_model_judge(reward_model_dir, device)
        if settings.reward == "reward_model"
        else critic_mc.execution_judge(timeout=timeout, memory_mb=memory_mb, workers=workers)
    )
    timer, gate_timer = Timer(), Timer()
    estimate = monte_carlo(
        model, tokenizer, [solutions[i] for i in valued], settings,
        rollouts=settings.rollouts, seed=seed, judge=judge, timer=timer,
    )  # fmt: skip
    values = dict(zip(valued, estimate.values, strict=True))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rest = [i for i in range(len(solutions)) if i not in values]
    head_part, head_gate_deltas = {}, None
    if rest and settings.value_head:
        head_part, head_gate_deltas = _head_predictions(
            model, solutions, values, rest, gated, settings, seed, pad_id, device
        )
    fresh = monte_carlo(
        model, tokenizer, [solutions[i] for i in gated], settings, rollouts=settings.gate_rollouts,
        seed=seed + FRESH_SEED_OFFSET, judge=judge, timer=gate_timer,
    )  # fmt: skip
    gate_mc, gate_head, lam = gate(
        [np.diff(values[i]) for i in gated], fresh, head_gate_deltas, settings, seed
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    token_value, token_delta = _table_columns(solutions, {**values, **head_part.get("values", {})})
    meta = table_metadata(
        base_model_dir, tokenizer, len(examples), seed, gate_mc["value"],
        gate={"monte_carlo": gate_mc, "head": gate_head}, strength=lam,
    )  # fmt: skip
    table_path = write_value_table(examples, token_value, out_dir / TABLE_FILE, meta, deltas=token_delta)
    metrics = {
        "seed": seed,
        "settings": settings.model_dump(mode="json"),
        "gate": gate_mc,
        "gate_head": gate_head,
        "auto_strength": lam,
        "n_examples": len(examples),
        "n_valued": len(valued),
        "n_head": len(head_part.get("values", {})),
        "n_zero": len(rest) - len(head_part.get("values", {})),
        "n_prompts": estimate.n_prompts,
        "n_continuations": estimate.n_continuations,
        "n_gate_continuations": fresh.n_continuations,
        "n_prefix_mismatch": estimate.n_prefix_mismatch,
        "values": _value_stats([solutions[i] for i in valued], estimate.values),
        "gate_fresh_values": _value_stats([solutions[i] for i in gated], fresh.values),
        "head": head_part.get("stats"),
        "seconds": {
            **{k: round(v, 2) for k, v in timer.seconds.items()},
            **{f"gate_{k}": round(v, 2) for k, v in gate_timer.seconds.items()},
            "total": round(time.perf_counter() - started, 2),
        },
        "value_table": table_summary(train_rows, tokenizer, examples, token_value, token_delta),
    }
    metrics_path = out_dir / METRICS_FILE
    write_json_atomic(metrics_path, metrics, sort_keys=False)
    log.info("critic: gate %s, auto strength %.3f", gate_mc, lam)
    return CriticOutputs(metrics_path, table_path)


def _head_predictions(model, solutions, values, rest, gated, settings, seed, pad_id, device):
    """Fit a value head on the valued problems but the gate's, predict the
    boundaries of the `rest` and of the gate problems (for the gate)."""
    fit = [i for i in values if i not in set(gated)]
    if not fit:
        raise ValueError("critic.value_head: no valued problem is left to fit it on (all are gate problems)")
    states = boundary_states(model, solutions, pad_id, settings.batch_size, device)
    head, losses = fit_boundary_head([states[i] for i in fit], [values[i] for i in fit], settings, seed)
    predicted = dict(zip(rest, head_values(head, [states[i] for i in rest]), strict=True))
    gate_deltas = [np.diff(v) for v in head_values(head, [states[i] for i in gated])]
    stats = {"n_fitted": len(fit), "loss_first": losses[0], "loss_last": losses[-1]}
    return {"values": predicted, "stats": stats}, gate_deltas


def _table_columns(
    solutions: Sequence[Solution], values: dict[int, np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-position (value, delta) of every example (critic_mc.token_values / token_deltas);
    an example with no value gets delta 0 on every solution token and no value."""
    token_value, token_delta = [], []
    for i, solution in enumerate(solutions):
        if i in values:
            token_value.append(critic_mc.token_values(solution, values[i]))
            token_delta.append(critic_mc.token_deltas(solution, np.diff(values[i])))
        else:
            token_value.append(np.full(len(solution.example.input_ids), np.nan, dtype=np.float32))
            token_delta.append(critic_mc.token_deltas(solution, np.zeros(solution.n_segments)))
    return token_value, token_delta


def table_summary(rows, tokenizer, examples: Sequence[Example], values, deltas) -> dict:
    """What the table's deltas do to each kind of solution token (wmtp.stages.diagnostics),
    and V(s0) over the examples that have one: the first look at a critic's weights."""
    classes = TokenClasses.from_rows(rows, tokenizer, examples)
    s0 = [float(v[e.loss_mask.index(1) - 1]) for e, v in zip(examples, values, strict=True)]
    s0 = [v for v in s0 if np.isfinite(v)]
    return {
        "n_samples": len(examples),
        "v_s0": {"mean": float(np.mean(s0)), "std": float(np.std(s0))} if s0 else None,
        "mean_delta_by_class": class_means(classes, examples, list(deltas)),
        "mean_abs_delta_by_class": class_means(classes, examples, [np.abs(d) for d in deltas]),
    }
