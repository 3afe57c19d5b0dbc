"""Recipe parsing, overrides and the shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import (
    REPO,
    assert_user_error,
    invoke,
)

from bitnet_convert.errors import RecipeError
from bitnet_convert.quant.schemes import PRESETS
from bitnet_convert.recipe import load_recipe, parse_assignment


@pytest.mark.parametrize("name", ["a48", "a48-fp4", "b158"])
def test_shipped_recipes_resolve_to_their_preset(name):
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert recipe.model == "builtin:reference"
    assert recipe.scheme.resolved() == PRESETS[name]


def test_overrides_reach_nested_fields_and_keep_the_rest():
    recipe = load_recipe(REPO / "recipes/a48.yaml", {"scheme.roles.down.bits": 6, "calibration.samples": 3})
    roles = recipe.scheme.resolved()
    assert roles["down"].bits == 6 and roles["down"].method == "absmax"  # defaults of ActivationSpec
    assert roles["qkv"] == PRESETS["a48"]["qkv"]
    assert recipe.calibration.samples == 3 and recipe.calibration.seq_len == 256


@pytest.mark.parametrize(
    ("text", "expected"),
    [("a.b=3", ("a.b", 3)), ("x=0.5", ("x", 0.5)), ("m=org/name", ("m", "org/name")), ("f=true", ("f", True)),
     ("t=null", ("t", None))],
)
def test_parse_assignment(text, expected):
    assert parse_assignment(text) == expected


def test_parse_assignment_needs_an_equals_sign():
    with pytest.raises(RecipeError, match=r"expected key\.path=value"):
        parse_assignment("scheme.preset")


def test_setting_inside_a_scalar_is_an_error():
    with pytest.raises(RecipeError, match="'model' is not a section"):
        load_recipe(REPO / "recipes/a48.yaml", {"model.path": "x"})


def test_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("calibration:\n  seq_len: 1\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: calibration\.seq_len: .*greater than or equal to 2.*got 1"):
        load_recipe(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="expected a mapping"):
        load_recipe(path)
    path.write_text("scheme: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_resolved_recipe_round_trips_through_yaml(tmp_path):
    recipe = load_recipe(REPO / "recipes/a48-fp4.yaml", {"seed": 7, "scheme.roles.o.topk": 0.25})
    path = tmp_path / "resolved.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe


def test_every_shipped_recipe_is_valid_and_writes_its_own_output():
    files = sorted((REPO / "recipes").glob("*.yaml"))
    assert {"a48", "a48-kd", "a48-qwt-kd", "a48-kv3-kd", "a48-blockwise", "a48-blockwise-kd", "b158"} <= {
        f.stem for f in files}
    for file in files:
        recipe = load_recipe(file)
        assert recipe.output == Path("out") / f"{file.stem}-reference", file.name
        assert (recipe.recovery.distill is not None) == file.stem.endswith("-kd"), file.name
        assert (recipe.recovery.qwt is not None) == ("qwt" in file.stem), file.name
        assert (recipe.recovery.blockwise is not None) == ("blockwise" in file.stem), file.name


def test_recipe_error_names_the_cross_field_check_before_work(tmp_path):
    result = invoke("quantize", "-r", REPO / "recipes/a48-qwt.yaml", "--set", "calibration.samples=0",
                    "--output", tmp_path / "o")
    assert_user_error(result, "recovery.qwt: fitted on calibration data")
    assert "Open checkpoint" not in result.output
