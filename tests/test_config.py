"""Every recipe composes and validates; bad keys, types and recipes fail with a clear message."""

from __future__ import annotations

import subprocess
import sys
import pytest

from alignment.errors import ConfigError
from alignment.run import RECIPE_PACKAGE, compose_config, rewrite_data_shorthand, shipped_dir

RECIPES = sorted(p.stem for p in shipped_dir(RECIPE_PACKAGE, "recipes").glob("*.yaml"))
# Recipes whose first stage needs a starting checkpoint from config.
NEEDS_INIT = {"dpo": ["dpo.init_from=/tmp/some_stage"], "reward": ["reward.init_from=/tmp/s"], "ppo": ["ppo.init_from=/tmp/s", "ppo.reward_from=/tmp/r"],
              "grpo": ["grpo.init_from=/tmp/s"], "rloo": ["rloo.init_from=/tmp/s"], "self_instruct_then_sft": ["self_instruct.init_from=/tmp/s"],
              "self_instruct": ["self_instruct.init_from=/tmp/s"]}


def test_recipes_are_packaged():
    assert {"sft", "dpo", "sft_then_dpo"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_validates(recipe):
    cfg = compose_config([f"+recipe={recipe}", *NEEDS_INIT.get(recipe, [])])
    assert cfg.recipe == recipe
    assert cfg.stages, f"recipe {recipe} lists no stages"
    assert cfg.run_name == recipe


def test_sft_then_dpo_lists_stages_in_order():
    assert compose_config(["+recipe=sft_then_dpo"]).stages == ["sft", "dpo"]


def test_override_reaches_typed_config():
    cfg = compose_config(["+recipe=sft_then_dpo", "dpo.beta=0.25", "run_name=x"])
    assert cfg.dpo.beta == 0.25 and cfg.run_name == "x"


def test_dpo_recipe_without_start_is_refused():
    with pytest.raises(ConfigError, match="dpo.init_from"):
        compose_config(["+recipe=dpo"])


def test_data_shorthand_becomes_file_option():
    assert rewrite_data_shorthand(["data=/x/train.jsonl", "data=suite", "sft.max_steps=1"]) == [
        "data=file", "data.path=/x/train.jsonl", "data=suite", "sft.max_steps=1"
    ]


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alignment.run", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_unknown_key_names_key_and_recipe():
    out = _cli("+recipe=sft_then_dpo", "dpo.betta=0.2")
    assert out.returncode != 0
    assert "dpo.betta" in out.stderr and "sft_then_dpo" in out.stderr


def test_wrong_type_names_key():
    out = _cli("+recipe=sft_then_dpo", "sft.learning_rate=abc")
    assert out.returncode != 0
    assert "sft.learning_rate" in out.stderr and "sft_then_dpo" in out.stderr


def test_misspelled_recipe_lists_recipes():
    out = _cli("+recipe=sft_then_dpoo")
    assert out.returncode != 0
    assert "sft_then_dpoo" in out.stderr and "sft_then_dpo" in out.stderr.replace("sft_then_dpoo", "")


def test_no_recipe_says_how_to_pick_one(tmp_path):
    out = _cli(f"output_dir={tmp_path}")
    assert out.returncode != 0 and "+recipe=" in out.stderr


def test_hydra_cfg_job_prints_composed_config():
    out = _cli("+recipe=sft_then_dpo", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "stages:" in out.stdout and "beta: 0.1" in out.stdout


def test_hydra_help_lists_groups():
    out = _cli("--help")
    assert out.returncode == 0
    for group in ("model", "data", "sft", "dpo", "recipe"):
        assert group in out.stdout


def test_a_preset_of_your_own_sets_model_and_stage_defaults(tmp_path):
    """The README's recipe for one's own model: a model/<name>.yaml on Hydra's search path."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "my_llama.yaml").write_text(
        "# @package _global_\nmodel:\n  preset: my_llama\n  name_or_path: /models/my-llama\n  peft: lora\n"
        "sft: {learning_rate: 2e-4, max_seq_tokens: 4096}\n")
    cfg = compose_config(["+recipe=sft_then_dpo", "model=my_llama", f"hydra.searchpath=[file://{tmp_path}]"])
    assert (cfg.model.name_or_path, cfg.model.peft, cfg.sft.learning_rate, cfg.sft.max_seq_tokens) == ("/models/my-llama", "lora", 2e-4, 4096)
    assert cfg.dpo.learning_rate == 5e-7, "what the preset leaves alone keeps the real-model default"
