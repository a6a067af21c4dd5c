"""Every bad input gets one clear line naming the file or option and what is allowed, never a
traceback; the command line exits 2 when the command itself is wrong and 1 when a well-formed
request fails."""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tracemalloc

import pytest
import timm
import torch
import torchvision

import attn_inject as ai
from attn_inject.cli.main import main

RULE = "rules:\n  - block: {kind: se, ratio: 8}\n    at: stage_output\n"
ALIAS_BOMB = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi", strict=True)),
        "rules: *i",
    ]
)


def one_line_error(call) -> str:
    with pytest.raises(ai.RecipeError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    assert info.value.__cause__ is None and (
        info.value.__context__ is None or info.value.__suppress_context__
    )
    return message


# --- recipes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, says",
    [
        (
            "? [a, b]\n: 1\n" + RULE,
            "invalid YAML at line 1, column 3: a key must be a plain value, got a list",
        ),
        (
            RULE.replace("kind: se, ratio: 8", "kind: cbam, spatial_kernel: 7.0"),
            "rules[0].block.spatial_kernel: 7.0 is not allowed; must be one of 3, 5, 7",
        ),
        (
            RULE.replace("ratio: 8", "ratio: 1e9"),
            "rules[0].block.ratio: '1e9' is not allowed; must be a number >= 1 "
            "(hidden width = channels / ratio) "
            "(YAML reads '1e9' as text, not a number; write it as 1000000000.0)",
        ),
        ("a: &a [*a]\n" + RULE, "an alias refers to a value that contains it"),
    ],
)
def test_recipe_text_errors_are_one_line(text, says):
    assert says in one_line_error(lambda: ai.load_recipe(text))


def test_recipe_merge_keys_are_valid_yaml_and_load(tmp_path):
    text = (
        "rules:\n"
        "  - block: &se {kind: se, ratio: 8, pool: max}\n"
        "    at: residual_branch\n"
        "  - block: {<<: *se, ratio: 4}\n"
        "    at: stage_output\n"
    )
    recipe = ai.load_recipe(text)
    assert recipe.rules[1].block == ai.BlockSpec("se", {"ratio": 4, "pool": "max"})
    with pytest.raises(ai.RecipeError, match="key 'ratio' is given twice"):
        ai.load_recipe(text.replace("{<<: *se, ratio: 4}", "{<<: *se, ratio: 4, ratio: 2}"))


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_a_recipe_file_that_is_not_utf8_is_one_line(tmp_path, encoding):
    content = ("name: café\n" + RULE).encode(encoding)
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    message = one_line_error(lambda: ai.load_recipe(path))
    assert message.startswith(f"{path}: the recipe file must be UTF-8 text; it is ")
    assert ("UTF-16" in message) == content.startswith(b"\xff\xfe")


def test_a_recipe_path_that_is_a_directory_says_so(tmp_path):
    folder = tmp_path / "recipes.yaml"
    folder.mkdir()
    assert one_line_error(lambda: ai.load_recipe(folder)) == f"{folder}: is a directory, not a recipe file"


def count_calls(call) -> int:
    """The Python and C function calls ``call()`` makes: a measure of its work that, unlike
    a time, does not depend on how loaded the machine is."""
    calls = [0]

    def profile(frame, event, arg) -> None:
        if event in ("call", "c_call"):
            calls[0] += 1

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return calls[0]


def test_recipe_alias_bomb_is_refused_in_one_line_with_little_work_and_memory(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 800
    messages: list[str] = []
    tracemalloc.start()
    try:
        calls = count_calls(lambda: messages.append(one_line_error(lambda: ai.load_recipe(path))))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "expands to more than 10000 values (aliases included)" in messages[0]
    # in proportion to the 727 bytes (about 12,000 calls), not to the 387 million strings
    assert calls < 200_000 and peak < 500 * 2**20, (calls, peak)


@pytest.mark.parametrize("kind", ["character device", "FIFO"])
def test_a_recipe_path_that_is_a_device_or_a_fifo_says_what_it_is(tmp_path, kind):
    if kind == "FIFO":
        path = tmp_path / "recipe.yaml"
        os.mkfifo(path)  # no writer: reading it would wait forever
    else:
        path = pathlib.Path("/dev/zero")  # reading it would never end
    message = one_line_error(lambda: ai.load_recipe(path))
    assert message.startswith(f"{path}: is a {kind}") and "not a regular file" in message, message
    assert "a recipe is a YAML file" in message and "not found" not in message


def test_a_huge_value_in_a_recipe_is_cut_in_the_message():
    text = RULE.replace("at: stage_output", "at: " + "x" * 100_000)
    message = one_line_error(lambda: ai.load_recipe(text))
    assert message.startswith("<text>: rules[0].at: unknown position 'xxx") and len(message) < 300


# --- command line ----------------------------------------------------------------------------


def cli(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


@pytest.mark.parametrize(
    "value, says",
    [
        (
            "num_classes=10.0",
            "--model-kwargs: num_classes=10.0 is not allowed; num_classes must be an integer",
        ),
        ("pretrained=true", "--model-kwargs: 'pretrained' is not allowed"),
        ("checkpoint_path=/etc/passwd", "--model-kwargs: 'checkpoint_path' is not allowed"),
        (
            "x=!!python/object/apply:os.system [ls]",
            "--model-kwargs 'x=!!python/object/apply:os.system [ls]': the value",
        ),
        ("global_pool=[a, b", "--model-kwargs 'global_pool=[a, b': the value"),
    ],
)
def test_bad_model_kwargs_exit_2_with_one_line_naming_the_option(capsys, value, says):
    code, err, _ = cli(capsys, "plan", "timm:resnet10t", "--recipe", "se_resnet", "--model-kwargs", value)
    assert code == 2 and len(err) == 1 and err[0].startswith("attn-inject: error: ") and says in err[0], err


def test_json_and_debug_before_the_command_are_honoured(capsys):
    for argv in (("--json", "blocks"), ("blocks", "--json")):
        code, _, out = cli(capsys, *argv)
        listed = json.loads(out)
        assert code == 0 and [b["kind"] for b in listed if b["offered"]] == [
            b.kind for b in ai.describe_blocks() if b.offered
        ]
        assert sorted(b["kind"] for b in listed if b["offered"]) == ai.list_blocks()
    code, err, _ = cli(capsys, "--debug", "plan", "timm:resnet10t", "--recipe", "no_such_recipe")
    assert code == 1 and err[0] == "Traceback (most recent call last):"
    code, err, _ = cli(capsys, "plan", "timm:resnet10t", "--recipe", "no_such_recipe")
    assert code == 1 and len(err) == 1


def test_validate_input_size_must_match_the_saved_plan(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    ai.save(ai.inject(timm.create_model("resnet10t"), "se_resnet", input_size=(3, 64, 64)), path)
    code, err, _ = cli(capsys, "validate", str(path), "--input-size", "64", "64")
    assert code == 2 and len(err) == 1, err
    assert (
        "--input-size 64 64: the model takes 3 sizes with 3 channels first, like its plan's 3 64 64" in err[0]
    )
    code, err, _ = cli(capsys, "validate", str(path), "--input-size", "3", "96", "96", "--device", "cpu")
    assert code == 0, err


@pytest.mark.parametrize("argv", [("--input-size", "0", "64", "64"), ("--input-size", "3", "64", "99999")])
def test_plan_input_size_out_of_range_exits_2(capsys, argv):
    code, err, _ = cli(capsys, "plan", "timm:resnet10t", "--recipe", "se_resnet", *argv)
    assert code == 2 and len(err) == 1 and "--input-size takes sizes from 1 to 8192" in err[0], err


def test_plan_target_gets_the_submodules_input_size_as_the_api_does(capsys):
    code, err, out = cli(
        capsys, "plan", "tv:resnet18", "--recipe", "se_resnet", "--target", "layer2", "--json"
    )
    assert code == 0, err
    api = ai.plan(torchvision.models.resnet18(), "se_resnet", target="layer2")
    data = json.loads(out)
    assert tuple(data["input_size"]) == tuple(api.input_size) and api.input_size[0] == 64
    assert [p["name"] for p in data["points"]] == [p.name for p in api]


def test_convert_target_gets_the_submodules_input_size(tmp_path, capsys):
    checkpoint = tmp_path / "in.pth"
    torch.save(torchvision.models.resnet18().state_dict(), checkpoint)
    out = tmp_path / "out.safetensors"
    code, err, _ = cli(capsys, "convert", "--model", "tv:resnet18", "--checkpoint", str(checkpoint),
                       "--recipe", "se_resnet", "--target", "layer2", "--out", str(out))  # fmt: skip
    assert code == 0, err
    assert ai.read_manifest(out).input_size[0] == 64 and len(ai.load(out).attn_inject.plan) == 2


# --- wrapped models --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wrap, says",
    [
        (torch.nn.DataParallel, "got a DataParallel wrapper; pass the model inside it: model.module"),
        (
            torch.compile,
            "got a torch.compile wrapper (OptimizedModule); pass the model inside it: model._orig_mod",
        ),
    ],
    ids=["DataParallel", "torch.compile"],
)
def test_wrapped_models_are_refused_saying_what_to_pass(tmp_path, wrap, says):
    model = timm.create_model("resnet10t").eval()
    for call in (ai.plan, ai.inject):
        with pytest.raises(ai.PlanError) as info:
            call(wrap(model), "se_resnet", input_size=(3, 64, 64))
        assert says in str(info.value) and "\n" not in str(info.value)
    patched = ai.inject(model, "se_resnet", input_size=(3, 64, 64))
    with pytest.raises(ai.CheckpointError, match=says.replace("(", r"\(").replace(")", r"\)")):
        ai.save(wrap(patched), tmp_path / "m.safetensors")


def test_a_ddp_wrapped_model_is_refused_saying_what_to_pass(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = timm.create_model("resnet10t").eval()
        with pytest.raises(
            ai.PlanError, match=r"got a DistributedDataParallel wrapper; pass .*: model\.module"
        ):
            ai.plan(torch.nn.parallel.DistributedDataParallel(model), "se_resnet", input_size=(3, 64, 64))
        patched = ai.inject(model, "se_resnet", input_size=(3, 64, 64))
        with pytest.raises(ai.CheckpointError, match=r"got a DistributedDataParallel wrapper"):
            ai.save(torch.nn.parallel.DistributedDataParallel(patched), tmp_path / "m.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.mark.processes
def test_a_closed_pipe_ends_quietly():
    import subprocess
    import sys
    from pathlib import Path

    command = f"{sys.executable} -m attn_inject --json recipes | head -c 300"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert len(done.stdout) == 300
    assert done.stderr == "" and done.returncode == 0, done.stderr


@pytest.mark.processes
@pytest.mark.parametrize(
    "redirect, says",
    [(">&-", "standard output is closed"), ("> /dev/full", "No space left on device")],
)
def test_output_that_cannot_be_written_fails_with_a_line_on_stderr(redirect, says):
    import subprocess

    command = f"{sys.executable} -m attn_inject recipes {redirect}"
    done = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=pathlib.Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 1, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attn-inject: error:") and says in lines[0], lines
