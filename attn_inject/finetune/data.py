"""The fine-tuning data: ``DIR/train`` and ``DIR/val`` in torchvision ImageFolder layout,
checked before anything runs, and transforms from the model's own timm data config.

    DIR/train/<class>/*.png      DIR/val/<class>/*.png      (the same class folders)

Everything is checked once up front, before any output is written: only regular files and
folders (links resolved once; a link that leads back into the folders, or to a folder seen
twice, is refused, as is a FIFO, a device or a dangling link named like an image), and
every image fully decoded (``Image.load()``, not just its header), so that nothing fails
mid-epoch. An image of 16-bit or 32-bit values (a 16-bit grayscale PNG, PIL mode ``I;16``;
a float TIFF, mode ``F``) is refused: torchvision's loader converts each image to 8-bit RGB
by clipping, which turns such an image white. Each bad file is named.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..core.errors import AttnInjectError
from ..core.files import file_kind

__all__ = ["DataError", "Folders", "check_folders", "data_config", "image_folders"]

SPLITS = ("train", "val")


class DataError(AttnInjectError, ValueError):
    """The data folder is missing, incomplete or holds an unreadable image."""


@dataclass(frozen=True)
class Folders:
    """A checked data folder: its class names (sorted, as ImageFolder orders them) and the
    number of images per split."""

    root: Path
    classes: tuple[str, ...]
    counts: dict[str, int]


def _images(folder: Path, seen: dict[str, Path]) -> list[Path]:
    """Every image file under ``folder``, walked as ImageFolder walks it (links followed),
    with each real folder visited once: a second visit (a link loop, or two links to one
    folder) and anything named like an image that is not a regular file raise DataError."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    found: list[Path] = []
    stack = [folder]
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if real in seen:
            raise DataError(
                f"--data: {current} leads to the folder {seen[real]} already read (a link loop, or two links "
                "to one folder, whose images would be read twice); remove the link"
            )
        seen[real] = current
        for entry in sorted(os.scandir(current), key=lambda e: e.name):
            path = Path(entry.path)
            try:
                mode = os.stat(path).st_mode  # follows a link once
            except OSError as error:
                if path.suffix.lower() in IMG_EXTENSIONS:
                    raise DataError(f"--data: {path} cannot be read ({error.strerror}); remove it") from None
                continue
            if stat.S_ISDIR(mode):
                stack.append(path)
            elif path.suffix.lower() in IMG_EXTENSIONS:
                if not stat.S_ISREG(mode):
                    raise DataError(f"--data: {path} is not a regular file ({file_kind(mode)}); remove it")
                found.append(path)
    return sorted(found)


# PIL modes of more than 8 bits a value: ``convert("RGB")`` clips them to 255
WIDE_MODES = ("I", "F")


def _decode(path: Path) -> None:
    """Decode the whole image once (``verify()`` reads headers only: a truncated JPEG passes
    it), and refuse one of wide values (see the module docstring)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
    except Exception as error:
        raise DataError(
            f"cannot decode image {path}: {type(error).__name__}: {str(error) or 'unreadable'}; "
            "remove or replace it"
        ) from None
    if mode.startswith(WIDE_MODES):
        raise DataError(
            f"--data: {path} is a PIL mode {mode} image (more than 8 bits a value), which the loader's "
            "conversion to 8-bit RGB would clip to white; save the images with 8 bits a channel (L, RGB)"
        )


def check_folders(root: str | Path, *, verify: bool = True) -> Folders:
    """Check ``root`` (see the module docstring); raise :class:`DataError` with one line."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"--data {root}: no such folder")
    if not root.is_dir():
        raise DataError(f"--data {root}: not a folder")
    if not any(root.iterdir()):
        raise DataError(
            f"--data {root}: the folder is empty; expected train/ and val/ with a folder per class"
        )
    classes: dict[str, tuple[str, ...]] = {}
    counts: dict[str, int] = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise DataError(
                f"--data {root}: no {split}/ folder; expected {'/ and '.join(SPLITS)}/ "
                "with a folder per class (torchvision ImageFolder layout)"
            )
        names = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))
        if not names:
            raise DataError(f"--data {root}: {split}/ has no class folders")
        files = []
        seen: dict[str, Path] = {}
        for name in names:
            found = _images(folder / name, seen)
            if not found:
                raise DataError(f"--data {root}: {split}/{name}/ holds no image")
            files += found
        classes[split] = names
        counts[split] = len(files)
        if verify:
            for path in files:
                _decode(path)
    train, val = classes["train"], classes["val"]
    if train != val:
        only_train = sorted(set(train) - set(val))
        only_val = sorted(set(val) - set(train))
        parts = [
            f"only in train/: {', '.join(only_train)}" if only_train else "",
            f"only in val/: {', '.join(only_val)}" if only_val else "",
        ]
        raise DataError(
            f"--data {root}: the class folders of train/ and val/ differ ({'; '.join(p for p in parts if p)})"
        )
    return Folders(root, train, counts)


def data_config(model: nn.Module, image_size: int | None) -> dict[str, Any]:
    """timm's data config for ``model`` (its ``pretrained_cfg``: mean, std, crop), the
    input size overridden by ``image_size``."""
    from timm.data import resolve_data_config

    args = {"input_size": (3, image_size, image_size)} if image_size else {}
    return resolve_data_config(args, model=model)


def image_folders(
    folders: Folders,
    config: dict[str, Any],
    *,
    no_aug: bool = False,
    hflip: float = 0.5,
    scale: tuple[float, float] | None = None,
) -> tuple[Any, Any]:
    """The train and val ImageFolder datasets with timm's ``create_transform``."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    common = {k: config[k] for k in ("input_size", "interpolation", "mean", "std")}
    train_tf = create_transform(**common, is_training=True, no_aug=no_aug, hflip=hflip, scale=scale)
    val_tf = create_transform(**common, is_training=False, crop_pct=config["crop_pct"])
    train = ImageFolder(str(folders.root / "train"), transform=train_tf)
    val = ImageFolder(str(folders.root / "val"), transform=val_tf)
    return train, val
