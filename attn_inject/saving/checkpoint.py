"""Reading checkpoints without running code from them, and writing safetensors atomically.

    >>> sd = read_state_dict("resnet50_ddp.pth")      # unwraps {"state_dict": {"module.x": ...}}
    >>> check_fits(model, sd, source="checkpoint resnet50_ddp.pth")
    >>> write_safetensors("patched.safetensors", model.state_dict(), {"recipe": text})

PyTorch files are loaded with ``torch.load(..., weights_only=True)`` only: a pickle that
holds anything besides tensors and plain containers is refused, never executed. timm's
training checkpoints (``train.py`` writes ``checkpoint-N.pth.tar``, ``model_best.pth.tar``)
keep their command line as an ``argparse.Namespace``: that one class is allowed while such a
file is read (never for the process), and each Namespace must then hold plain values only
(None, bools, numbers, strings, lists, tuples and dicts of them, bounded in size).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import os
import re
import signal
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from ..core.errors import AttnInjectError
from ..core.messages import cut, first_line, shown
from ..core.values import is_number

__all__ = [
    "SAFETENSORS_SUFFIX",
    "TORCH_SUFFIXES",
    "TRAINING_SUFFIX",
    "CheckpointError",
    "TrainingCheckpoint",
    "check_fits",
    "is_torch_file_name",
    "read_safetensors_metadata",
    "read_safetensors_shapes",
    "read_state_dict",
    "read_training_checkpoint",
    "unwrap_state_dict",
    "write_safetensors",
]

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
TRAINING_SUFFIX = ".pth.tar"  # timm's train.py (CheckpointSaver): a torch.save zip, despite the name
SAFETENSORS_SUFFIX = ".safetensors"
# The entries of a training checkpoint that hold an EMA copy of the weights (timm: state_dict_ema).
EMA_KEYS = ("state_dict_ema", "model_ema")
# What a Namespace in a checkpoint may hold: plain values, this many in all, this deep.
MAX_NAMESPACE_VALUES = 10_000
MAX_NAMESPACE_DEPTH = 6
MAX_NAMESPACE_TEXT = 1 << 16

# Where training scripts keep the weights, in the order they are tried.
# "state_dict" comes before "state_dict_ema" so the raw weights win when both are present.
STATE_DICT_KEYS = (
    "state_dict",
    "model",
    "state_dict_ema",
    "model_ema",
    "module",
    "net",
    "network",
    "weights",
    "params",
)
_MAX_DEPTH = 3
# DataParallel/DistributedDataParallel and torch.compile wrappers.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 3


class CheckpointError(AttnInjectError, ValueError):
    """A checkpoint cannot be read, does not fit the model, or cannot be written."""


def is_torch_file_name(path: str | os.PathLike) -> bool:
    """A name ``torch.save`` files go by: ``.pth``, ``.pt``, ``.bin`` or timm's ``.pth.tar``."""
    name = Path(path).name.lower()
    return name.endswith(TRAINING_SUFFIX) or Path(name).suffix in TORCH_SUFFIXES


def read_state_dict(path: str | os.PathLike, *, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in a ``.safetensors``, ``.pth``, ``.pt``, ``.bin`` or ``.pth.tar`` file,
    unwrapped (see :func:`unwrap_state_dict`) and on the CPU. ``use_ema``: the EMA copy of
    a training checkpoint (timm's ``state_dict_ema``), refused when it has none."""
    obj = _read_checkpoint(Path(path))
    if use_ema:
        obj = _ema_of(obj, Path(path))
    return unwrap_state_dict(obj, source=f"checkpoint {Path(path)}")


@dataclass(frozen=True)
class TrainingCheckpoint:
    """What a timm training checkpoint holds besides the optimizer: the weights (EMA or
    not), the model name it was trained as (``arch``), its epoch and command line (``args``,
    plain values), each None where the file has none."""

    state_dict: dict[str, torch.Tensor]
    arch: str | None
    epoch: int | None
    args: Mapping[str, Any]


def read_training_checkpoint(path: str | os.PathLike, *, use_ema: bool = False) -> TrainingCheckpoint:
    """A training checkpoint (timm's ``.pth.tar``, or any ``torch.save`` of a dict with a
    state dict inside), read with :func:`read_state_dict`'s rules."""
    p = Path(path)
    obj = _read_checkpoint(p)
    weights = unwrap_state_dict(_ema_of(obj, p) if use_ema else obj, source=f"checkpoint {p}")
    top = obj if isinstance(obj, Mapping) else {}
    arch, epoch, args = top.get("arch"), top.get("epoch"), top.get("args")
    return TrainingCheckpoint(
        state_dict=weights,
        arch=arch if isinstance(arch, str) and len(arch) <= 200 else None,
        epoch=epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
        args=dict(vars(args)) if isinstance(args, argparse.Namespace) else {},
    )


def _read_checkpoint(p: Path) -> Any:
    """The object a checkpoint file holds: tensors and plain containers only."""
    if not p.exists():
        raise CheckpointError(f"cannot read checkpoint {p}: no such file")
    if not p.is_file():
        raise CheckpointError(f"cannot read checkpoint {p}: it is a directory, not a file")
    if p.suffix.lower() == SAFETENSORS_SUFFIX:
        return _load_safetensors(p)
    if is_torch_file_name(p):
        return _load_torch(p)
    allowed = ", ".join((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES, TRAINING_SUFFIX))
    raise CheckpointError(
        f"cannot read checkpoint {p}: unknown suffix {p.suffix or '(none)'!r}; allowed: {allowed}"
    )


def _ema_of(obj: Any, p: Path) -> Any:
    """The EMA weights of a training checkpoint, or one line saying it has none."""
    if isinstance(obj, Mapping):
        for key in EMA_KEYS:
            if obj.get(key) is not None:
                return obj[key]
        keys = [cut(str(k), 40) for k in obj]
        seen = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
        what = f"its top-level keys are {seen or '(none)'}"
    else:
        what = f"it holds a {type(obj).__name__}, not a training checkpoint"
    raise CheckpointError(
        f"checkpoint {p} has no EMA weights ({' or '.join(EMA_KEYS)}): {what}; drop use_ema (--use-ema) "
        "to read its weights"
    )


@contextlib.contextmanager
def _reading_safetensors(p: Path) -> Iterator[None]:
    """One clear error for a safetensors file that cannot be read or is not one."""
    try:
        yield
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {p}: {e.strerror or e}") from e
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"cannot read checkpoint {p}: not a valid safetensors file: {_first_line(e)}"
        ) from e


def _load_safetensors(p: Path) -> dict[str, torch.Tensor]:
    with _reading_safetensors(p):
        return safetensors.torch.load_file(p, device="cpu")


def _refuse_compressed(p: Path) -> None:
    """``torch.save`` stores every record of its zip uncompressed; a compressed one could
    expand to any size before a single key is checked."""
    try:
        with zipfile.ZipFile(p) as archive:
            packed = [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip: the loader says what it is
    if packed:
        raise CheckpointError(
            f"refused checkpoint {p}: record {cut(packed[0], 120)} is compressed, which torch.save never "
            "writes, and could expand without bound; re-save it with torch.save"
        )


# torch's list of globals its weights-only loader allows is one for the whole process
_ALLOWED_GLOBALS = threading.Lock()


@contextlib.contextmanager
def _namespace_allowed() -> Iterator[None]:
    """Within: ``argparse.Namespace`` allowed to torch's weights-only loader; then torch's
    list of allowed globals as the caller had it. torch's own ``safe_globals`` removes what
    it added on leaving, even an entry the caller had added before (timm's users allow
    ``argparse.Namespace`` themselves to read train.py's checkpoints), and its list is one
    for the process: the reads of this module take turns with it, and an entry another
    thread adds meanwhile is kept."""
    with _ALLOWED_GLOBALS:
        had = argparse.Namespace in torch.serialization.get_safe_globals()
        if not had:
            torch.serialization.add_safe_globals([argparse.Namespace])
        try:
            yield
        finally:
            if not had:
                rest = [g for g in torch.serialization.get_safe_globals() if g is not argparse.Namespace]
                torch.serialization.clear_safe_globals()
                torch.serialization.add_safe_globals(rest)


def _load_torch(p: Path) -> Any:
    if _looks_like_torch_file(p):
        _refuse_compressed(p)
    try:
        with warnings.catch_warnings():
            # Raised for protocol-4 pickles; the weights-only loader copes or refuses on its own.
            warnings.filterwarnings("ignore", message=".*Detected pickle protocol")
            # A sparse tensor is refused in one line once read; torch's note about checking it is noise.
            warnings.filterwarnings("ignore", message=".*Validating sparse tensor invariants")
            # timm's train.py saves its command line (args) as a Namespace: allowed while this
            # file is read, then checked to hold plain values only.
            with _namespace_allowed():
                obj = torch.load(p, map_location="cpu", weights_only=True)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {p}: {e.strerror or e}") from e
    except Exception as e:
        text = str(e)
        if not _looks_like_torch_file(p):
            pass  # garbage that the legacy loader started to unpickle: not a checkpoint at all
        elif "Weights only load failed" in text or "WeightsUnpickler error" in text:
            raise CheckpointError(
                f"refused checkpoint {p}: {_weights_only_reason(text)}; it is never unpickled as "
                f"arbitrary objects; if you trust it, re-save its state dict as {SAFETENSORS_SUFFIX}"
            ) from e
        raise CheckpointError(
            f"cannot read checkpoint {p}: not a readable PyTorch checkpoint (truncated, corrupt or "
            f"another format): {_first_line(e)}"
        ) from e
    _check_namespaces(obj, p)
    return obj


def _check_namespaces(obj: Any, p: Path) -> None:
    """Refuse a checkpoint whose ``argparse.Namespace`` (timm's ``args``) holds anything but
    plain values, or more of them than a command line has."""
    budget = [MAX_NAMESPACE_VALUES]

    def plain(value: Any, depth: int) -> bool:
        budget[0] -= 1
        if budget[0] < 0 or depth > MAX_NAMESPACE_DEPTH:
            return False
        if value is None or isinstance(value, bool) or is_number(value):
            return True
        if isinstance(value, (torch.device, torch.dtype)):  # e.g. args.device as torch keeps it
            return True
        if isinstance(value, str):
            return len(value) <= MAX_NAMESPACE_TEXT
        if isinstance(value, (list, tuple)):
            return all(plain(v, depth + 1) for v in value)
        if isinstance(value, dict):
            return all(isinstance(k, (str, int)) and plain(v, depth + 1) for k, v in value.items())
        return False

    def walk(value: Any, where: str, depth: int) -> None:
        if isinstance(value, argparse.Namespace):
            for key, item in vars(value).items():
                if not plain(item, 0):
                    raise CheckpointError(
                        f"refused checkpoint {p}: {where}.{cut(str(key), 60)} holds {shown(item, 60)}; "
                        f"an argparse.Namespace may hold only plain values (None, bools, numbers, strings, "
                        f"lists, tuples and dicts of them; at most {MAX_NAMESPACE_VALUES:,} in all)"
                    )
        elif depth < 32 and isinstance(value, (Mapping, list, tuple)):
            items: Iterable[tuple[Any, Any]] = (
                value.items() if isinstance(value, Mapping) else enumerate(value)
            )
            for key, item in items:
                if isinstance(item, (argparse.Namespace, Mapping, list, tuple)):
                    walk(item, f"{where}[{cut(str(key), 40)!r}]", depth + 1)

    walk(obj, "checkpoint", 0)


def _looks_like_torch_file(p: Path) -> bool:
    """A zip archive (torch.save's format) or a pickle stream (starts with PROTO, 0x80)."""
    with open(p, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _weights_only_reason(text: str) -> str:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it holds objects other than tensors and plain containers (global {found.group(1)})"
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    detail = found.group(1).strip() if found else "no detail given"
    return (
        "it may hold objects other than tensors and plain containers "
        f"(the weights-only loader stopped at: {detail})"
    )


def _first_line(e: BaseException) -> str:
    """``Type: first sentence`` of an exception, on one line."""
    text = first_line(e, limit=10_000).split(". ")[0].rstrip(".")
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor mapping inside a loaded checkpoint, with wrapper prefixes removed.

    ``obj`` is used as is when all its values are tensors; otherwise the first of
    ``STATE_DICT_KEYS`` that (recursively, 3 levels) holds one is used, so
    ``{"epoch": 3, "optimizer": ..., "state_dict": {"module.fc.weight": w}}`` gives
    ``{"fc.weight": w}``. ``module.`` and ``_orig_mod.`` are stripped, repeatedly and in any
    order, only while every key carries the prefix. ``source`` names the checkpoint in errors.
    """
    found = _find_state_dict(obj, 0)
    if found is None:
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"{source} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)"
            )
        keys = [cut(str(k), 80) for k in obj]
        seen = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "") if keys else "(none)"
        raise CheckpointError(
            f"{source} holds no state dict: top-level keys are {seen}; looked for a mapping of tensors "
            f"at the top level or under {', '.join(STATE_DICT_KEYS)}"
        )
    return _strip_prefixes(found)


def _is_tensor_mapping(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _find_state_dict(obj: Any, depth: int) -> Mapping[str, torch.Tensor] | None:
    if _is_tensor_mapping(obj):
        return obj
    if depth >= _MAX_DEPTH or not isinstance(obj, Mapping):
        return None
    for key in STATE_DICT_KEYS:
        if key in obj:
            found = _find_state_dict(obj[key], depth + 1)
            if found is not None:
                return found
    return None


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    items = list(state_dict.items())
    stripped = True
    while stripped and items:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) and len(k) > len(prefix) for k, _ in items):
                items = [(k[len(prefix) :], v) for k, v in items]
                stripped = True
    return dict(items)


def check_fits(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint"
) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` has exactly the keys and shapes of
    ``model.state_dict()``. Only shapes are compared, so ``model`` may be on the meta device."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = []
    for k, v in state_dict.items():
        want = expected.get(k)
        if want is None:  # an unexpected key, reported above
            continue
        if hasattr(v, "shape") and hasattr(want, "shape") and tuple(v.shape) != tuple(want.shape):
            mismatched.append(f"{k}: checkpoint {tuple(v.shape)}, model {tuple(want.shape)}")
    problems = [
        _count(missing, "missing key", "missing keys"),
        _count(unexpected, "unexpected key", "unexpected keys"),
        _count(mismatched, "shape mismatch", "shape mismatches"),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: {', '.join(problems)}; "
            "is it the right architecture and --model-kwargs?"
        )
    for key, value in state_dict.items():
        _check_kind(key, value, expected[key], source)


def _check_kind(key: str, value: Any, want: Any, source: str) -> None:
    """One line for a tensor the model's own could not take without losing what it holds:
    sparse, complex, or not floating point where the model's is (int8 or bool weights)."""
    if not isinstance(value, torch.Tensor) or not isinstance(want, torch.Tensor):
        return
    if value.layout != torch.strided:
        raise CheckpointError(
            f"{source}: {cut(key, 160)} is a {value.layout} tensor; only dense ones are read"
        )
    if value.is_complex():
        raise CheckpointError(f"{source}: {cut(key, 160)} is complex ({value.dtype}); weights must be real")
    if want.is_floating_point() and not value.is_floating_point():
        raise CheckpointError(
            f"{source}: {cut(key, 160)} holds {value.dtype} values where the model's {cut(key, 160)} is "
            f"{want.dtype}; a quantized or integer checkpoint is not read as weights"
        )


def _count(names: list[str], one: str, many: str) -> str:
    if not names:
        return ""
    shown = ", ".join(cut(n, 160) for n in names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")
    return f"{len(names)} {one if len(names) == 1 else many} ({shown})"


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    force: bool = False,
) -> None:
    """Write ``tensors`` and text ``metadata`` to ``path`` atomically: a temporary file in the
    same folder is moved onto ``path`` once complete, and removed on any failure, on SIGTERM
    and on SIGINT. Temporary files that a killed run left for ``path`` are removed first.

    Tensors are moved to the CPU and made contiguous; tensors sharing memory (tied weights)
    are written as separate copies. An existing ``path`` is replaced only with ``force``;
    without it the final step is a hard link, which fails if ``path`` appeared meanwhile, so
    of two writers racing for one ``path`` exactly one succeeds.
    """
    p = Path(path)
    if not p.name.lower().endswith(SAFETENSORS_SUFFIX) or p.name.lower() == SAFETENSORS_SUFFIX:
        raise CheckpointError(f"cannot write {p}: the file name must end with {SAFETENSORS_SUFFIX}")
    parent = p.parent
    if not parent.is_dir():
        what = "is a file, not a folder" if parent.exists() else "does not exist"
        raise CheckpointError(f"cannot write {p}: folder {parent} {what}")
    if p.is_dir():
        raise CheckpointError(f"cannot write {p}: it is a directory")
    if p.exists() and not force:
        raise CheckpointError(f"{p} exists; pass force=True (attn-inject: --force) to overwrite")
    meta = _check_metadata(p, metadata)
    prepared = _prepare_tensors(p, tensors)
    remove_stale_temporaries(p)
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=_temp_prefix(p), suffix=_TEMP_SUFFIX)
    except OSError as e:
        raise CheckpointError(f"cannot write {p}: folder {parent}: {e.strerror or e}") from None
    try:
        with _removed_on_signals(tmp):
            os.close(fd)
            safetensors.torch.save_file(prepared, tmp, metadata=meta)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, _file_mode(p))
            _move_into_place(tmp, p, force)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, FileExistsError):
            raise CheckpointError(f"cannot write {p}: {e.strerror or _first_line(e)}") from None
        if isinstance(e, Exception) and not isinstance(e, CheckpointError):
            raise CheckpointError(f"cannot write {p}: {_first_line(e)}") from e
        raise


_TEMP_SUFFIX = ".tmp"


def _temp_prefix(p: Path) -> str:
    """``.NAME.attn-inject-PID-``: hidden, and naming the process that writes it."""
    return f".{p.name}.attn-inject-{os.getpid()}-"


def remove_stale_temporaries(p: Path) -> list[Path]:
    """Remove the temporary files for ``p`` whose writing process is gone (killed mid-write);
    those of a live process are left alone. Returns what was removed."""
    pattern = re.compile(re.escape(f".{p.name}.attn-inject-") + r"(\d+)-\w+" + re.escape(_TEMP_SUFFIX))
    removed = []
    for candidate in p.parent.glob(f".{glob_escape(p.name)}.attn-inject-*{_TEMP_SUFFIX}"):
        found = pattern.fullmatch(candidate.name)
        if found is None or _process_alive(int(found.group(1))):
            continue
        with contextlib.suppress(OSError):
            candidate.unlink()
            removed.append(candidate)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _move_into_place(tmp: str, p: Path, force: bool) -> None:
    if force:
        os.replace(tmp, p)
        return
    try:
        os.link(tmp, p)  # fails if p exists: the no-overwrite check and the write are one step
    except FileExistsError:
        raise CheckpointError(f"{p} exists; pass force=True (attn-inject: --force) to overwrite") from None
    except OSError:  # a file system without hard links: reserve the name exclusively instead
        try:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise CheckpointError(
                f"{p} exists; pass force=True (attn-inject: --force) to overwrite"
            ) from None
        os.replace(tmp, p)
        return
    os.remove(tmp)


@contextlib.contextmanager
def _removed_on_signals(tmp: str) -> Iterator[None]:
    """Remove ``tmp`` if SIGTERM or SIGINT arrives, then let the signal act as it would have
    (the process ends, or KeyboardInterrupt). Only in the main thread, where handlers run,
    not for a signal the process ignores (a background job's SIGINT): the write goes on, and
    not for one whose handler Python did not install (``signal.getsignal`` gives None: set
    by the program embedding Python), which Python could not put back. Afterwards each
    signal gets back the operating system's record of its handler as it was (libc's
    ``sigaction``), so that a handler set below Python after it started, which Python's own
    records do not show (``faulthandler.register``'s), is the one the signal meets again."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        signal.signal(signum, previous[signum])
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        else:
            os.kill(os.getpid(), signum)  # the default action: end the process, as the signal asked

    recorded: dict[int, bytes | None] = {}
    for number in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(number) not in (signal.SIG_IGN, None):
            recorded[number] = _os_handler(number)
            previous[number] = signal.signal(number, handler)
    try:
        yield
    finally:
        for held, before in previous.items():
            if signal.getsignal(held) is handler:
                signal.signal(held, before)
                _put_back_os_handler(held, recorded[held])


_SIGACTION_BYTES = 512  # more than any libc's struct sigaction (152 bytes on Linux x86-64)


@functools.cache
def _libc() -> Any:
    """The C library, for ``sigaction``; None where it cannot be opened (Windows)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "sigaction") else None
    except (OSError, TypeError):
        return None


def _os_handler(number: int) -> bytes | None:
    """The operating system's record of what signal ``number`` runs (libc ``sigaction``), as
    bytes to put back unread; None where it cannot be read."""
    libc = _libc()
    if libc is None:
        return None
    record = ctypes.create_string_buffer(_SIGACTION_BYTES)
    return record.raw if libc.sigaction(number, None, record) == 0 else None


def _put_back_os_handler(number: int, record: bytes | None) -> None:
    """Signal ``number``'s handler as :func:`_os_handler` read it (nothing when it read none)."""
    libc = _libc()
    if record is not None and libc is not None:
        libc.sigaction(number, ctypes.create_string_buffer(record, _SIGACTION_BYTES), None)


def _check_metadata(p: Path, metadata: Mapping[str, str]) -> dict[str, str]:
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            bad = f"key {k!r}" if not isinstance(k, str) else f"value of {k!r} is {type(v).__name__}"
            raise CheckpointError(
                f"cannot write {p}: metadata {bad}; safetensors metadata keys and values must be str"
            )
    return dict(metadata)


def _prepare_tensors(p: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prepared: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for k, v in tensors.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(
                f"cannot write {p}: entry {k!r} is {type(k).__name__} -> {type(v).__name__}; "
                "only str names mapped to tensors can be written"
            )
        if v.is_meta:
            raise CheckpointError(
                f"cannot write {p}: tensor {k!r} is on the meta device and holds no data; "
                "load or initialise the weights first"
            )
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:  # shares memory with a tensor already written (tied weights)
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if ptr:
            storages.add(ptr)
        prepared[k] = t
    return prepared


def _file_mode(p: Path) -> int:
    """The mode a new file would get (``mkstemp`` creates ``0o600``); an overwritten file keeps its own."""
    try:
        return p.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text metadata in a ``.safetensors`` header (``{}`` when it has none)."""
    p = Path(path)
    if not p.is_file():
        what = "it is a directory, not a file" if p.is_dir() else "no such file"
        raise CheckpointError(f"cannot read metadata of {p}: {what}")
    try:
        with safetensors.safe_open(p, "pt") as f:
            return dict(f.metadata() or {})
    except OSError as e:
        raise CheckpointError(f"cannot read metadata of {p}: {e.strerror or e}") from e
    except Exception as e:
        raise CheckpointError(
            f"cannot read metadata of {p}: not a valid safetensors file: {_first_line(e)}"
        ) from e


def read_safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor in a ``.safetensors`` file, read from its header
    only: nothing is allocated for the tensors."""
    p = Path(path)
    with _reading_safetensors(p), safetensors.safe_open(p, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
