"""Is the tiny default a meaningful miniature? Base vs fine-tuned pass@k on tiny-mbpp.

Builds the base and reference models and the benchmark exactly as the download
stage does, fine-tunes the base on the train split the way the trainer does
(plain MTP loss on solution tokens, all weights 1, AdamW, warmup + cosine; one
process, no DeepSpeed), then samples n completions per test problem (temperature
0.8, top-p 0.95) from the base, the fine-tuned model and optionally the reference,
and prints pass@1 / pass@10 and the wall time of every part.

    python benchmarks/tiny_quality.py --out /tmp/tinyq [--steps 300] [--set dim=96 ...]

Sampling and execution are the benchmark's own (a KV-cached sampler; each
program runs in a forked child with an alarm), so it measures the miniature,
not the evaluation stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from wmtp.checkpoints import load_model
from wmtp.data import build_examples, iterate_batches
from wmtp.loss import weighted_mtp_loss
from wmtp.prompts import STOP_SEQUENCES, mbpp_prompt, truncate_at_stop
from wmtp.tiny import build_tiny_base, build_tiny_ref, tiny_knobs, write_tiny_mbpp
from wmtp.tiny_models import lr_at


def finetune(
    model, tokenizer, train_df, *, steps: int, lr: float, batch_size: int, seed: int
) -> list[float]:
    """The trainer's loop without DeepSpeed: weighted MTP loss with w = 1 on the
    solution tokens (prompt masked), AdamW, 10 warmup steps, cosine to 0.1 lr."""
    examples = build_examples(train_df, tokenizer, max_seq_len=512)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batches = iterate_batches(examples, batch_size, seed, tokenizer.pad_token_id)
    model.train()
    losses = []
    for step, batch in tqdm(batches, total=steps, desc="fine-tune"):
        if step >= steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=min(10, steps // 2))
        weights = batch.loss_mask.float()  # (B, S) all ones on valid tokens
        loss = weighted_mtp_loss(
            model, batch.input_ids, batch.loss_mask, weights, batch.attention_mask
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def next_logits(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Last-position logits `(B, V)` of an MTP model (head 0) or an HF causal LM."""
    if hasattr(model, "next_token_logits"):
        return model.next_token_logits(ids, past_key_values=cache)[:, -1]
    return model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompt: str,
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    generator: torch.Generator,
) -> list[str]:
    """n completions of one prompt (one batch of n copies: no padding needed)."""
    from transformers.cache_utils import DynamicCache

    ids = torch.tensor([tokenizer(prompt)["input_ids"]] * n)  # (n, P)
    cache = model.new_cache() if hasattr(model, "new_cache") else DynamicCache(config=model.config)
    logits = next_logits(model, ids, cache)  # (n, V)
    out = torch.empty((n, 0), dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    for step in range(max_new_tokens):
        probs = torch.softmax(logits / temperature, dim=-1)  # (n, V)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) > top_p] = 0
        token = order.gather(1, torch.multinomial(sorted_probs, 1, generator=generator))  # (n, 1)
        token[done] = tokenizer.eos_token_id
        out = torch.cat([out, token], dim=1)
        done |= token[:, 0] == tokenizer.eos_token_id
        if step % 16 == 15:
            texts = tokenizer.batch_decode(out, skip_special_tokens=True)
            done |= torch.tensor([truncate_at_stop(t) != t for t in texts])
        if done.all():
            break
        logits = next_logits(model, token, cache)
    texts = []
    for row in out.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(truncate_at_stop(tokenizer.decode(row), STOP_SEQUENCES))
    return texts


def passes(program: str, tests: list[str], timeout: int = 2) -> bool:
    """Run program + asserts in a forked child with an alarm; True on exit 0.
    Throwaway isolation for a benchmark of our own tiny models' output."""
    pid = os.fork()
    if pid == 0:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            signal.alarm(timeout)
            exec(program + "\n" + "\n".join(tests), {"__name__": "__sample__"})  # noqa: S102
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(
    model, tokenizer, test_df, *, n: int, seed: int, max_new_tokens: int, desc: str
) -> dict:
    generator = torch.Generator().manual_seed(seed)
    correct, lengths = [], []
    for row in tqdm(list(test_df.itertuples(index=False)), desc=desc):
        tests = list(row.test_list)
        completions = sample(
            model,
            tokenizer,
            mbpp_prompt(row.text, tests[0]),
            n=n,
            temperature=0.8,
            top_p=0.95,
            max_new_tokens=max_new_tokens,
            generator=generator,
        )
        correct.append(sum(passes(c, tests) for c in completions))
        lengths.extend(len(c) for c in completions)
    return {
        "pass@1": sum(pass_at_k(n, c, 1) for c in correct) / len(correct),
        "pass@10": sum(pass_at_k(n, c, min(10, n)) for c in correct) / len(correct),
        "mean_chars": sum(lengths) / len(lengths),
    }


def parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for the built models and data"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    parser.add_argument("--lr", type=float, default=2e-3, help="fine-tuning peak learning rate")
    parser.add_argument("--batch-size", type=int, default=8, help="fine-tuning batch size")
    parser.add_argument("--n", type=int, default=10, help="samples per test problem")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--reuse", action="store_true", help="reuse models already in --out")
    parser.add_argument("--eval-ref", action="store_true", help="also evaluate the reference model")
    parser.add_argument("--skip-ref", action="store_true", help="do not build the reference model")
    parser.add_argument(
        "--max-problems", type=int, default=None, help="evaluate the first N test problems"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=JSON", help="tiny settings overrides"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = parse_overrides(args.set)
    print("tiny settings:", json.dumps(tiny_knobs(**overrides)), flush=True)

    times, results = {}, {}
    builds = (("base", build_tiny_base),) + (() if args.skip_ref else (("ref", build_tiny_ref),))
    for name, build in builds:
        if not (args.reuse and (args.out / name).exists()):
            start = time.time()
            build(args.out / name, seed=args.seed, **overrides)
            times[f"build_{name}"] = time.time() - start
    start = time.time()
    write_tiny_mbpp(args.out / "data", seed=args.seed, **overrides)
    times["write_tiny_mbpp"] = time.time() - start

    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.out / "base")
    train_df = pd.read_parquet(args.out / "data" / "train.parquet")
    test_df = pd.read_parquet(args.out / "data" / "test.parquet").head(args.max_problems)
    model = load_model(args.out / "base")
    start = time.time()
    results["base"] = evaluate(
        model,
        tokenizer,
        test_df,
        n=args.n,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        desc="eval base",
    )
    times["eval_base"] = time.time() - start
    if args.eval_ref:
        ref = AutoModelForCausalLM.from_pretrained(args.out / "ref").eval()
        start = time.time()
        results["ref"] = evaluate(
            ref,
            tokenizer,
            test_df,
            n=args.n,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            desc="eval ref",
        )
        times["eval_ref"] = time.time() - start
    torch.manual_seed(args.seed)
    start = time.time()
    losses = finetune(
        model,
        tokenizer,
        train_df,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    times["finetune"] = time.time() - start
    start = time.time()
    results["finetuned"] = evaluate(
        model,
        tokenizer,
        test_df,
        n=args.n,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        desc="eval fine-tuned",
    )
    times["eval_finetuned"] = time.time() - start
    results["finetune_loss_first_last"] = [sum(losses[:10]) / 10, sum(losses[-10:]) / 10]
    print(
        json.dumps(
            {"results": results, "seconds": {k: round(v, 1) for k, v in times.items()}}, indent=2
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
