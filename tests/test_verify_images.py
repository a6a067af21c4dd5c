"""``--no-verify-images``: the full decoding pass before training is skipped only when asked
(for a dataset the user trusts); by default a corrupt image stops the run before anything is
written."""

from __future__ import annotations

from pathlib import Path

import pytest

from attn_inject.cli.main import main
from attn_inject.finetune import run as run_module
from attn_inject.finetune.data import DataError, check_folders

from .test_finetune_run import finetune_args, save_patched, write_folder


def with_a_corrupt_image(root: Path) -> Path:
    write_folder(root, {"train": 4, "val": 2})
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    return root


def test_the_decoding_pass_finds_a_corrupt_image_and_skipping_it_does_not(tmp_path):
    root = with_a_corrupt_image(tmp_path / "data")
    with pytest.raises(DataError, match=r"broken\.png"):
        check_folders(root)
    folders = check_folders(root, verify=False)
    assert folders.counts == {"train": 13, "val": 6}


def test_finetune_decodes_every_image_unless_told_not_to(tmp_path, monkeypatch, capsys):
    root = with_a_corrupt_image(tmp_path / "data")
    checkpoint = save_patched(tmp_path / "cbam.safetensors")
    assert main(finetune_args(checkpoint, root, tmp_path / "checked")) == 1
    assert "broken.png" in capsys.readouterr().err and not (tmp_path / "checked").exists()

    asked: list[bool] = []

    def recorded(data, *, verify=True):
        asked.append(verify)
        raise DataError("stop here: the test reads what was asked")

    monkeypatch.setattr(run_module, "check_folders", recorded)
    main(finetune_args(checkpoint, root, tmp_path / "trusted", "--no-verify-images"))
    main(finetune_args(checkpoint, root, tmp_path / "default"))
    assert asked == [False, True]
