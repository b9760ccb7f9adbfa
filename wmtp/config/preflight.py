"""Every file and directory a config names, checked when the config loads.

A missing DeepSpeed template or local model directory would otherwise pass
`snakemake -n` and fail inside the job, after Snakemake had already removed the
outputs the job was to replace. `load_config` calls `missing_paths` (so the
Snakefile stops before planning any job, and `python -m wmtp train` before any
work), and every problem names the key and the path. Paths are resolved as the
jobs resolve them: relative to the workflow directory (`base_dir`), DeepSpeed
templates also relative to the repository (the trainer's fallback). S3 and hub
locations are not checked here (that needs the network).
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL_MARKERS = ("config.json", "params.json")  # an HF / wmtp directory, or Meta's format


def _resolve(path: str, base_dir: Path, *fallbacks: Path) -> Path:
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate
    for root in (base_dir, *fallbacks):
        if (root / candidate).exists():
            return root / candidate
    return base_dir / candidate


def template_path(path: str, base_dir: str | Path = ".") -> Path:
    """Where the trainer reads a DeepSpeed template: `base_dir` (the workflow root),
    falling back to the repository, so a run from another directory finds the
    shipped templates."""
    return _resolve(path, Path(base_dir).resolve(), REPO)


def template_problems(key: str, path: str, base_dir: str | Path = ".") -> list[str]:
    """What keeps the template at `path` from being used: missing, not JSON, or
    setting the ZeRO stage, which `train.zero_stage` alone decides (a second place
    for it could silently disagree)."""
    base_dir = Path(base_dir).resolve()
    resolved = template_path(path, base_dir)
    if not resolved.is_file():
        where = " and ".join(dict.fromkeys(str(d) for d in (base_dir, REPO)))
        return [f"{key} = {path!r}: DeepSpeed template not found (looked in {where})"]
    try:
        template = json.loads(resolved.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return [f"{key} = {path!r}: {resolved} is not valid JSON ({error})"]
    zero = template.get("zero_optimization") if isinstance(template, dict) else None
    if isinstance(zero, dict) and "stage" in zero:
        return [
            f"{key} = {path!r}: {resolved.name} sets zero_optimization.stage = {zero['stage']}; "
            "the stage is train.zero_stage alone: remove it from the template"
        ]
    return []


def _local_model_problems(role: str, source, base_dir: Path) -> list[str]:
    directory = _resolve(source.id, base_dir) / (source.subfolder or "")
    key = f"models.{role}.id = {source.id!r}"
    if not directory.is_dir():
        return [f"{key}: local model directory {directory} not found"]
    if not any((directory / marker).is_file() for marker in MODEL_MARKERS):
        return [f"{key}: {directory} holds none of {list(MODEL_MARKERS)} (not a model directory)"]
    return []


def missing_paths(config, recipes: dict, base_dir: str | Path = ".") -> list[str]:
    """One line per file or directory named by `config` or a resolved recipe that
    is not there (or not what it should be); empty when all are."""
    base_dir = Path(base_dir).resolve()
    problems = []
    problems += template_problems("train.deepspeed_config", config.train.deepspeed_config, base_dir)
    for algorithm, recipe in sorted(recipes.items()):
        if "deepspeed_config" in recipe.overrides.get("train", {}):  # else the shared one above
            key = f"recipes.{algorithm} ({config.recipes[algorithm]}): train.deepspeed_config"
            problems += template_problems(key, recipe.train.deepspeed_config, base_dir)
    for role in ("base", "ref", "reward"):
        source = getattr(config.models, role)
        if source is not None and source.source == "local":
            problems += _local_model_problems(role, source, base_dir)
    for dataset, location in sorted(getattr(config.data, "sources", {}).items()):
        if "://" not in location and not _resolve(location, base_dir).is_dir():
            problems.append(
                f"data.sources.{dataset} = {location!r}: local data directory "
                f"{_resolve(location, base_dir)} not found"
            )
    return problems
