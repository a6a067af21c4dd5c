"""Recipes: the built-ins, the four ways to give a recipe, and the errors for bad ones.

Expected values (positions, block kinds, allowed keys and values) are written out by hand
here, not read from ``attn_inject.recipes.recipe``, so that a change to what the loader allows shows
up as a failing test rather than passing silently.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torchvision
import yaml

import attn_inject as ai

# name -> (position, block kind, block parameters), as shipped in recipes/*.yaml.
BUILTINS = {
    "se_resnet": ("residual_branch", "se", {"ratio": 16}),
    "eca_resnet": ("residual_branch", "eca", {}),
    "cbam_resnet": ("residual_branch", "cbam", {"ratio": 16, "spatial_kernel": 7}),
    "se_after_every_stage": ("stage_output", "se", {"ratio": 16}),
    "eca_after_every_stage": ("stage_output", "eca", {}),
    "cbam_after_every_stage": ("stage_output", "cbam", {"ratio": 16, "spatial_kernel": 7}),
    "se_pre": ("pre_block", "se", {"ratio": 16}),
    "se_post": ("post_block", "se", {"ratio": 16}),
    "se_identity": ("identity_branch", "se", {"ratio": 16}),
    "gc_resnet": ("residual_branch", "timm:gc", {"rd_ratio": 1 / 16}),  # GCNet: c3-c5
    "coord_resnet": ("residual_branch", "timm:coord", {"rd_ratio": 1 / 32}),
}
STAGES = {"gc_resnet": (-3, -2, -1)}

POSITIONS = "residual_branch, pre_block, post_block, identity_branch, stage_output, conv_output"
BLOCK_KINDS = "cbam, eca, se"
RECIPE_KEYS = "name, description, init, target, rules, fallback"
# the residual recipes fall back to "after every convolution" in a network with no residual unit
WITH_FALLBACK = {"se_resnet", "eca_resnet", "cbam_resnet"}
RULE_KEYS = "block, at, stages, min_channels, max_channels, include, exclude, every, channels_last"
INIT_MODES = "identity, paper"

SE = {"kind": "se"}
RULE = {"block": SE, "at": "residual_branch"}


# --- 1. built-in recipes ---------------------------------------------------------------


def test_list_recipes_lists_exactly_the_shipped_recipes():
    assert sorted(ai.list_recipes()) == sorted(BUILTINS)
    assert all(isinstance(name, str) for name in ai.list_recipes())  # names, as list_blocks gives


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_recipe_loads_by_name_with_its_position_and_block(name):
    at, kind, params = BUILTINS[name]
    recipe = ai.load_recipe(name)
    assert recipe.name == name
    assert recipe.init == "identity"
    assert recipe.description  # every shipped recipe says what it does
    assert Path(recipe.source).name == f"{name}.yaml"
    assert len(recipe.rules) == 1
    (rule,) = recipe.rules
    assert rule.at == at
    assert rule.block.kind == kind
    assert dict(rule.block.params) == params
    assert (rule.stages, rule.min_channels, rule.max_channels, rule.include, rule.exclude, rule.every) == (
        STAGES.get(name),
        None,
        None,
        (),
        (),
        1,
    )


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_fallback_is_the_same_block_after_every_convolution(name):
    recipe = ai.load_recipe(name)
    if name not in WITH_FALLBACK:
        assert recipe.fallback == () and recipe.all_rules == recipe.rules
        return
    (rule,) = recipe.rules
    (backup,) = recipe.fallback
    assert backup.at == "conv_output"
    assert (backup.block, backup.name) == (rule.block, rule.name)
    assert recipe.all_rules == (rule, backup)


def test_get_recipe_gives_the_same_recipes_as_load_by_name():
    for name in ai.list_recipes():
        assert ai.get_recipe(name) == ai.load_recipe(name) and ai.get_recipe(name).name == name
    with pytest.raises(ai.RecipeError, match=r"unknown recipe 'se_resnt': the built-in recipes are "):
        ai.get_recipe("se_resnt")


# --- 2. name, Path, str path and dict load the same recipe; text round-trips -------------

CBAM_STAGES_YAML = """\
name: cbam_after_every_stage
description: CBAM after the last block of every stage
init: identity
rules:
  - block: {kind: cbam, ratio: 16, spatial_kernel: 7}
    at: stage_output
"""
CBAM_STAGES_DICT = {
    "name": "cbam_after_every_stage",
    "description": "CBAM after the last block of every stage",
    "init": "identity",
    "rules": [{"block": {"kind": "cbam", "ratio": 16, "spatial_kernel": 7}, "at": "stage_output"}],
}

# Every rule field set, two rules, a non-default init: a round trip that drops any is caught.
FULL_YAML = """\
name: full
description: every field set
init: paper
rules:
  - block: {kind: se, ratio: 8, pool: max, bias: false, divisor: 8}
    at: residual_branch
    stages: [0, -1]
    min_channels: 64
    max_channels: 512
    include: ['layer\\d\\.0\\b']
    exclude: [downsample, 'fc$']
    every: 2
  - block: eca
    at: conv_output
    stages: 2
    include: layer3
"""
FULL_DICT = {
    "name": "full",
    "description": "every field set",
    "init": "paper",
    "rules": [
        {
            "block": {"kind": "se", "ratio": 8, "pool": "max", "bias": False, "divisor": 8},
            "at": "residual_branch",
            "stages": [0, -1],
            "min_channels": 64,
            "max_channels": 512,
            "include": [r"layer\d\.0\b"],
            "exclude": ["downsample", "fc$"],
            "every": 2,
        },
        {"block": {"kind": "eca"}, "at": "conv_output", "stages": [2], "include": ["layer3"]},
    ],
}


def without_source(recipe: ai.Recipe) -> ai.Recipe:
    return dataclasses.replace(recipe, source="")


def test_recipe_loads_equally_from_name_path_str_and_dict(tmp_path):
    path = tmp_path / "cbam.yaml"
    path.write_text(CBAM_STAGES_YAML)
    by_name = ai.load_recipe("cbam_after_every_stage")
    by_path = ai.load_recipe(path)
    by_str = ai.load_recipe(str(path))
    by_dict = ai.load_recipe(CBAM_STAGES_DICT)
    assert (
        without_source(by_name)
        == without_source(by_path)
        == without_source(by_str)
        == without_source(by_dict)
    )
    assert Path(by_name.source).name == "cbam_after_every_stage.yaml"
    assert by_path.source == by_str.source == str(path)
    assert by_dict.source == "<dict>"


def test_recipe_with_every_field_loads_equally_from_path_str_and_dict(tmp_path, monkeypatch):
    path = tmp_path / "full.yaml"
    path.write_text(FULL_YAML)
    monkeypatch.chdir(tmp_path)
    loaded = [
        ai.load_recipe(path),
        ai.load_recipe(str(path)),
        ai.load_recipe("full.yaml"),
        ai.load_recipe(FULL_DICT),
    ]
    assert len({repr(without_source(r)) for r in loaded}) == 1
    first, second = loaded[0].rules
    assert first == ai.Rule(
        block=ai.BlockSpec("se", {"ratio": 8, "pool": "max", "bias": False, "divisor": 8}),
        at="residual_branch",
        stages=(0, -1),
        min_channels=64,
        max_channels=512,
        include=(r"layer\d\.0\b",),
        exclude=("downsample", "fc$"),
        every=2,
    )
    # Shorthands: a bare block kind, a single stage, a single pattern.
    assert second == ai.Rule(
        block=ai.BlockSpec("eca", {}), at="conv_output", stages=(2,), include=("layer3",)
    )
    assert loaded[0].init == "paper"


def test_load_recipe_returns_a_recipe_as_is():
    recipe = ai.load_recipe("se_resnet")
    assert ai.load_recipe(recipe) is recipe


@pytest.mark.parametrize("name", [*sorted(BUILTINS), "<full>"])
def test_recipe_text_round_trips_through_load_recipe(name, tmp_path):
    recipe = ai.load_recipe(FULL_DICT if name == "<full>" else name)
    path = tmp_path / "round_trip.yaml"
    path.write_text(recipe.text)
    from_file = ai.load_recipe(path)
    from_dict = ai.load_recipe(yaml.safe_load(recipe.text))
    assert from_file.source == str(path)
    assert without_source(from_file) == without_source(recipe)
    assert without_source(from_dict) == without_source(recipe)
    assert from_file.text == recipe.text


# --- 3. bad recipes: one RecipeError naming source, key and what is allowed --------------


class Bad(NamedTuple):
    recipe: Any  # a dict (source "<dict>"), YAML text (written to a file), or a name
    key: str | None  # the key the message must name, right after the source
    says: tuple[str, ...]  # what else the message must contain (what was wrong, what is allowed)
    form: str = "dict"  # "dict", "yaml" (written to tmp_path/recipe.yaml), "name", "missing_file"


def rule(**changes: Any) -> dict[str, Any]:
    return {**RULE, **changes}


def block(kind: str = "se", **params: Any) -> dict[str, Any]:
    return {"rules": [rule(block={"kind": kind, **params})]}


BAD = {
    "yaml_syntax_error": Bad(
        "name: broken\nrules:\n  - block: se\n    at: residual_branch\n   stages: [1]\n",
        None,
        ("invalid YAML", "line 5"),
        form="yaml",
    ),
    "top_level_not_a_mapping": Bad(
        "- block: se\n  at: residual_branch\n",
        None,
        ("must be a mapping", RECIPE_KEYS),
        form="yaml",
    ),
    "unknown_top_level_key": Bad(
        {"rules": [RULE], "descripton": "typo"},
        "descripton",
        ("unknown key", RECIPE_KEYS),
    ),
    "missing_rules": Bad({"name": "no_rules"}, "rules", ("non-empty list", "'block' and 'at'")),
    "empty_rules": Bad(
        "name: empty\nrules: []\n", "rules", ("non-empty list", "'block' and 'at'"), form="yaml"
    ),
    "rule_not_a_mapping": Bad({"rules": ["se"]}, "rules[0]", ("must be a mapping", RULE_KEYS)),
    "unknown_rule_key": Bad({"rules": [rule(stage=[1])]}, "rules[0].stage", ("unknown key", RULE_KEYS)),
    "missing_block": Bad(
        {"rules": [{"at": "residual_branch"}]}, "rules[0].block", ("missing", "'block' and 'at'")
    ),
    "missing_at": Bad({"rules": [{"block": SE}]}, "rules[0].at", ("missing", "'block' and 'at'")),
    "unknown_block_kind": Bad(block("sk"), "rules[0].block.kind", ("'sk'", BLOCK_KINDS)),
    "unknown_position": Bad(
        {"rules": [rule(at="after_block")]},
        "rules[0].at",
        ("unknown position 'after_block'", POSITIONS),
    ),
    "ratio_zero": Bad(block(ratio=0), "rules[0].block.ratio", ("0 is not allowed", "a number >= 1")),
    "ratio_negative": Bad(
        "rules:\n  - block: {kind: se, ratio: -2}\n    at: residual_branch\n",
        "rules[0].block.ratio",
        ("-2 is not allowed", "a number >= 1"),
        form="yaml",
    ),
    "cbam_spatial_kernel_4": Bad(
        block("cbam", spatial_kernel=4),
        "rules[0].block.spatial_kernel",
        ("4 is not allowed", "3, 5, 7"),
    ),
    "se_pool_mean": Bad(block(pool="mean"), "rules[0].block.pool", ("'mean' is not allowed", "'avg', 'max'")),
    "eca_kernel_size_4": Bad(
        block("eca", kernel_size=4),
        "rules[0].block.kernel_size",
        ("4 is not allowed", "an odd integer from 1 to"),
    ),
    "unknown_block_parameter": Bad(
        block(ratoi=16),
        "rules[0].block.ratoi",
        ("unknown parameter of block 'se'", "ratio, pool, bias, divisor"),
    ),
    "init_zeros_at_top_level": Bad(
        {"init": "zeros", "rules": [RULE]},
        "init",
        ("'zeros' is not allowed", INIT_MODES),
    ),
    "init_inside_a_block": Bad(block(init="paper"), "rules[0].block.init", ("top-level 'init'",)),
    "stages_not_a_list_of_ints": Bad(
        {"rules": [RULE, rule(stages="all")]},
        "rules[1].stages",
        ("list of stage indices", "integers", "'all'"),
    ),
    "stages_true": Bad(
        "rules:\n  - block: se\n    at: residual_branch\n  - block: se\n    at: residual_branch\n"
        "    stages: [true]\n",
        "rules[1].stages",
        ("list of stage indices", "integers", "[True]"),
        form="yaml",
    ),
    "min_channels_zero": Bad(
        {"rules": [rule(min_channels=0)]}, "rules[0].min_channels", ("integer >= 1", "got 0")
    ),
    "min_channels_above_max_channels": Bad(
        {"rules": [rule(min_channels=512, max_channels=64)]},
        "rules[0].min_channels",
        ("512", "greater than max_channels 64"),
    ),
    "every_zero": Bad({"rules": [rule(every=0)]}, "rules[0].every", ("integer >= 1", "got 0")),
    "include_invalid_regex": Bad(
        {"rules": [rule(include=["layer["])]},
        "rules[0].include",
        ("invalid regular expression 'layer['",),
    ),
    "unknown_recipe_name": Bad(
        "se_resnett",
        None,
        ("unknown recipe 'se_resnett'", *BUILTINS, "path to a .yaml file"),
        form="name",
    ),
    "missing_file": Bad(None, None, ("not found",), form="missing_file"),
    "fallback_not_a_list": Bad(
        {"rules": [RULE], "fallback": RULE}, "fallback", ("must be a list of rules", "'rules' place no block")
    ),
    "fallback_unknown_position": Bad(
        {"rules": [RULE], "fallback": [rule(at="after_conv")]},
        "fallback[0].at",
        ("unknown position 'after_conv'", POSITIONS),
    ),
}


def materialize(bad: Bad, tmp_path: Path) -> tuple[Any, str | None]:
    """The argument to pass to load_recipe, and the source its error must name."""
    if bad.form == "dict":
        return bad.recipe, "<dict>"
    if bad.form == "yaml":
        path = tmp_path / "recipe.yaml"
        path.write_text(bad.recipe)
        return path, str(path)
    if bad.form == "missing_file":
        path = tmp_path / "missing.yaml"
        return path, str(path)
    return bad.recipe, None  # a name has no file to name


def check_message(error: ai.RecipeError, bad: Bad, source: str | None) -> None:
    message = str(error)
    assert isinstance(error, ValueError)
    assert len(error.args) == 1 and "\n" not in message, "one message, on one line"
    # Raised fresh or `from None`: the user sees one error, not a chained traceback.
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    if source is not None:
        assert message.startswith(f"{source}: "), message
    if bad.key is not None:
        assert message.startswith(f"{source}: {bad.key}: "), message
    for expected in bad.says:
        assert expected in message, f"{expected!r} not in {message!r}"


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_recipe_raises_one_recipe_error_naming_source_key_and_allowed(case, tmp_path):
    bad = BAD[case]
    recipe, source = materialize(bad, tmp_path)
    with pytest.raises(ai.RecipeError) as info:
        ai.load_recipe(recipe)
    check_message(info.value, bad, source)


def test_recipe_error_is_a_value_error():
    assert issubclass(ai.RecipeError, ValueError)
    with pytest.raises(ValueError, match=r"^<dict>: rules: "):
        ai.load_recipe({"rules": []})


def test_str_path_error_names_the_path_as_given(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("rules:\n  - block: {kind: se, ratio: 0}\n    at: residual_branch\n")
    with pytest.raises(ai.RecipeError, match=r"broken\.yaml: rules\[0\]\.block\.ratio: 0 is not allowed"):
        ai.load_recipe(str(path))


def test_unknown_block_parameter_is_named_by_its_full_key():
    with pytest.raises(ai.RecipeError, match=r"^<dict>: rules\[0\]\.block\.ratoi: "):
        ai.load_recipe(block(ratoi=16))


@pytest.mark.parametrize(
    "params",
    [{"ratio": 1e-300}, {"divisor": 10**30}, {"kind": "eca", "kernel_size": 10**9 + 1}],
    ids=["tiny_ratio", "huge_divisor", "huge_kernel"],
)
def test_block_parameter_too_large_to_build_gives_a_one_line_message(params):
    kind = params.pop("kind", "se")
    with pytest.raises(ai.RecipeError) as info:
        ai.load_recipe(block(kind, **params))
    assert "\n" not in str(info.value)
    assert f"rules[0].block.{next(iter(params))}" in str(info.value)


# --- 4. plan and inject fail on a bad recipe before touching the model -------------------


def meta_resnet18() -> torch.nn.Module:
    with torch.device("meta"):
        return torchvision.models.resnet18()


def snapshot(model: torch.nn.Module) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    return (
        list(model.state_dict()),
        [(name, id(module)) for name, module in model.named_modules()],
        [(name, id(param)) for name, param in model.named_parameters()],
    )


@pytest.mark.parametrize("call", [ai.plan, ai.inject], ids=["plan", "inject"])
@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_plan_and_inject_raise_the_recipe_error_before_touching_the_model(case, call, tmp_path):
    bad = BAD[case]
    recipe, source = materialize(bad, tmp_path)
    model = meta_resnet18()
    before = snapshot(model)
    forward = model.forward
    with pytest.raises(ai.RecipeError) as info:
        call(model, recipe)
    check_message(info.value, bad, source)
    assert snapshot(model) == before
    assert model.forward == forward
    assert not hasattr(model, "attn_inject")


def test_meta_resnet18_plans_with_a_good_recipe():
    """The model used above is one plan() accepts, so the errors come from the recipe alone."""
    assert len(ai.plan(meta_resnet18(), "se_resnet").points) == 8  # 2 + 2 + 2 + 2 BasicBlocks


def test_yaml_key_given_twice_is_an_error_not_a_silent_override():
    text = "rules:\n  - block: se\n    at: pre_block\n    at: post_block\n"
    with pytest.raises(ai.RecipeError, match=r"<text>: invalid YAML at line 4.*'at' is given twice"):
        ai.load_recipe(text)


def test_recipe_text_loads_directly():
    recipe = ai.load_recipe("se_resnet")
    again = ai.load_recipe(recipe.text)
    assert again.rules == recipe.rules and again.name == recipe.name


def test_cbam_checks_conv_only_parameters_even_with_the_mlp():
    with pytest.raises(ai.RecipeError, match=r"rules\[0\]\.block\.kernel_size: 4 is not allowed"):
        ai.load_recipe(block("cbam", kernel_size=4))
    with pytest.raises(ai.RecipeError, match=r"rules\[0\]\.block\.gamma: -1 is not allowed"):
        ai.load_recipe(block("cbam", gamma=-1))


class _Unit(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.nn.functional.relu(self.conv(x))


def _LongNames() -> torch.nn.Module:
    """A residual unit under a 60-character module name: backtracking regexes blow up on it."""
    from collections import OrderedDict

    return torch.nn.Sequential(
        OrderedDict([("stem", torch.nn.Conv2d(3, 8, 3, padding=1)), ("a" * 60, _Unit())])
    )


def test_a_catastrophic_backtracking_pattern_runs_in_linear_time():
    import signal

    hostile = "^(.*a){12}X$"  # Python's re takes hours on a 60-character name
    recipe = {"rules": [{"block": "se", "at": "residual_branch", "include": [hostile]}]}

    def too_slow(*_):
        raise TimeoutError("a recipe pattern ran for 20 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        plan = ai.plan(_LongNames(), recipe, input_size=(3, 8, 8))
        matched = ai.plan(
            _LongNames(), {"rules": [{"block": "se", "at": "residual_branch", "include": ["^a+$"]}]}
        )
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert len(plan) == 0 and len(matched) == 1


@pytest.mark.parametrize(
    "pattern, why",
    [
        ("(a)\\1", "invalid escape sequence"),
        ("(?=layer)", "missing argument to repetition operator|invalid perl"),
        ("a" * 1001, "at most 1,000"),
    ],
)
def test_patterns_a_linear_engine_cannot_run_are_refused_in_one_line(pattern, why):
    with pytest.raises(ai.RecipeError, match=r"rules\[0\]\.include: invalid regular expression") as info:
        ai.load_recipe({"rules": [{"block": "se", "at": "residual_branch", "include": [pattern]}]})
    assert "\n" not in str(info.value)
    assert __import__("re").search(why, str(info.value))


@pytest.mark.parametrize(
    "value, says",
    [
        ("9" * 5000, "a number of 5,000 characters; at most 40 are read"),
        ("1:" * 200_000 + "1", "is a base-60 number; quote it or write it in base 10"),
    ],
)
def test_numbers_that_cost_unbounded_time_are_refused_in_one_line(value, says):
    text = f"rules:\n  - block: se\n    at: residual_branch\n    every: {value}\n"
    with pytest.raises(ai.RecipeError, match=r"<text>: invalid YAML at line 4") as info:
        ai.load_recipe(text)
    assert says in str(info.value) and "\n" not in str(info.value) and len(str(info.value)) < 500


def test_reading_a_recipe_of_built_in_blocks_does_not_probe_timms_attention_kinds():
    """timm's kinds are built and run once to be classified; only a 'timm:' kind needs that.
    Listing the shipped recipes (``attn-inject recipes``) resolves no kind, so imports no
    timm, and lists the recipes that ``get_recipe`` gives.

    The import check runs in a fresh process (this one has imported timm); the rest runs
    here, on emptied caches of ``timm_attention``."""
    import subprocess
    import sys

    from attn_inject.blocks import timm_attention
    from attn_inject.recipes.recipe import get_recipe, list_recipes, listed_recipes

    code = (
        "import sys\n"
        "from attn_inject.blocks.timm_attention import timm_kinds\n"
        "from attn_inject.recipes.recipe import get_recipe, list_recipes, listed_recipes\n"
        "listed = listed_recipes()\n"
        "assert 'timm' not in sys.modules, 'listing the recipes imported timm'\n"
        "get_recipe('cbam_after_every_stage'); get_recipe('se_resnet')\n"
        "assert timm_kinds.cache_info().currsize == 0, 'probed for a built-in recipe'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]

    for cached in vars(timm_attention).values():  # timm_kinds and what is derived from it
        if callable(getattr(cached, "cache_clear", None)):
            cached.cache_clear()
    listed = listed_recipes()
    get_recipe("cbam_after_every_stage")
    get_recipe("se_resnet")
    assert timm_attention.timm_kinds.cache_info().currsize == 0, "probed for a built-in recipe"
    get_recipe("gc_resnet")
    assert timm_attention.timm_kinds.cache_info().currsize == 1
    assert listed == [get_recipe(name) for name in list_recipes()]


# --- timm kinds: sizes bounded, kernel sizes odd, numbers never negative ----------------------


def timm_rule(block: str) -> str:
    return f"rules:\n  - block: {block}\n    at: stage_output\n"


def se_parameters(channels: int, hidden: int) -> int:
    """timm's SEModule: two 1x1 convolutions with biases, C -> hidden -> C."""
    return channels * hidden + hidden + hidden * channels + channels


def test_a_timm_block_is_bounded_by_an_mlp_four_times_as_wide_as_its_channels():
    budget = 2 * 4 * 64 * 64 + 64 * 64 + 4096  # the documented budget at 64 channels
    assert se_parameters(64, 256) <= budget < se_parameters(64, 320)
    ai.load_recipe(timm_rule("{kind: 'timm:se', rd_channels: 256}"))  # 4x as wide: allowed
    with pytest.raises(ai.RecipeError) as info:
        ai.load_recipe(timm_rule("{kind: 'timm:se', rd_channels: 320}"))
    message = str(info.value)
    assert message.startswith("<text>: rules[0].block.rd_channels: 320 is not allowed;"), message
    assert f"within {budget:,} parameters for 64 channels" in message
    assert f"it would hold {se_parameters(64, 320):,}" in message


@pytest.mark.parametrize("ratio, shown", [("300", "300"), ("1.0e+4", "10000.0")])
def test_a_huge_rd_ratio_is_refused_before_anything_is_allocated(ratio, shown):
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(ai.RecipeError) as info:
            ai.load_recipe(timm_rule(f"{{kind: 'timm:gc', rd_ratio: {ratio}}}"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    start = f"<text>: rules[0].block.rd_ratio: {shown} is not allowed; must be a value that"
    assert message.startswith(start), message
    assert "'timm:gc'" in message and "parameters for 64 channels" in message and "MiB" in message
    assert peak < 20 * 2**20, peak  # counted on the meta device: nothing the size of the block


def test_the_budget_grows_with_the_channels_of_each_insertion_point():
    with pytest.raises(ai.BlockParamError, match=r"rd_channels=300 is not allowed.*for 16 channels"):
        ai.create_block("timm:se", 16, rd_channels=300)  # a recipe checked at 64 channels allows it
    assert isinstance(ai.create_block("timm:se", 256, rd_channels=300), torch.nn.Module)


@pytest.mark.parametrize(
    "block, says",
    [
        ("{kind: 'timm:gc', rd_ratio: -0.5}", "rd_ratio: -0.5 is not allowed; must be a finite number >= 0"),
        ("{kind: 'timm:gc', rd_ratio: 0.0}", "rd_ratio: 0.0 is not allowed; must be a positive number"),
        ("{kind: 'timm:gc', rd_ratio: 1.0e4}", "YAML reads '1.0e4' as text, not a number"),
        ("{kind: 'timm:cbam', spatial_kernel_size: 8}", "spatial_kernel_size: 8 is not allowed; must be odd"),
        ("{kind: 'timm:eca', kernel_size: 4}", "kernel_size: 4 is not allowed; must be odd"),
    ],
)
def test_a_timm_parameter_that_would_fail_later_or_silently_is_refused_at_the_recipe(block, says):
    with pytest.raises(ai.RecipeError) as info:
        ai.load_recipe(timm_rule(block))
    assert says in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_an_odd_kernel_size_keeps_the_map_size_that_an_even_one_changes():
    from timm.layers import create_attn

    x = torch.randn(1, 64, 8, 12)
    assert create_attn("cbam", 64, spatial_kernel_size=7)(x).shape == x.shape
    with pytest.raises(RuntimeError):  # what the recipe check now keeps from reaching a plan
        create_attn("cbam", 64, spatial_kernel_size=8)(x)
    recipe = ai.load_recipe(timm_rule("{kind: 'timm:cbam', spatial_kernel_size: 9}"))
    assert recipe.rules[0].block.params == {"spatial_kernel_size": 9}


def test_a_block_that_cannot_be_built_is_named_with_its_parameters_cut():
    def fussy(channels: int, **params: Any) -> torch.nn.Module:
        raise ValueError("no such option")

    ai.register_block("fussy_block", fussy)
    try:
        with pytest.raises(ai.RecipeError) as info:
            ai.load_recipe(timm_rule("{kind: fussy_block, x: " + "y" * 300_000 + "}"))
    finally:
        ai.unregister_block("fussy_block")
    message = str(info.value)
    assert "block 'fussy_block' cannot be built with {'x': 'yyy" in message and "no such option" in message
    assert len(message) < 600 and "\n" not in message
