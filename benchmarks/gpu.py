"""GPU figures, no network needed: DeepSpeed bf16 training of a ~1B MTP model
(tokens/s, model FLOPs utilisation), the loss's peak memory at 7B-like shapes
against next-token CE, and decoding speed (greedy, self-speculative greedy, plain
and speculative sampling).

    python benchmarks/gpu.py                      # one GPU, every section (~10 min)
    python benchmarks/gpu.py --only train memory  # some sections
    python benchmarks/gpu.py --toy                # toy sizes on the CPU (what the tests run)

Sections:

- `train`: a randomly initialised MTP model (default dim 2048, 16 trunk blocks + 4
  heads, vocab 32000: 1.1 B parameters) trained with `deepspeed.initialize` on one
  device (ZeRO stage 1, bf16, AdamW), `--micro-batch` sequences of `--seq` random
  tokens per step and the weighted MTP loss with all weights 1 (`wmtp.core.loss`, as
  the trainer runs it). Reports tokens/s over the timed steps (after warm-up), peak
  memory and MFU = model FLOPs per token x tokens/s / peak bf16 FLOP/s. Model
  FLOPs per token: 6 x (block parameters + H x the unembedding, which every head
  runs) + 12 x blocks x dim x seq (attention scores and values, PaLM's appendix B
  convention), so MFU counts the work the MTP objective does, not recomputation.
  The peak is looked up from the device name (`PEAK_BF16_TFLOPS`) or given with
  `--peak-tflops`.
- `memory`: peak memory of one forward + backward of the loss at dim 4096, vocab
  32000, seq 2048, H = 4 (bf16 weights, `--memory-trunk-layers` trunk blocks: the
  heads and logits are what differ between losses), for next-token CE of head 0,
  the weighted MTP loss and the naive all-heads loss (the variants of
  `benchmarks/loss_memory.py`). On a GPU: `torch.cuda.max_memory_allocated`
  above the model, batch and nothing else; on a CPU only the step time is shown.
- `decode`: `benchmarks/speculative.py` on the device (its model trained there),
  and the cost of one speculative forward (H tokens through the trunk, all heads)
  in plain decoding steps for the ~1B model at batch 1 and 16: the figure that
  bounds the speed-up of self-speculative decoding at that scale.
- `sampling`: the evaluation's sampling through both engines (`eval.engine` own and
  vllm; benchmarks/vllm_throughput.py's measurement) on randomly initialised MTP
  models at 1B and 7B shapes (`--sampling-shapes`: dim x trunk blocks, 4 heads,
  bf16 on a GPU), tiny-mbpp test prompts, temperature 0.8, top-p 0.95, n of
  `--sampling-ns`, `--sampling-new-tokens` new tokens (a random model rarely ends
  a completion early, so every sample is about that long). The vocabulary is a
  byte-level BPE of `--sampling-vocab` tokens trained on the standard library's
  source (no hub tokenizer offline), so the unembedding is smaller than Llama's
  32k at that setting's default. vLLM from `--vllm-python`; without it only our
  sampler's row is shown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from wmtp.core.loss import weighted_mtp_loss
from wmtp.core.model import MTPConfig, MTPModel

# Dense bf16 peak of one device, TFLOP/s (vendor data sheets), by device-name substring.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
SECTIONS = ("train", "memory", "decode", "sampling")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mtp_config(dim: int, trunk_layers: int, heads: int, vocab: int, seq: int) -> MTPConfig:
    return MTPConfig(
        dim=dim, n_layers=trunk_layers + heads, n_heads=max(1, dim // 128),
        vocab_size=vocab, n_future_tokens=heads, multiple_of=256 if dim >= 1024 else 32,
        max_seq_len=seq,
    )  # fmt: skip


def flops_per_token(config: MTPConfig, seq: int) -> float:
    """Model FLOPs of one training token (forward + backward), see the docstring."""
    dim, ffn = config.dim, config.ffn_hidden_dim
    kv = config.kv_heads * dim // config.n_heads
    block = 2 * dim * dim + 2 * dim * kv + 3 * dim * ffn  # q, o; k, v; gate, up, down
    unembed = config.vocab_size * dim
    return 6 * (config.n_layers * block + config.n_future_tokens * unembed) + (
        12 * config.n_layers * dim * seq
    )


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def bench_train(args, device: torch.device) -> dict:
    """DeepSpeed bf16 training steps of a random MTP model; tokens/s and MFU."""
    import deepspeed

    from wmtp.stages.train import _init_distributed

    _init_distributed(device.type)
    config = mtp_config(args.dim, args.trunk_layers, args.heads, args.vocab, args.seq)
    model = MTPModel(config)
    model.init_weights(args.seed)
    ds_config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config
    )
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.micro_batch, args.seq)
    times, losses = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, args.vocab, shape, generator=generator).to(engine.device)
        synchronize(engine.device)
        started = time.perf_counter()
        loss = weighted_mtp_loss(engine.module, ids, torch.ones_like(ids), torch.ones(shape, device=engine.device))
        engine.backward(loss)
        engine.step()
        synchronize(engine.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
            losses.append(loss.item())
    tokens_per_s = args.micro_batch * args.seq / statistics.median(times)
    peak = peak_tflops(device, args.peak_tflops)
    flops = flops_per_token(config, args.seq)
    return {
        "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
        "tokens_per_s": tokens_per_s,
        "step_s": statistics.median(times),
        "tflops": flops * tokens_per_s / 1e12,
        "mfu": flops * tokens_per_s / (peak * 1e12) if peak else None,
        "peak_tflops": peak,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "loss": losses[-1],
    }


def bench_memory(args, device: torch.device) -> dict:
    """Peak memory and time of one loss step per variant of benchmarks/loss_memory.py."""
    from loss_memory import LOSSES  # the sibling benchmark script (benchmarks/ is on sys.path)

    config = mtp_config(args.memory_dim, args.memory_trunk_layers, args.memory_heads,
                        args.memory_vocab, args.memory_seq)  # fmt: skip
    model = MTPModel(config)
    model.init_weights(args.seed)
    model.to(device=device, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.memory_vocab, (1, args.memory_seq), generator=generator).to(device)
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    weights = torch.ones(ids.shape, device=device)
    rows = {}
    for name, loss_fn in LOSSES.items():
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        synchronize(device)
        started = time.perf_counter()
        loss_fn(model, ids, loss_mask, weights).backward()
        synchronize(device)
        seconds = time.perf_counter() - started
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
        rows[name] = {"peak_gb": peak, "step_s": seconds}
    return rows


def bench_forward_cost(args, device: torch.device) -> dict:
    """ms of a plain decoding step and of a speculative forward (H tokens, all heads,
    drafts picked) of the random train-size model, batch 1 and 16, in bf16."""
    from wmtp.core.sample import _Decoder

    config = mtp_config(args.dim, args.trunk_layers, args.heads, args.vocab, args.seq)
    model = MTPModel(config)
    model.init_weights(args.seed)
    model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    prompt = torch.randint(0, args.vocab, (args.decode_prompt,)).tolist()
    rows = {}
    for batch in (1, args.decode_batch):
        costs = {}
        for draft in (False, True):
            decoder = _Decoder(model, draft)
            seq = decoder.n_draft + 1
            with torch.inference_mode():
                decoder.start([prompt] * batch, len(prompt) + seq * (args.decode_steps + 8), 0)
                decoder.forward(torch.tensor([prompt] * batch, device=device), last_only=True)
                decoder.commit(None, [len(prompt)])
                fed = torch.randint(0, args.vocab, (batch, seq), device=device)
                keep = torch.full((batch,), seq, device=device)
                times = []
                for _ in range(args.decode_steps):
                    synchronize(device)
                    started = time.perf_counter()
                    logits = decoder.forward(fed)
                    if draft:
                        decoder.draft_logits(keep - 1).argmax(-1)
                    logits.argmax(-1).tolist()
                    synchronize(device)
                    times.append(time.perf_counter() - started)
                    decoder.commit(keep, [seq])
            costs[draft] = statistics.median(times[len(times) // 4 :]) * 1e3
        rows[batch] = {"plain_ms": costs[False], "speculative_ms": costs[True],
                       "cost_in_plain_steps": costs[True] / costs[False]}  # fmt: skip
    return rows


def sampling_model(dim: int, trunk_layers: int, vocab: int, seed: int, out, device) -> None:
    """A random MTP model of that shape with a `vocab`-token BPE, saved at `out`."""
    from wmtp.core.checkpoints import save_model
    from wmtp.tiny.models import train_tokenizer

    tokenizer = train_tokenizer([open(os.__file__, encoding="utf-8").read() * 4], vocab)
    config = mtp_config(dim, trunk_layers, 4, len(tokenizer), 1024)
    model = MTPModel(config)
    model.init_weights(seed)
    if device.type == "cuda":
        model.to(dtype=torch.bfloat16)
    save_model(model, out, tokenizer)


def bench_sampling(args, device: torch.device) -> list[dict]:
    """benchmarks/vllm_throughput.py's rows for each shape of `--sampling-shapes`."""
    import tempfile
    from pathlib import Path

    from vllm_throughput import run_engine

    from wmtp.config.schema import EvalSettings
    from wmtp.data.problems import load_benchmark
    from wmtp.tiny.build import write_tiny_mbpp_split

    engines = ["own"] + (["vllm"] if os.path.exists(args.vllm_python) else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_tiny_mbpp_split(Path(tmp) / "test.parquet", "test")
        for shape in args.sampling_shapes:
            dim, trunk = map(int, shape.split("x"))
            model_dir = Path(tmp) / f"random-{shape}"
            sampling_model(dim, trunk, args.sampling_vocab, args.seed, model_dir, device)
            for n, count in zip(args.sampling_ns, args.sampling_problems, strict=True):
                settings = EvalSettings(
                    n_samples=n, temperature=0.8, max_new_tokens=args.sampling_new_tokens,
                    batch_size=args.sampling_batch, ks={"tiny-mbpp": [1]}, vllm_python=args.vllm_python,
                )  # fmt: skip
                problems = load_benchmark("tiny-mbpp", data)[:count]
                measured = {e: run_engine(e, model_dir, problems, settings, device=str(device)) for e in engines}
                rows.append({"shape": shape, "n": n, "problems": count, **measured})
    return rows


def report(results: dict, args) -> None:
    if "train" in results:
        r = results["train"]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (no peak known: --peak-tflops)"
        memory = f"{r['peak_memory_gb']:.1f} GiB" if r["peak_memory_gb"] is not None else "n/a"
        print(
            f"\n## train: {r['params_b']:.2f} B params (dim {args.dim}, {args.trunk_layers} trunk "
            f"blocks + {args.heads} heads, vocab {args.vocab}), micro-batch {args.micro_batch} x "
            f"seq {args.seq}, DeepSpeed ZeRO-1 bf16\n"
            f"tokens/s {r['tokens_per_s']:.0f}   step {r['step_s']:.3f} s   model TFLOP/s "
            f"{r['tflops']:.1f}   MFU {mfu}   peak memory {memory}   loss {r['loss']:.3f}"
        )
    if "memory" in results:
        rows = results["memory"]
        print(
            f"\n## memory: one loss step at dim {args.memory_dim}, vocab {args.memory_vocab}, seq "
            f"{args.memory_seq}, H {args.memory_heads}, {args.memory_trunk_layers} trunk blocks, bf16"
        )
        print(f"{'loss':<12}{'peak GiB':>10}{'x plain-ce':>11}{'step s':>9}")
        base = rows["plain-ce"]["peak_gb"]
        for name, row in rows.items():
            peak = row["peak_gb"]
            cells = (f"{peak:>10.2f}{peak / base:>11.2f}" if peak is not None else f"{'n/a':>10}{'':>11}")
            print(f"{name:<12}{cells}{row['step_s']:>9.3f}")
    if "sampling" in results:
        print("\n## sampling: decoded tokens/s (wall s of the call, vLLM's engine start included)")
        print(f"{'shape':>10}{'n':>6}{'problems':>10}{'own':>22}{'vllm':>22}")
        for row in results["sampling"]:
            cells = [f"{row[e]['tokens_per_s']:>12.0f} ({row[e]['wall_s']:>6.0f} s)" if e in row else f"{'n/a':>22}"
                     for e in ("own", "vllm")]  # fmt: skip
            print(f"{row['shape']:>10}{row['n']:>6}{row['problems']:>10}{cells[0]}{cells[1]}")
    if "forward_cost" in results:
        print(f"\n## decode: one forward of the train-size model ({args.heads} heads), ms")
        print(f"{'batch':>6}{'plain step':>12}{'speculative':>13}{'cost/fwd':>10}")
        for batch, row in results["forward_cost"].items():
            print(f"{batch:>6}{row['plain_ms']:>12.2f}{row['speculative_ms']:>13.2f}"
                  f"{row['cost_in_plain_steps']:>10.2f}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--toy", action="store_true", help="tiny shapes, CPU allowed (tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak")
    parser.add_argument("--seed", type=int, default=0)
    group = parser.add_argument_group("train (and the decode section's forward cost)")
    group.add_argument("--dim", type=int, default=2048)
    group.add_argument("--trunk-layers", type=int, default=16)
    group.add_argument("--heads", type=int, default=4)
    group.add_argument("--vocab", type=int, default=32000)
    group.add_argument("--seq", type=int, default=2048)
    group.add_argument("--micro-batch", type=int, default=4)
    group.add_argument("--warmup", type=int, default=3)
    group.add_argument("--steps", type=int, default=10)
    group = parser.add_argument_group("memory")
    group.add_argument("--memory-dim", type=int, default=4096)
    group.add_argument("--memory-vocab", type=int, default=32000)
    group.add_argument("--memory-seq", type=int, default=2048)
    group.add_argument("--memory-heads", type=int, default=4)
    group.add_argument("--memory-trunk-layers", type=int, default=2)
    group = parser.add_argument_group("sampling")
    group.add_argument("--sampling-shapes", nargs="+", default=["2048x16", "4096x28"],
                       help="dim x trunk blocks (+ 4 heads): ~1.1 B and ~7 B")  # fmt: skip
    group.add_argument("--sampling-ns", type=int, nargs="+", default=[10, 200])
    group.add_argument("--sampling-problems", type=int, nargs="+", default=[100, 20], help="one per n")
    group.add_argument("--sampling-new-tokens", type=int, default=256)
    group.add_argument("--sampling-batch", type=int, default=64, help="our sampler's rows at once")
    group.add_argument("--sampling-vocab", type=int, default=8000)
    group.add_argument("--vllm-python", default=os.path.join(os.path.dirname(__file__), "..", ".venv-vllm", "bin", "python"))
    group = parser.add_argument_group("decode")
    group.add_argument("--decode-batch", type=int, default=16)
    group.add_argument("--decode-prompt", type=int, default=256, help="prompt tokens")
    group.add_argument("--decode-steps", type=int, default=64, help="timed forwards")
    group.add_argument("--speculative-args", nargs=argparse.REMAINDER, default=[],
                       help="passed on to benchmarks/speculative.py (everything after)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.toy:
        args.__dict__.update(
            dim=64, trunk_layers=2, heads=3, vocab=512, seq=64, micro_batch=2, warmup=1, steps=1,
            memory_dim=64, memory_vocab=1000, memory_seq=64, memory_trunk_layers=1,
            decode_batch=4, decode_prompt=16, decode_steps=4,
            sampling_shapes=["64x2"], sampling_ns=[2], sampling_problems=[2], sampling_new_tokens=8,
            sampling_batch=4, sampling_vocab=300,
            speculative_args=[
                "--dim", "32", "--trunk-layers", "2", "--heads", "3", "--vocab", "300",
                "--train-problems", "40", "--stdlib-bytes", "2000", "--steps", "20", "--seq", "64",
                "--prompts", "2", "--new-tokens", "12", "--batch", "2", "--sampled-prompts", "1",
                *args.speculative_args,
            ],
        )  # fmt: skip
    device = torch.device(args.device)
    if device.type == "cpu" and not args.toy:
        sys.exit("no GPU: run on one (or pass --toy for a CPU smoke run at toy sizes)")
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    results = {}
    if "train" in args.only:
        results["train"] = bench_train(args, device)
    if "memory" in args.only:
        results["memory"] = bench_memory(args, device)
    if "decode" in args.only:
        results["forward_cost"] = bench_forward_cost(args, device)
    if "sampling" in args.only:
        results["sampling"] = bench_sampling(args, device)
    report(results, args)
    if "decode" in args.only:
        import speculative

        print("\n## decode: benchmarks/speculative.py on the device")
        speculative.main(["--device", str(device), *args.speculative_args])


if __name__ == "__main__":
    main()
