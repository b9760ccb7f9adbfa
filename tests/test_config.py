"""The config schema: shipped configs validate, bad ones fail with messages that name
the key, the value and what is allowed, and the JSON schema file is up to date."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from wmtp.config import (
    SCHEMA_PATH,
    ConfigError,
    PipelineConfig,
    Recipe,
    config_hash,
    load_config,
    load_recipe,
    schema_text,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "config").glob("*.yaml"))
RECIPES = sorted((REPO / "config" / "recipes").rglob("*.yaml"))


def tiny() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(data, base_dir=REPO)
    return str(info.value)


def merged(base: dict, override: dict) -> dict:
    """Snakemake's merge of `--configfile` over the Snakefile's `configfile:`."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config, recipes = load_config(path, base_dir=REPO)
    assert set(recipes) == set(config.algorithms)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_recipes_validate_and_comment_every_key(path):
    recipe = load_recipe(path)
    assert recipe.algorithm == path.stem
    keys = [line for line in path.read_text().splitlines() if re.match(r"^\s*\w+:", line)]
    uncommented = [line for line in keys if "#" not in line and not line.rstrip().endswith(":")]
    assert not uncommented, f"{path}: keys without a comment: {uncommented}"


def test_the_tiny_default_is_the_issue_setting():
    config, _ = load_config(REPO / "config" / "config.yaml", base_dir=REPO)
    assert config.run == "tiny" and len(config.seeds) >= 2
    assert sorted(config.algorithms) == sorted(Recipe.model_fields["algorithm"].annotation.__args__)
    assert config.models.base.source == config.models.ref.source == "tiny"
    assert config.eval.ks["tiny-mbpp"] == [1, 10] and config.eval.n_samples == 10


@pytest.mark.parametrize("name", ["paper.yaml", "smol.yaml"])
def test_settings_restate_everything_the_tiny_default_sets(name):
    """`--configfile config/paper.yaml` is merged over config/config.yaml: the result
    must be the paper setting, with nothing of the tiny one leaking in (but `tiny:`)."""
    paper = yaml.safe_load((REPO / "config" / name).read_text())
    config, _ = load_config(merged(tiny(), paper), base_dir=REPO)
    alone, _ = load_config(paper, base_dir=REPO)
    got, want = config.model_dump(), alone.model_dump()
    got.pop("tiny"), want.pop("tiny")
    got["eval"]["ks"] = {b: k for b, k in got["eval"]["ks"].items() if b in config.benchmarks}
    want["eval"]["ks"] = {b: k for b, k in want["eval"]["ks"].items() if b in config.benchmarks}
    assert got == want


def test_the_paper_and_smol_settings():
    paper, _ = load_config(REPO / "config" / "paper.yaml", base_dir=REPO)
    assert paper.models.base.subfolder == "7B_1T_4"
    assert paper.eval.ks["codecontests"] == [1, 5]
    smol, recipes = load_config(REPO / "config" / "smol.yaml", base_dir=REPO)
    assert smol.models.base.source == smol.models.ref.source == "hf"
    assert smol.models.base.n_future_tokens == 2 and smol.data.train_dataset == "mbpp"
    assert {r.train.max_steps for r in recipes.values()} == {300}


def test_unknown_key_names_the_key_and_the_allowed_ones():
    data = tiny()
    data["eval"]["n_sample"] = 5
    message = error_of(data)
    assert "eval.n_sample = 5" in message
    assert "unknown key" in message and "n_samples" in message


def test_unknown_algorithm_lists_the_allowed():
    data = tiny()
    data["algorithms"].append("rho2")
    message = error_of(data)
    assert 'algorithms.4 = "rho2"' in message
    for name in ("baseline-mtp", "critic-wmtp", "rho1-weighted", "rho1-tokenskip"):
        assert name in message


def test_k_above_n_samples():
    data = tiny()
    data["eval"]["ks"] = {"tiny-mbpp": [1, 20]}
    message = error_of(data)
    assert "eval.ks" in message and "20" in message and "n_samples (10)" in message


def test_negative_learning_rate_in_a_recipe(tmp_path):
    recipe = yaml.safe_load((REPO / "config" / "recipes" / "baseline-mtp.yaml").read_text())
    recipe["train"]["lr"] = -1e-4
    path = tmp_path / "baseline-mtp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    data = tiny()
    data["recipes"]["baseline-mtp"] = str(path)
    message = error_of(data)
    assert "train.lr = -0.0001" in message and "greater than 0" in message
    assert str(path) in message


def test_missing_recipe_file():
    data = tiny()
    data["recipes"]["rho1-weighted"] = "config/recipes/nope.yaml"
    message = error_of(data)
    assert "recipes.rho1-weighted = 'config/recipes/nope.yaml': file not found" in message


def test_all_problems_at_once():
    data = tiny()
    data["seeds"] = [0, 0]
    data["benchmarks"] = ["humaneval"]
    data["data"]["train_dataset"] = "humaneval"
    data["eval"]["ks"] = {"tiny-mbpp": [1]}
    message = error_of(data)
    assert "seeds = [0, 0]: duplicates" in message
    assert "no k values for benchmarks ['humaneval']" in message
    assert "data.train_dataset = 'humaneval': has no train split" in message


def test_recipe_for_another_algorithm_and_missing_critic_section(tmp_path):
    data = tiny()
    data["recipes"]["rho1-weighted"] = "config/recipes/rho1-tokenskip.yaml"
    assert "is a recipe for 'rho1-tokenskip'" in error_of(data)
    path = tmp_path / "critic-wmtp.yaml"
    path.write_text("algorithm: critic-wmtp\n")
    with pytest.raises(ConfigError, match="critic = null: critic-wmtp needs"):
        load_recipe(path)


def test_reward_model_critic_needs_a_reward_model(tmp_path):
    recipe = yaml.safe_load((REPO / "config" / "recipes" / "critic-wmtp.yaml").read_text())
    recipe["critic"]["reward"] = "reward_model"
    path = tmp_path / "critic-wmtp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    data = tiny()
    data["recipes"]["critic-wmtp"] = str(path)
    assert "models.reward = null" in error_of(data)


def test_settings_are_frozen():
    config, _ = load_config(REPO / "config" / "config.yaml", base_dir=REPO)
    with pytest.raises(ValueError):
        config.eval.n_samples = 3


def test_config_hash_changes_with_a_recipe():
    config, recipes = load_config(REPO / "config" / "config.yaml", base_dir=REPO)
    changed = dict(recipes)
    changed["baseline-mtp"] = recipes["baseline-mtp"].model_copy(
        update={"train": recipes["baseline-mtp"].train.model_copy(update={"lr": 0.5})}
    )
    assert config_hash(config, recipes) == config_hash(config, dict(recipes))
    assert config_hash(config, recipes) != config_hash(config, changed)


def test_schema_file_is_up_to_date():
    assert SCHEMA_PATH.read_text() == schema_text(), "run `python -m wmtp.config`"


def test_schema_accepts_the_shipped_configs_and_rejects_unknown_keys():
    jsonschema = pytest.importorskip("jsonschema")
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    for path in CONFIGS:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    data = tiny()
    data["bogus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)
    assert schema["title"] == PipelineConfig.__name__


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_recipes_pass_the_trainers_set_up_checks(path, tmp_path):
    """Beyond the schema: DeepSpeed template and ZeRO stage agree, warmup fits, etc.
    (inputs are faked: only the recipe's own consistency is under test)."""
    from wmtp.train import validate_setup

    base, data = tmp_path / "base", tmp_path / "train.parquet"
    base.mkdir()
    (base / "config.json").write_text("{}")
    data.write_text("")
    config, recipes = load_config(path, base_dir=REPO)
    for recipe in recipes.values():
        validate_setup(
            recipe=recipe,
            data=config.data,
            max_steps=recipe.train.max_steps,
            base_model_dir=base,
            train_path=data,
            refce_path=data,
            critic_path=data,
            device_type="cpu",
        )


def test_a_base_without_heads_is_refused_when_the_config_loads(tmp_path):
    """A plain causal LM as base passed validation, was copied as is and failed in
    training with 'Missing key(s)': now the config names the key. A local
    directory's own config.json tells a plain LM from an MTP model of ours."""
    data = tiny()
    data["models"]["base"] = {"source": "hf", "id": "HuggingFaceTB/SmolLM2-135M"}
    assert "models.base.n_future_tokens = null: the base 'HuggingFaceTB/SmolLM2-135M'" in error_of(data)
    data["models"]["base"]["n_future_tokens"] = 2
    load_config(data, base_dir=REPO)

    plain, ours = tmp_path / "plain", tmp_path / "ours"
    plain.mkdir(), ours.mkdir()
    (plain / "config.json").write_text('{"model_type": "llama"}')
    (ours / "config.json").write_text('{"wmtp_format": "mtp", "n_future_tokens": 2}')
    data["models"]["base"] = {"source": "local", "id": str(plain)}
    assert f"models.base.n_future_tokens = null: {plain} is a plain causal LM" in error_of(data)
    data["models"]["base"] = {"source": "local", "id": str(ours), "n_future_tokens": 2}
    assert "is already an MTP model" in error_of(data)
    data["models"]["base"] = {"source": "local", "id": str(ours)}
    load_config(data, base_dir=REPO)


def test_prompt_format_is_the_base_models(tmp_path):
    data = tiny()
    data["models"]["ref"] = {"source": "hf", "id": "x/y", "prompt_format": "chat"}
    assert "models.ref.prompt_format = 'chat': only the base model's is read" in error_of(data)
    data = tiny()
    data["models"]["base"]["prompt_format"] = "chat"
    assert "the tiny models' tokenizer has no chat template" in error_of(data)
    data["models"]["base"] = {"source": "hf", "id": "x/y", "n_future_tokens": 2, "prompt_format": "chat"}
    assert "critic-wmtp's rollouts are sampled in the raw format only" in error_of(data)
    data["algorithms"].remove("critic-wmtp")
    config, _ = load_config(data, base_dir=REPO)
    assert config.models.base.prompt_format == "chat"
