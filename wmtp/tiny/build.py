"""The tiny built-in default: what the download stage builds for `source: tiny`.

    write_tiny_mbpp(dir, settings, seed)   -> dir/{train,validation,test}.parquet
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

from wmtp.config.paths import TEST_SPLIT, TRAIN_SPLIT, VALIDATION_SPLIT
from wmtp.config.schema import TinySettings
from wmtp.tiny.data import make_tiny_mbpp, write_parquet, write_splits
from wmtp.tiny.models import build_base, build_ref

__all__ = [
    "build_tiny_base",
    "build_tiny_ref",
    "make_tiny_mbpp",
    "tiny_knobs",
    "tiny_mbpp_split",
    "write_tiny_mbpp",
    "write_tiny_mbpp_split",
]

TINY_MBPP_SPLITS = (TRAIN_SPLIT, VALIDATION_SPLIT, TEST_SPLIT)


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
) -> dict[str, Path]:
    """The `tiny-mbpp` benchmark: `train.parquet` (noisy solutions), `validation.parquet`
    and `test.parquet` (clean), by split name."""
    knobs = tiny_knobs(settings, **overrides)
    return write_splits(
        out_dir,
        knobs["n_train_problems"],
        knobs["n_test_problems"],
        seed,
        knobs["noise_comment_prob"],
        knobs["n_validation_problems"],
    )


def tiny_mbpp_split(split: str, settings: TinySettings | None = None, seed: int = 0, **overrides):
    """One split of `tiny-mbpp` as a DataFrame; identical to that split of `write_tiny_mbpp`."""
    if split not in TINY_MBPP_SPLITS:
        raise ValueError(f"tiny-mbpp has splits {', '.join(map(repr, TINY_MBPP_SPLITS))}, not {split!r}")
    knobs = tiny_knobs(settings, **overrides)
    return make_tiny_mbpp(
        knobs["n_train_problems"], knobs["n_test_problems"], seed, knobs["noise_comment_prob"],
        knobs["n_validation_problems"],
    )[split]  # fmt: skip


def write_tiny_mbpp_split(
    path: str | Path, split: str, settings: TinySettings | None = None, seed: int = 0, **overrides
) -> Path:
    """One split of `tiny-mbpp` to `path`, for a rule that makes one file per split."""
    return write_parquet(tiny_mbpp_split(split, settings, seed, **overrides), path)


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
