"""The config schema: shipped configs validate, bad ones fail with messages that name
the key, the value and what is allowed, and the JSON schema file is up to date."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import get_args

import pytest
import yaml

from wmtp.config import registry
from wmtp.config.registry import ROWS, TRAINED
from wmtp.config.schema import (
    SCHEMA_PATH,
    Algorithm,
    ConfigError,
    CriticSettings,
    PipelineConfig,
    Row,
    _shared_critic_problems,
    config_hash,
    load_config,
    load_recipe,
    merge_config,
    schema_text,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "config").glob("*.yaml"))
RECIPES = sorted((REPO / "config" / "recipes").rglob("*.yaml"))


def tiny() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(data, base_dir=REPO)
    return str(info.value)


merged = merge_config  # Snakemake's merge of --configfile over the Snakefile's configfile:


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config, recipes = load_config(path, base_dir=REPO)
    assert set(recipes) == set(config.trained_algorithms) == set(config.algorithms) - {"base"}
    # the two reference rows every reader asks for are in every shipped table
    assert {"base", "ntp", "baseline-mtp"} <= set(config.algorithms)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_recipes_validate_and_comment_every_key(path):
    recipe = load_recipe(path)
    assert recipe.algorithm == path.stem
    keys = [line for line in path.read_text().splitlines() if re.match(r"^\s*\w+:", line)]
    uncommented = [line for line in keys if "#" not in line and not line.rstrip().endswith(":")]
    assert not uncommented, f"{path}: keys without a comment: {uncommented}"


def test_the_tiny_default_is_the_documented_setting():
    config, _ = load_config(REPO / "config" / "config.yaml", base_dir=REPO)
    assert config.run == "tiny" and len(config.seeds) >= 2
    # every method written in the registry is a row; of the derived control rows, those listed
    written = [row for row in ROWS if registry.method(row).control is None]
    assert sorted(a for a in config.algorithms if registry.method(a).control is None) == sorted(written)
    assert set(config.trained_algorithms) == set(config.algorithms) & set(TRAINED)
    assert config.models.base.source == config.models.ref.source == "tiny"
    assert config.eval.ks["tiny-mbpp"] == [1, 5] and config.eval.n_samples == 5


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
    assert {r.train.epochs for r in recipes.values()} == {3.0}
    assert {"base", "ntp"} <= set(smol.algorithms)


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
    assert f'algorithms.{len(data["algorithms"]) - 1} = "rho2"' in message
    for name in ("baseline-mtp", "critic-wmtp", "rho1-weighted", "rho1-tokenskip"):
        assert name in message


def test_k_above_n_samples():
    data = tiny()
    data["eval"]["ks"] = {"tiny-mbpp": [1, 20]}
    message = error_of(data)
    assert "eval.ks" in message and "20" in message and "n_samples (5)" in message


def test_negative_learning_rate_in_a_recipe(tmp_path):
    recipe = yaml.safe_load((REPO / "config" / "recipes" / "baseline-mtp.yaml").read_text())
    recipe["train"] = {"lr": -1e-4}
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
    assert SCHEMA_PATH.read_text() == schema_text(), "run `python -m wmtp.config.schema`"


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
    """Beyond the schema: the DeepSpeed template exists and sets no stage, warmup fits, etc.
    (inputs are faked: only the recipe's own consistency is under test)."""
    from wmtp.stages.train import TrainInputs, validate_setup

    base, data = tmp_path / "base", tmp_path / "train.parquet"
    base.mkdir()
    (base / "config.json").write_text("{}")
    data.write_text("")
    config, recipes = load_config(path, base_dir=REPO)
    for recipe in recipes.values():
        validate_setup(
            recipe, config.data, TrainInputs(base, data, data, data),
            max_steps=recipe.train.max_steps, device_type="cpu",
        )  # fmt: skip


# ---- one place per shared knob -------------------------------------------------------


def test_a_shared_knob_changed_in_its_one_place_reaches_every_algorithm():
    data = tiny()
    data["train"]["lr"] = 7.5e-4
    data.setdefault("weighting", {})["temperature"] = 1.3
    config, recipes = load_config(data, base_dir=REPO)
    assert set(recipes) == set(config.trained_algorithms)
    assert {a: r.train.lr for a, r in recipes.items()} == {a: 7.5e-4 for a in recipes}
    assert {a: r.weighting.temperature for a, r in recipes.items()} == {a: 1.3 for a in recipes}
    # and the shipped recipes set none of them: nobody has copies to keep in sync
    for path in RECIPES:
        assert "train" not in yaml.safe_load(path.read_text()), path


def test_a_recipe_override_applies_to_its_method_only_and_is_recorded(tmp_path):
    path = tmp_path / "rho1-tokenskip.yaml"
    path.write_text("algorithm: rho1-tokenskip\ntrain: {lr: 5.0e-4}\nweighting: {skip_ratio: 0.5}\n")
    data = tiny()
    data["recipes"]["rho1-tokenskip"] = str(path)
    config, recipes = load_config(data, base_dir=REPO)
    assert recipes["rho1-tokenskip"].train.lr == 5.0e-4
    assert recipes["rho1-tokenskip"].weighting.skip_ratio == 0.5
    assert recipes["rho1-tokenskip"].overrides == {"train": {"lr": 5.0e-4}, "weighting": {"skip_ratio": 0.5}}
    others = {a: r for a, r in recipes.items() if a != "rho1-tokenskip"}
    assert all(r.train.lr == config.train.lr and "train" not in r.overrides for r in others.values())


def test_a_recipe_may_not_set_a_weighting_knob_its_method_never_reads(tmp_path):
    path = tmp_path / "baseline-mtp.yaml"
    path.write_text("algorithm: baseline-mtp\nweighting: {skip_ratio: 0.5}\n")
    message = error_of({**tiny(), "recipes": {**tiny()["recipes"], "baseline-mtp": str(path)}})
    assert "baseline-mtp does not use ['skip_ratio']" in message and str(path) in message


def test_an_override_that_breaks_a_cross_field_check_names_the_recipe(tmp_path):
    path = tmp_path / "ntp.yaml"
    path.write_text("algorithm: ntp\ntrain: {max_steps: 5, warmup_steps: 5}\n")
    message = error_of({**tiny(), "recipes": {**tiny()["recipes"], "ntp": str(path)}})
    assert str(path) in message and "warmup_steps = 5: must be < max_steps (5)" in message


def test_base_row_needs_no_recipe_but_every_training_method_does():
    data = tiny()
    data["recipes"].pop("ntp")
    assert "no recipe given for algorithms ['ntp']" in error_of(data)
    data = tiny()
    data["algorithms"] = ["base"]
    data["recipes"] = {}
    config, recipes = load_config(data, base_dir=REPO)
    assert config.trained_algorithms == [] and recipes == {}


# ---- training length in epochs -------------------------------------------------------


@pytest.mark.parametrize(
    ("epochs", "n", "micro", "processes", "accum", "cap", "steps"),
    [
        (1, 100, 10, 1, 1, None, 10),  # 10 batches of 10
        (1, 105, 10, 1, 1, None, 10),  # the 5 left over wait for the next shuffle
        (3, 100, 10, 1, 1, None, 30),
        (3, 100, 5, 2, 1, None, 30),  # 2 ranks x 5 = 10 per micro-step
        (3, 100, 10, 1, 4, None, 8),  # 30 micro-steps / 4 per optimizer step, rounded up
        (0.5, 100, 10, 1, 1, None, 5),
        (6, 380, 8, 1, 1, None, 282),  # the tiny default: 47 batches per epoch
        (3, 355, 4, 4, 2, None, 33),  # the paper setting: 22 micro-steps per epoch on 4 GPUs
        (6, 380, 8, 1, 1, 100, 100),  # max_steps caps
        (0.01, 100, 10, 1, 1, None, 1),  # at least one step
    ],
)
def test_epochs_to_optimizer_steps(epochs, n, micro, processes, accum, cap, steps):
    from wmtp.config.schema import TrainSettings, optimizer_steps

    settings = TrainSettings(
        epochs=epochs, micro_batch_size=micro, grad_accum_steps=accum, max_steps=cap, warmup_steps=0
    )
    assert optimizer_steps(settings, n, processes) == steps


def test_a_batch_larger_than_the_data_is_refused():
    from wmtp.config.schema import TrainSettings, optimizer_steps

    with pytest.raises(ValueError, match=r"micro_batch_size \(8\) x processes \(4\) = 32 > 20"):
        optimizer_steps(TrainSettings(micro_batch_size=8), 20, processes=4)


# ---- one error test per section -------------------------------------------------------


def with_value(keys: tuple[str, ...], value) -> dict:
    data = tiny()
    section = data
    for key in keys[:-1]:
        section = section.setdefault(key, {})
    section[keys[-1]] = value
    return data


@pytest.mark.parametrize(
    ("keys", "value", "expected"),
    [
        (("weighting", "eps"), 1.5, "weighting.eps = 1.5: Input should be less than or equal to 1"),
        (("weighting", "rho1_base"), "stale", "weighting.rho1_base = \"stale\": Input should be 'online' or 'frozen'"),
        (("tiny", "n_future_tokens"), 0, "tiny.n_future_tokens = 0: Input should be greater than 0"),
        (("tiny", "max_seq_len"), 128, "data.max_seq_len = 256: must be <= tiny.max_seq_len (128)"),
        (("tracking", "mlflow"), "sometimes", 'tracking.mlflow = "sometimes": Input should be a valid boolean'),
        (("tracking", "uri"), "x", 'tracking.uri = "x": unknown key (allowed: mlflow, tracking_uri)'),
        (("storage", "endpoint"), "http://s3", "storage.endpoint = \"http://s3\": unknown key (allowed: endpoint_url"),
        (("report", "bootstrap_samples"), 0, "report.bootstrap_samples = 0: Input should be greater than 0"),
        (("models", "base", "source"), "ftp",
         "models.base.source = \"ftp\": Input should be 'tiny', 'hf', 'meta', 'local' or 's3'"),
        (("models", "ref", "id"), None, "models.ref.id = null: Input should be a valid string"),
        (("run",), "my run/1", "run = \"my run/1\": String should match pattern '^[A-Za-z0-9_.-]+$'"),
    ],
    ids=lambda v: ".".join(v) if isinstance(v, tuple) else None,
)
def test_each_section_names_the_bad_key_and_what_is_allowed(keys, value, expected):
    assert expected in error_of(with_value(keys, value))


def test_a_critic_section_in_a_recipe_without_a_critic(tmp_path):
    path = tmp_path / "rho1-weighted.yaml"
    path.write_text("algorithm: rho1-weighted\ncritic: {rollouts: 2}\n")
    message = error_of({**tiny(), "recipes": {**tiny()["recipes"], "rho1-weighted": str(path)}})
    assert str(path) in message and "critic: section given for rho1-weighted, which has no critic" in message


def test_recipe_warmup_at_or_above_the_settings_step_cap_names_the_recipe(tmp_path):
    """The cap comes from the config's shared train section, the warmup from the recipe:
    the check runs on the resolved recipe, so it still fires and names the recipe file."""
    path = tmp_path / "rho1-tokenskip.yaml"
    path.write_text("algorithm: rho1-tokenskip\ntrain: {warmup_steps: 40}\n")
    data = with_value(("train", "max_steps"), 40)
    data["recipes"]["rho1-tokenskip"] = str(path)
    message = error_of(data)
    assert str(path) in message and "warmup_steps = 40: must be < max_steps (40)" in message
    data["recipes"]["rho1-tokenskip"] = "config/recipes/rho1-tokenskip.yaml"  # the shipped one fits
    load_config(data, base_dir=REPO)
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


def test_the_schema_names_come_from_the_registry():
    """Config validation reads wmtp.config.registry: the allowed rows and methods are
    its names, and a method's recipe needs a `critic:` section exactly when it has a
    critic."""
    assert get_args(get_args(Algorithm)[0]) == registry.TRAINED
    assert get_args(get_args(Row)[0]) == registry.ROWS
    assert registry.BASE_ROW in registry.ROWS and registry.BASE_ROW not in registry.TRAINED
    config, recipes = load_config(REPO / "config" / "config.yaml", base_dir=REPO)
    assert config.critic_rows == [m for m in config.algorithms if registry.method(m).has_critic]
    for name, recipe in recipes.items():
        assert (recipe.critic is not None) == registry.method(name).has_critic


def test_rows_with_a_critic_must_agree_on_its_section():
    """One critic per seed serves every row with a critic, so their `critic:` sections
    must be equal; the check is by row, whatever the registry holds."""
    recipes = {
        "a": SimpleNamespace(critic=CriticSettings()),
        "b": SimpleNamespace(critic=CriticSettings()),
        "c": SimpleNamespace(critic=CriticSettings(rollouts=2)),
    }
    assert _shared_critic_problems(SimpleNamespace(critic_rows=["a", "b"]), recipes) == []
    problems = _shared_critic_problems(SimpleNamespace(critic_rows=["a", "b", "c"]), recipes)
    assert len(problems) == 1 and "a, b, c share the critic stage" in problems[0]


def test_codecontests_training_refuses_a_critic_row_and_takes_filtered_n_at_k():
    """The critic's rollouts are judged with assert tests: a CodeContests training set
    (stdin/stdout problems) with critic-wmtp is refused, naming the keys; without it
    the setting loads, with n@k filtered on the public tests."""
    data = tiny()
    data["data"]["train_dataset"] = "codecontests"
    message = error_of(data)
    assert "data.train_dataset = 'codecontests' with algorithms critic-wmtp" in message
    assert "drop critic-wmtp from algorithms" in message
    data["algorithms"].remove("critic-wmtp")
    data["eval"]["ks"]["codecontests"] = [1]
    data["eval"]["filtered_n_at_k"] = {"codecontests": [[1, 2]]}
    data["data"]["max_solutions_per_problem"] = 4
    config, _ = load_config(data, base_dir=REPO)
    assert config.eval.filtered_for("codecontests") == [(1, 2)]
    assert config.data.max_solutions_per_problem == 4
