"""The DeepSpeed config the trainer builds: the ZeRO stage is written once, as
`train.zero_stage` (templates carry none and one that sets it is refused), stage 3 is
refused by the schema, and every shipped setting builds the config pinned here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from wmtp.config.schema import ConfigError, TrainSettings, load_config
from wmtp.stages import train as train_lib

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = sorted((REPO / "config" / "deepspeed").glob("*.json"))
OPTIMIZER = {"type": "AdamW", "params": {"betas": [0.9, 0.95], "eps": 1e-08, "weight_decay": 0.0}}
COMMON = {"steps_per_print": 1000000000, "wall_clock_breakdown": False, "gradient_clipping": 1.0}
ZERO2 = {
    "contiguous_gradients": True,
    "overlap_comm": False,
    "reduce_scatter": True,
    "reduce_bucket_size": 50000000,
    "allgather_bucket_size": 50000000,
}
# (setting, device, bf16) -> what every training of that setting hands DeepSpeed
PINNED = {
    ("config.yaml", "cpu", False): {
        **COMMON,
        "optimizer": {**OPTIMIZER, "params": {**OPTIMIZER["params"], "lr": 2e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 0},
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": False},
    },
    ("ci.yaml", "cpu", False): {
        **COMMON,
        "optimizer": {**OPTIMIZER, "params": {**OPTIMIZER["params"], "lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 0},
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": False},
    },
    ("smol.yaml", "cuda", True): {
        **COMMON,
        "optimizer": {**OPTIMIZER, "params": {**OPTIMIZER["params"], "lr": 2e-5}},
        "zero_optimization": {"stage": 0},
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "bf16": {"enabled": True},
    },
    ("paper.yaml", "cuda", True): {
        **COMMON,
        "optimizer": {**OPTIMIZER, "params": {**OPTIMIZER["params"], "lr": 2e-5}},
        "zero_optimization": {"stage": 2, **ZERO2},
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "bf16": {"enabled": True},
    },
}


def tiny() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.mark.parametrize("key", PINNED, ids=lambda key: "-".join(map(str, key)))
def test_every_shipped_setting_builds_its_pinned_deepspeed_config(key):
    name, device_type, bf16 = key
    _, recipes = load_config(REPO / "config" / name, base_dir=REPO)
    for recipe in recipes.values():
        built = train_lib.deepspeed_config(recipe.train, bf16=bf16, device_type=device_type)
        assert built == PINNED[key], recipe.algorithm
        assert next(iter(built["zero_optimization"])) == "stage"


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_no_shipped_template_sets_a_stage(template):
    assert "stage" not in json.loads(template.read_text()).get("zero_optimization", {})


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_the_stage_is_train_zero_stage_and_the_templates_knobs_stay(stage, template):
    settings = TrainSettings(zero_stage=stage, deepspeed_config=str(template.relative_to(REPO)))
    built = train_lib.deepspeed_config(settings, bf16=False, device_type="cpu")
    knobs = json.loads(template.read_text()).get("zero_optimization", {})
    assert built["zero_optimization"] == {"stage": stage, **knobs}


def test_a_template_that_sets_a_stage_is_refused_when_the_config_loads(tmp_path):
    staged = tmp_path / "staged.json"
    staged.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    data = tiny()
    data["train"]["deepspeed_config"] = str(staged)
    with pytest.raises(ConfigError) as error:
        load_config(data, base_dir=REPO)
    assert (
        f"train.deepspeed_config = '{staged}': staged.json sets zero_optimization.stage = 2; "
        "the stage is train.zero_stage alone" in str(error.value)
    )


def test_a_recipe_with_a_staged_template_is_refused_naming_the_recipe(tmp_path):
    staged = tmp_path / "staged.json"
    staged.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 1}}))
    recipe = tmp_path / "baseline-mtp.yaml"
    recipe.write_text(yaml.safe_dump({"algorithm": "baseline-mtp", "train": {"deepspeed_config": str(staged)}}))
    data = tiny()
    data["recipes"]["baseline-mtp"] = str(recipe)
    with pytest.raises(ConfigError, match=r"recipes\.baseline-mtp .*staged\.json sets zero_optimization\.stage = 1"):
        load_config(data, base_dir=REPO)


def test_zero_stage_3_is_refused_when_the_config_loads():
    """The weighted MTP loss runs the heads outside module forwards, where ZeRO-3 has
    not gathered their parameters (wmtp.core.loss refuses such parameters too)."""
    data = tiny()
    data["train"]["zero_stage"] = 3
    with pytest.raises(ConfigError, match=r"train\.zero_stage = 3: Input should be 0, 1 or 2"):
        load_config(data, base_dir=REPO)
