"""One layer per config value: the schema's defaults, then config/config.yaml, then a
setting merged over it, then a recipe. Every shipped file writes only what it must
(what the schema requires of a setting) and what it sets away from the layers below;
what a key means is written once, in the schema's descriptions."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from tests.config.test_config import merged
from wmtp.config.schema import (
    SETTING_CHOICES,
    ConfigError,
    PipelineConfig,
    RecipeFile,
    load_config,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "config" / "config.yaml"
SETTINGS = sorted((REPO / "config").glob("*.yaml"))
RECIPES = sorted((REPO / "config" / "recipes").rglob("*.yaml"))


def read(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def leaves(data: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Key paths of the values a file writes (a mapping is merged key by key, so its
    keys are the leaves; an empty mapping is a value)."""
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key)


def without(data: dict, path: tuple[str, ...]) -> dict:
    out = copy.deepcopy(data)
    section = out
    for key in path[:-1]:
        section = section[key]
    del section[path[-1]]
    return out


def resolved(data: dict) -> tuple[dict, dict] | str:
    """The resolved config and recipes, or the error that loading raises."""
    try:
        config, recipes = load_config(data, base_dir=REPO)
    except ConfigError as error:
        return f"error: {error}"
    return config.model_dump(mode="json"), {a: r.model_dump(mode="json") for a, r in recipes.items()}


def views(setting: Path, data: dict | None = None) -> list[dict]:
    """The ways a shipped setting (or `data` in its place) is read: the tiny default
    alone; any other merged over it (Snakemake) and alone (`python -m wmtp ...
    --config FILE`)."""
    data = read(setting) if data is None else data
    return [data] if setting == DEFAULT else [data, merged(read(DEFAULT), data)]


def restated(file: dict, loads) -> list[str]:
    """The key paths of `file` that can be removed with every way `loads(file)` reads
    it resolving to the same config and recipes."""
    before = [resolved(data) for data in loads(file)]
    assert not any(isinstance(r, str) for r in before), before
    return [
        ".".join(path)
        for path in leaves(file)
        if [resolved(data) for data in loads(without(file, path))] == before
    ]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda p: p.name)
def test_no_setting_restates_a_value_it_gets_anyway(setting):
    """Removing any key a setting writes must change what it resolves to (or make it
    invalid: a key the schema requires). Else the value is written twice, and the
    copies can drift apart."""
    assert restated(read(setting), lambda data: views(setting, data)) == []


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "config")))
def test_no_recipe_restates_a_value_it_gets_anyway(recipe, tmp_path):
    """The same for a recipe, in every shipped setting that uses it: a `train:` or
    `weighting:` key must change the setting's shared value, a `critic:` key the
    schema's default."""
    name = str(recipe.relative_to(REPO))
    users = [data for setting in SETTINGS for data in views(setting) if name in data["recipes"].values()]
    assert users, f"{name} is used by no shipped setting"
    path = tmp_path / recipe.name  # one path: the resolved config names it

    def loads(file: dict) -> list[dict]:
        path.write_text(yaml.safe_dump(file))  # read when the result is resolved, at once
        return [
            merged(data, {"recipes": {a: str(path) for a, r in data["recipes"].items() if r == name}})
            for data in users
        ]

    assert restated(read(recipe), loads) == []


@pytest.mark.parametrize("name", ["ci.yaml", "paper.yaml", "paper_codecontests.yaml", "smol.yaml"])
def test_a_setting_alone_is_the_setting_merged_over_the_tiny_default(name):
    """`python -m wmtp` reads a setting alone, Snakemake merged over config/config.yaml:
    both must run the same experiment. Only what the setting never reads may differ:
    `tiny:` when no model is tiny, and k values of benchmarks it does not evaluate."""
    setting = read(REPO / "config" / name)
    alone, merge = resolved(setting), resolved(merged(read(DEFAULT), setting))
    (got, got_recipes), (want, want_recipes) = merge, alone
    assert got_recipes == want_recipes
    if want["models"]["base"]["source"] != "tiny":
        got.pop("tiny"), want.pop("tiny")
    for config in (got, want):
        config["eval"]["ks"] = {b: k for b, k in config["eval"]["ks"].items() if b in config["benchmarks"]}
    assert got == want


@pytest.mark.parametrize(
    "path", [(section, key) for section, keys in SETTING_CHOICES.items() for key in keys], ids=".".join
)
def test_a_setting_chooses_its_length_batch_lr_data_and_samples(path):
    """No default stands in for these in a setting: each writes its own."""
    with pytest.raises(ConfigError, match=rf"{'.'.join(path)} = .*Field required"):
        load_config(without(read(DEFAULT), path), base_dir=REPO)


def sections(model: type[BaseModel], seen: set | None = None) -> Iterator[type[BaseModel]]:
    seen = set() if seen is None else seen
    if model in seen:
        return
    seen.add(model)
    yield model
    for field in model.model_fields.values():
        for inner in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                yield from sections(inner, seen)


@pytest.mark.parametrize("model", [PipelineConfig, RecipeFile], ids=lambda m: m.__name__)
def test_the_schema_describes_every_key(model):
    """Key meanings live in the schema alone (the YAML files say why a value is chosen),
    so every key has a description there."""
    undescribed = [
        f"{section.__name__}.{name}"
        for section in sections(model)
        for name, field in section.model_fields.items()
        if not field.description
    ]
    assert undescribed == []


@pytest.mark.parametrize("path", SETTINGS + RECIPES, ids=lambda p: str(p.relative_to(REPO / "config")))
def test_every_shipped_file_points_to_the_resolved_values_and_the_schema(path):
    header = path.read_text().split("\n\n")[0]
    assert "python -m wmtp validate --config" in header and "wmtp/config/schema.py" in header
