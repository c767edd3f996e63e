"""Recipe parsing and validation: every shipped recipe loads; every kind of bad input is refused clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.errors import UsageError
from finetune.recipe.load import load_recipe, parse_cli_overrides, recipe_yaml
from tests.conftest import REPO, write_recipe

SHIPPED = sorted(p for p in (REPO / "recipes").glob("**/*.yaml") if "sweeps" not in p.parts)  # sweeps: test_sweep


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO / "recipes").with_suffix("")) for p in SHIPPED])
def test_shipped_recipe_validates(path):
    # A recipe that starts from another's run (init_from) loads without it; the run is checked when it trains.
    recipe = load_recipe([str(path)] + (["--init_from", "null"] if "init_from:" in path.read_text() else []))
    assert recipe.model.model_name_or_path and recipe.data.dataset
    name = path.relative_to(REPO / "recipes").with_suffix("")
    assert recipe.training.output_dir == f"outputs/{str(name).replace('/', '-')}"
    first_lines = path.read_text().splitlines()[:8]
    assert any(f"accelerate launch --quiet finetune/run.py recipes/{name}.yaml" in line for line in first_lines)


def test_variants_extend_the_bf16_recipe():
    base = load_recipe([str(REPO / "recipes/lora_bf16.yaml")])
    qlora = load_recipe([str(REPO / "recipes/qlora_int4.yaml")])
    int8 = load_recipe([str(REPO / "recipes/lora_int8.yaml")])
    full = load_recipe([str(REPO / "recipes/full_bf16.yaml")])
    assert (qlora.model.quantization, qlora.model.bnb_4bit_quant_type, qlora.model.bnb_4bit_use_double_quant) == \
        ("int4", "nf4", True)
    assert base.model.dtype == "bfloat16" and qlora.model.dtype == int8.model.dtype == "auto"
    assert int8.model.quantization == "int8"
    assert full.model.use_lora is False and full.model.quantization == "none"
    for variant in (qlora, int8, full):  # inherited untouched
        assert variant.data.dataset == base.data.dataset
        assert variant.model.model_name_or_path == base.model.model_name_or_path


def test_command_line_overrides_are_typed(tmp_path, data_files, llama_dir):
    recipe_path = write_recipe(tmp_path / "r.yaml", model_name_or_path=str(llama_dir),
                               dataset=str(data_files["text"]), learning_rate=0.1)
    recipe = load_recipe([str(recipe_path), "--learning_rate", "1e-4", "--max_steps=3", "--bf16", "false",
                          "--lora_target_modules", "q_proj", "v_proj", "--use_lora", "--output_dir", "o"])
    assert recipe.training.learning_rate == pytest.approx(1e-4)
    assert recipe.training.max_steps == 3 and recipe.training.bf16 is False
    assert recipe.model.lora_target_modules == ["q_proj", "v_proj"] and recipe.model.use_lora is True
    assert recipe.training.output_dir == "o"


def test_resolved_recipe_loads_back_identically(tmp_path, data_files, llama_dir):
    recipe_path = write_recipe(tmp_path / "r.yaml", model_name_or_path=str(llama_dir),
                               dataset=str(data_files["alpaca"]), quantization="int4", lora_r=4,
                               output_dir=str(tmp_path / "out"))
    recipe = load_recipe([str(recipe_path), "--max_steps", "7"])
    (tmp_path / "resolved.yaml").write_text(recipe_yaml(recipe))
    again = load_recipe([str(tmp_path / "resolved.yaml")])
    assert again.resolved() == recipe.resolved()
    # Every variant's resolved recipe loads back, bnb_4bit_* defaults included where quantization is none.
    plain = load_recipe([str(recipe_path), "--quantization", "none"])
    (tmp_path / "plain.yaml").write_text(recipe_yaml(plain))
    assert load_recipe([str(tmp_path / "plain.yaml")]).resolved() == plain.resolved()
    written = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert written["max_steps"] == 7 and written["quantization"] == "int4" and written["lora_r"] == 4
    assert "hub_token" not in written


def test_cli_parser_reports_stray_words():
    overrides, problems = parse_cli_overrides(["stray", "--a", "1", "--a", "2"])
    assert overrides == {"a": "2"}
    assert any("stray" in p for p in problems) and any("--a is given twice" in p for p in problems)


# Each bad input: the recipe keys (or raw text), extra CLI args, and a fragment the error must contain.
BAD_CASES = {
    "unknown key": ({"learning_rat": 1e-4}, [], "unknown key `learning_rat` in"),
    "unknown key suggestion": ({"lora_rank": 8}, [], "did you mean `lora_r`"),
    "unknown cli key": ({}, ["--max_step", "3"], "did you mean `max_steps`"),
    "wrong type": ({"learning_rate": "fast"}, [], "learning_rate: expected a float, got 'fast'"),
    "wrong type int": ({"lora_r": 1.5}, [], "lora_r: expected an int, got 1.5"),
    "wrong bool": ({"use_lora": "maybe"}, [], "use_lora: expected a boolean"),
    "choice": ({"quantization": "int3"}, [], "quantization: 'int3' is not one of none, int8, int4"),
    "choice suggestion": ({"dataset_format": "alpacca"}, [], "did you mean `alpaca`"),
    "trainer choice": ({"lr_scheduler_type": "cosin"}, [], "did you mean `cosine`"),
    "int4 without lora": ({"quantization": "int4", "use_lora": False}, [], "quantization: int4 needs use_lora"),
    "int8 without lora": ({"quantization": "int8", "use_lora": False}, [], "quantization: int8 needs use_lora"),
    "fraction and count": ({"eval_fraction": 0.1, "eval_size": 5}, [], "eval_fraction and eval_size are both"),
    "split and fraction": ({"eval_split": "test", "eval_fraction": 0.1}, [], "eval_split and eval_fraction"),
    "fraction range": ({"eval_fraction": 1.5}, [], "eval_fraction: must be in [0, 1)"),
    "eval without data": ({"eval_size": 0, "eval_strategy": "steps"}, [], "the eval split is empty"),
    "4bit keys without int4": ({"bnb_4bit_quant_type": "fp4"}, [], "only apply to quantization: int4"),
    "missing dataset": ({"dataset": "data/nope.jsonl"}, [], "dataset: no such file 'data/nope.jsonl'"),
    "missing model": ({"model_name_or_path": "./models/nope"}, [], "model_name_or_path: no such directory"),
    "secret on cli": ({}, ["--hub_token", "hf_abc"], "--hub_token: secrets don't belong on the command line"),
    "stray arg": ({}, ["oops"], "unexpected argument 'oops'"),
    "bad yaml": ("model_name_or_path: [unclosed\n", [], "invalid YAML at line"),
    "empty": ("", [], "the file is empty"),
    "not a mapping": ("- a\n- b\n", [], "expected a mapping"),
    "liger not installed": ({"use_liger_kernel": True}, [], "use_liger_kernel: needs the liger-kernel package"),
}


def _bad_recipe(tmp_path, keys, llama_dir, data_files) -> Path:
    path = tmp_path / "bad.yaml"
    if isinstance(keys, str):
        path.write_text(keys)
        return path
    base = {"model_name_or_path": str(llama_dir), "dataset": str(data_files["text"]),
            "output_dir": str(tmp_path / "out")}
    return write_recipe(path, **{**base, **keys})


@pytest.mark.parametrize("case", BAD_CASES, ids=list(BAD_CASES))
def test_bad_input_is_refused_with_the_key_named(case, tmp_path, llama_dir, data_files):
    keys, args, fragment = BAD_CASES[case]
    path = _bad_recipe(tmp_path, keys, llama_dir, data_files)
    with pytest.raises(UsageError) as error:
        load_recipe([str(path), *args])
    assert any(fragment in problem for problem in error.value.problems), error.value.problems
    assert not (tmp_path / "out").exists()


def test_missing_recipe_file_and_extends_cycle(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_recipe([str(tmp_path / "missing.yaml")])
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(UsageError, match="`extends` forms a cycle"):
        load_recipe([str(tmp_path / "a.yaml")])


def test_every_problem_is_reported_at_once(tmp_path, llama_dir, data_files):
    path = _bad_recipe(tmp_path, {"learning_rat": 1, "lora_r": "x", "quantization": "int9"}, llama_dir, data_files)
    with pytest.raises(UsageError) as error:
        load_recipe([str(path), "--max_step", "2"])
    assert len(error.value.problems) == 4


@pytest.mark.parametrize("case", ["unknown key", "int4 without lora", "missing dataset", "bad yaml"])
def test_command_line_exits_2_without_traceback_or_output(case, tmp_path, llama_dir, data_files):
    keys, args, fragment = BAD_CASES[case]
    path = _bad_recipe(tmp_path, keys, llama_dir, data_files)
    result = subprocess.run([sys.executable, str(REPO / "finetune/run.py"), str(path), *args],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "offline"},
                            timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and fragment in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no output_dir, no wandb/, nothing


def test_a_later_layer_replaces_the_eval_choice(tmp_path, data_files, llama_dir):
    """lora_bf16.yaml holds out eval_fraction 0.01; --eval_size on the command line replaces it, no clash."""
    recipe = load_recipe([str(REPO / "recipes/lora_bf16.yaml"), "--eval_size", "8"])
    assert (recipe.data.eval_size, recipe.data.eval_fraction, recipe.data.eval_split) == (8, None, None)
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {REPO / 'recipes/lora_bf16.yaml'}\neval_split: test\n")
    recipe = load_recipe([str(child)])
    assert (recipe.data.eval_split, recipe.data.eval_fraction) == ("test", None)
