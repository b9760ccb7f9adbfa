"""The tiny built-in default: what the download stage builds for `source: tiny`.

    write_tiny_mbpp(dir, settings, seed)   -> dir/train.parquet, dir/test.parquet
    write_tiny_mbpp_split(path, split, settings, seed) -> one of them at `path`
    build_tiny_base(dir, settings, seed)   -> base MTP model (our format + tokenizer)
    build_tiny_ref(dir, settings, seed)    -> reference LlamaForCausalLM (HF format)

Everything is generated on the machine (no network) and is a function of the
seed and the settings. The data generator is `wmtp.tiny.data`, the tokenizer and
pretraining `wmtp.tiny.models`; docs/tiny.md explains how the miniature mirrors
the paper's setting.
"""

from __future__ import annotations

from pathlib import Path

from wmtp.config.schema import TinySettings
from wmtp.tiny.data import make_tiny_mbpp, write_parquet, write_splits
from wmtp.tiny.models import build_base, build_ref

__all__ = [
    "build_tiny_base",
    "build_tiny_ref",
    "make_tiny_mbpp",
    "tiny_knobs",
    "write_tiny_mbpp",
    "write_tiny_mbpp_split",
]

def tiny_knobs(settings: TinySettings | None = None, **overrides) -> dict:
    """The settings as a plain dict with `overrides` applied (unknown names raise)."""
    knobs = (settings or TinySettings()).model_dump()
    unknown = sorted(set(overrides) - set(knobs))
    if unknown:
        raise ValueError(f"unknown tiny settings {unknown}; known: {sorted(knobs)}")
    knobs.update(overrides)
    return knobs


def write_tiny_mbpp(
    out_dir: str | Path, settings: TinySettings | None = None, seed: int = 0, **overrides
) -> tuple[Path, Path]:
    """The `tiny-mbpp` benchmark: `train.parquet` (noisy solutions) and `test.parquet`."""
    knobs = tiny_knobs(settings, **overrides)
    return write_splits(
        out_dir,
        knobs["n_train_problems"],
        knobs["n_test_problems"],
        seed,
        knobs["noise_comment_prob"],
    )


def write_tiny_mbpp_split(
    path: str | Path, split: str, settings: TinySettings | None = None, seed: int = 0, **overrides
) -> Path:
    """One split ("train" or "test") of `tiny-mbpp` to `path`, for a rule that makes
    one file per split; identical to that split of `write_tiny_mbpp`."""
    if split not in ("train", "test"):
        raise ValueError(f"tiny-mbpp has splits 'train' and 'test', not {split!r}")
    knobs = tiny_knobs(settings, **overrides)
    train, test = make_tiny_mbpp(
        knobs["n_train_problems"], knobs["n_test_problems"], seed, knobs["noise_comment_prob"]
    )
    return write_parquet(train if split == "train" else test, path)


def build_tiny_base(
    out_dir: str | Path,
    settings: TinySettings | None = None,
    seed: int = 0,
    *,
    threads: int = 1,
    **overrides,
) -> Path:
    """Pretrain and save the base MTP model; `threads` torch threads (1 when two
    download jobs share two cores). Same seed, settings and threads: same bytes."""
    return build_base(out_dir, tiny_knobs(settings, **overrides), seed, threads)


def build_tiny_ref(
    out_dir: str | Path,
    settings: TinySettings | None = None,
    seed: int = 0,
    *,
    threads: int = 1,
    **overrides,
) -> Path:
    """Pretrain and save the reference causal LM (shares the base's tokenizer)."""
    return build_ref(out_dir, tiny_knobs(settings, **overrides), seed, threads)
