"""``validate()``: the checks a user needs to trust a patched model, each passed, failed or
skipped with its reason, and where it ran.

The reference is independent of the rewrite: the original model run as written, with each
inserted block applied at its point by hooks on the original's modules
(:mod:`attn_inject.reference`), calling the patched model's own blocks. Patched and
reference must agree for any blend and any weights (``init="paper"``, trained blocks); at
identity (every blend 0) the patched model must also match the plain original.

    >>> report = validate(model, patched, checks=("reference", "train", "gradients"))
    >>> print(report)            # a table: check, status, where, detail
    >>> report.passed, report.to_dict()
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .graph.trace import eval_mode
from .plan import count_params, default_input_size
from .reference import HookError, PointHooks, Reference, _join
from .rewrite import InjectionInfo

__all__ = ["CHECKS", "Check", "ValidationError", "ValidationReport", "validate"]

IDENTITY_TOLERANCE = 1e-5  # fp32: max |patched - reference| over max |reference|
GRADIENT_TOLERANCE = 1e-4  # fp32, of the largest gradient: backward sums in a different order
COMPILE_TOLERANCE = 1e-4  # fp32: a compiler may fuse and reorder
CHECKS = (
    "reference",  # patched == original + blocks by hooks, eval mode, any blend
    "identity",  # patched == plain original while every blend is 0
    "train",  # the same in train mode, same RNG state; BatchNorm statistics after
    "gradients",  # one backward; blends; every inserted weight within two SGD steps
    "parameters",  # parameters added == the plan's
    "shapes",  # output shapes and dtypes
    "finite",
    "compile",  # torch.compile matches eager
    "export",  # torch.export.export, its module matches eager
    "autocast",  # bf16 / fp16 autocast vs the reference (CUDA by default)
)
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


class ValidationError(ValueError):
    """The models cannot be validated (weights on the meta device, too big for the device)."""


@dataclass(frozen=True)
class Check:
    """One check's outcome: ``status`` passed / failed / skipped, ``where`` it ran (device,
    dtype, mode), ``detail`` the figures or the reason, ``point`` the block a failure is
    traced to."""

    name: str
    status: str
    where: str
    detail: str
    point: str = ""
    values: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        at = f" [at {self.point}]" if self.point else ""
        return f"{self.name}: {self.status.upper()} on {self.where}: {self.detail}{at}"


@dataclass(frozen=True)
class ValidationReport:
    """The outcome of :func:`validate`. ``passed`` is true when no check failed."""

    device: str
    input_shape: tuple[int, ...]
    init: str
    checks: tuple[Check, ...]
    unreachable: tuple[tuple[str, str], ...]  # (block, why no hook reaches its point)
    max_abs_diff: float  # patched vs the plain original, eval fp32, over every seed
    output_scale: float
    identity_expected: bool  # every block has a blend and every blend is 0
    params_added: int
    params_planned: int
    finite: bool

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / self.output_scale if self.output_scale > 0 else self.max_abs_diff

    @property
    def identity_ok(self) -> bool:
        return self.relative_diff <= IDENTITY_TOLERANCE

    @property
    def params_ok(self) -> bool:
        return self.params_added == self.params_planned

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.status == FAILED)

    def check(self, name: str) -> Check:
        """The check called ``name`` (the first one, for checks run per dtype)."""
        for c in self.checks:
            if c.name == name or c.name.startswith(f"{name} "):
                return c
        raise KeyError(f"no check {name!r}; ran: {', '.join(c.name for c in self.checks)}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        out["unreachable"] = [{"block": b, "reason": r} for b, r in self.unreachable]
        out.update(
            passed=self.passed,
            relative_diff=self.relative_diff,
            identity_ok=self.identity_ok,
            params_ok=self.params_ok,
        )
        return out

    def table(self) -> str:
        rows = [("check", "status", "where", "detail")]
        for c in self.checks:
            detail = f"{c.detail} [at {c.point}]" if c.point else c.detail
            rows.append((c.name, c.status.upper() if c.status == FAILED else c.status, c.where, detail))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        lines.insert(1, "  " + "  ".join("-" * w for w in widths) + "  " + "-" * 6)
        verdict = "PASSED" if self.passed else f"FAILED ({', '.join(c.name for c in self.failed)})"
        head = f"validation on {self.device}, input {tuple(self.input_shape)}, init={self.init}: {verdict}"
        tail = [f"  no hook reaches {b}: {r}" for b, r in self.unreachable]
        return "\n".join([head, *lines, *tail])

    def __str__(self) -> str:
        return self.table()


# --- devices -------------------------------------------------------------------------------


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValidationError("device 'cuda' was asked for, but CUDA is not available; use 'cpu' or 'auto'")
    return device


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _tensors_of(*models: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for model in models:
        for t in [*model.parameters(), *model.buffers()]:
            seen.setdefault(id(t), t)
    return list(seen.values())


def _on_device(original: nn.Module, patched: nn.Module, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Both models on ``device``: as they are when they are there already, else one copy of
    their (shared) weights, made directly on the device."""
    tensors = _tensors_of(original, patched)
    if all(t.device == device for t in tensors):
        return original, patched
    need = sum(t.numel() * t.element_size() for t in tensors)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.8 * free:
            raise ValidationError(
                f"the model's weights take {need / 2**30:.2f} GiB and {device} has {free / 2**30:.2f} GiB "
                "free; validate with device='cpu', or free GPU memory"
            )
    memo: dict[int, Any] = {}
    for t in tensors:
        moved = t.detach().to(device)
        memo[id(t)] = nn.Parameter(moved, t.requires_grad) if isinstance(t, nn.Parameter) else moved
    return copy.deepcopy((original, patched), memo)


@contextlib.contextmanager
def cudnn_settings(**flags: bool) -> Iterator[None]:
    """``torch.backends.cudnn`` flags set for the duration, then restored; TF32 is left as it
    is, the same for both runs compared. ``benchmark=False``: autotuning may pick different
    kernels for two runs. ``deterministic=True``: the fastest backward convolutions sum with
    atomics in an order that changes from run to run."""
    before = {name: getattr(torch.backends.cudnn, name) for name in flags}
    for name, value in flags.items():
        setattr(torch.backends.cudnn, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(torch.backends.cudnn, name, value)


def _where(device: torch.device, dtype: torch.dtype | str, mode: str) -> str:
    name = str(dtype).replace("torch.", "")
    tf32 = ""
    if device.type == "cuda" and dtype == torch.float32:
        tf32 = f", tf32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
    return f"{device} {name} {mode}{tf32}"


# --- model state ---------------------------------------------------------------------------


@contextlib.contextmanager
def _train_mode(*models: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for model in models for m in model.modules()]
    for m, _ in flags:
        m.__dict__["training"] = True
    try:
        yield
    finally:
        for m, flag in flags:
            m.__dict__["training"] = flag


class _Buffers:
    """A snapshot of every buffer (BatchNorm statistics), restored on demand and at exit."""

    def __init__(self, *models: nn.Module) -> None:
        self.saved = [
            (t, t.detach().clone()) for t in _tensors_of(*models) if not isinstance(t, nn.Parameter)
        ]

    def restore(self) -> None:
        with torch.no_grad():
            for t, value in self.saved:
                t.copy_(value)


def _tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor of a model's output (a tensor, or nested dicts / lists / tuples)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


def _outputs(model: Callable[[torch.Tensor], Any], x: torch.Tensor) -> list[torch.Tensor]:
    tensors = _tensors(model(x))
    if not tensors:
        raise ValidationError(f"{type(model).__name__} returned no tensor")
    return tensors


def _max_diff(got: list[torch.Tensor], expected: list[torch.Tensor]) -> tuple[float, float]:
    """(max |got - expected|, max |expected|) over every output tensor, in fp32."""
    if [g.shape for g in got] != [e.shape for e in expected]:
        return float("inf"), 1.0
    diff = max(float((g.float() - e.float()).abs().max()) for g, e in zip(got, expected, strict=True))
    scale = max(float(e.float().abs().max()) for e in expected)
    return diff, scale


def _relative(diff: float, scale: float) -> float:
    return diff / scale if scale > 0 else diff


@contextlib.contextmanager
def _block_inputs(blocks: dict[str, nn.Module], record: dict[str, torch.Tensor]) -> Iterator[None]:
    """Record each block's first input, by key, while the context is open."""

    def hook(key: str) -> Callable[..., None]:
        def pre(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                record.setdefault(key, args[0].detach().clone())

        return pre

    handles = [block.register_forward_pre_hook(hook(key)) for key, block in blocks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _locate(
    points: Sequence[PointHooks], expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]
) -> tuple[str, str]:
    """The point where the patched model departs from the reference, and how: the latest
    block upstream whose input still matches, before the first block whose input does not."""
    matching: list[str] = []
    for hooks in points:
        want = expected.get(hooks.key)
        if want is None:
            continue
        have = got.get(hooks.key)
        if have is None:
            return hooks.key, f"block {hooks.key} never ran in the patched model"
        diff, scale = _max_diff([have], [want])
        if _relative(diff, scale) > IDENTITY_TOLERANCE:
            before = [k for k in matching if k in hooks.upstream] or matching[-1:]
            if not before:
                return hooks.key, f"the input of {hooks.key} already differs (the model departs before it)"
            return before[-1], (
                f"{before[-1]}'s input matches, {hooks.key}'s does not: the model departs after "
                f"{before[-1]} (its output or its consumers' wiring)"
            )
        matching.append(hooks.key)
    if matching:
        sinks = [k for k in matching if not any(k in p.upstream for p in points if p.key != k)]
        last = (sinks or matching)[-1]
        return last, f"every block's input matches; the output departs after {last}"
    return "", "no block input was recorded"


# --- the checks ----------------------------------------------------------------------------


@dataclass
class _Run:
    """What every check needs: both compared modules on the device, the reference, inputs."""

    original: nn.Module
    patched: nn.Module
    reference: Reference
    inputs: list[torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    identity: bool  # every block has a blend and every blend is 0
    skip: frozenset[str]  # unreachable points, skipped by the reference (identity there)
    invalid: str  # why the reference cannot be built ('' when it can)

    def expected(self, x: torch.Tensor, record: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        with self.reference.hooked(self.original, record, self.skip):
            return _outputs(self.original, x)

    def tolerance(self) -> float:
        return IDENTITY_TOLERANCE if self.dtype == torch.float32 else torch.finfo(self.dtype).eps * 8


def _blends(reference: Reference) -> dict[str, list[nn.Parameter]]:
    return {
        key: [p for name, p in block.named_parameters() if name.split(".")[-1] == "blend"]
        for key, block in reference.blocks.items()
    }


def _eval_checks(run: _Run, wanted: set[str]) -> tuple[list[Check], float, float, bool]:
    where = _where(run.device, run.dtype, "eval")
    tol = run.tolerance()
    worst_ref = worst_id = 0.0
    ref_scale = id_scale = 0.0
    located: tuple[str, str] | None = None
    shapes_ok, finite = True, True
    shape_note = ""
    for x in run.inputs:
        with eval_mode(run.original), eval_mode(run.patched), torch.no_grad():
            plain = _outputs(run.original, x)
            ref_record: dict[str, torch.Tensor] = {}
            expected = plain
            if not run.invalid:
                try:
                    expected = run.expected(x, ref_record)
                except HookError as error:  # a hook met what the trace did not show
                    run.invalid = f"the reference could not run: {error}"
            got_record: dict[str, torch.Tensor] = {}
            with _block_inputs(run.reference.blocks, got_record):
                got = _outputs(run.patched, x)
        if [(g.shape, g.dtype) for g in got] != [(p.shape, p.dtype) for p in plain]:
            shapes_ok = False
            shape_note = (
                f"patched {[(tuple(g.shape), str(g.dtype)) for g in got]} vs "
                f"original {[(tuple(p.shape), str(p.dtype)) for p in plain]}"
            )
        finite = finite and all(bool(torch.isfinite(g).all()) for g in got)
        diff, scale = _max_diff(got, plain)
        if diff >= worst_id:
            worst_id, id_scale = diff, scale
        diff, scale = _max_diff(got, expected)
        if diff >= worst_ref:
            worst_ref, ref_scale = diff, scale
        failing = _relative(diff, scale) > tol or (run.identity and _relative(*_max_diff(got, plain)) > tol)
        if failing and located is None:
            located = _locate(run.reference.points, ref_record, got_record)
    checks = []
    seeds = f"{len(run.inputs)} batches"
    if "reference" in wanted:
        if run.invalid:
            checks.append(Check("reference", SKIPPED, where, run.invalid))
        else:
            rel = _relative(worst_ref, ref_scale)
            ok = rel <= tol
            detail = (
                f"max |patched - reference| = {worst_ref:.3g} ({rel:.3g} of output scale "
                f"{ref_scale:.3g}, tolerance {tol:g}; {seeds})"
            )
            point = ""
            if not ok and located is not None:
                point, why = located
                detail += f"; {why}"
            checks.append(
                Check(
                    "reference",
                    PASSED if ok else FAILED,
                    where,
                    detail,
                    point,
                    {"max_abs_diff": worst_ref, "relative_diff": rel},
                )
            )
    if "identity" in wanted:
        rel = _relative(worst_id, id_scale)
        if not run.identity:
            checks.append(
                Check(
                    "identity",
                    SKIPPED,
                    where,
                    f"not every blend is 0 (init=paper or trained blocks): max |patched - original| = "
                    f"{worst_id:.3g}; the reference check covers it",
                )
            )
        else:
            ok = rel <= tol
            exact = (
                "bit for bit"
                if worst_id == 0
                else f"max |patched - original| = {worst_id:.3g} ({rel:.3g} of {id_scale:.3g}, "
                f"tolerance {tol:g})"
            )
            point, why = located if (not ok and located is not None) else ("", "")
            checks.append(
                Check(
                    "identity",
                    PASSED if ok else FAILED,
                    where,
                    f"{exact}; {seeds}" + (f"; {why}" if why else ""),
                    point,
                    {"max_abs_diff": worst_id, "relative_diff": rel},
                )
            )
    if "shapes" in wanted:
        checks.append(
            Check(
                "shapes",
                PASSED if shapes_ok else FAILED,
                where,
                "output shapes and dtypes equal the original's" if shapes_ok else shape_note,
            )
        )
    if "finite" in wanted:
        checks.append(
            Check(
                "finite",
                PASSED if finite else FAILED,
                where,
                "every output finite" if finite else "NON-FINITE outputs",
            )
        )
    return checks, worst_id, id_scale, finite


def _train_check(run: _Run) -> Check:
    where = _where(run.device, run.dtype, "train")
    if run.invalid:
        return Check("train", SKIPPED, where, run.invalid)
    tol = run.tolerance()
    worst = 0.0
    scale = 0.0
    stats_worst = 0.0
    stats_name = ""
    located: tuple[str, str] | None = None
    devices = [run.device] if run.device.type == "cuda" else []
    buffers = _Buffers(run.original, run.patched)
    try:
        with _train_mode(run.original, run.patched), torch.no_grad():
            for seed, x in enumerate(run.inputs):
                ref_record: dict[str, torch.Tensor] = {}
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed)
                    expected = run.expected(x, ref_record)
                ref_stats = {n: b.detach().clone() for n, b in run.original.named_buffers()}
                buffers.restore()
                got_record: dict[str, torch.Tensor] = {}
                with torch.random.fork_rng(devices=devices), _block_inputs(run.reference.blocks, got_record):
                    torch.manual_seed(seed)
                    got = _outputs(run.patched, x)
                got_stats = {n: b.detach().clone() for n, b in run.patched.named_buffers()}
                buffers.restore()
                diff, s = _max_diff(got, expected)
                if diff >= worst:
                    worst, scale = diff, s
                if _relative(diff, s) > tol and located is None:
                    located = _locate(run.reference.points, ref_record, got_record)
                for name, a in ref_stats.items():
                    b = got_stats.get(name)
                    d, sc = _max_diff([b], [a]) if b is not None else (float("inf"), 1.0)
                    r = _relative(d, sc)
                    if r > stats_worst:
                        stats_worst, stats_name = r, name
    finally:
        buffers.restore()
    rel = _relative(worst, scale)
    ok = rel <= tol and stats_worst <= tol
    detail = (
        f"max |patched - reference| = {worst:.3g} ({rel:.3g} of {scale:.3g}); buffers after the step "
        f"(BatchNorm statistics) "
        f"{'agree' if stats_worst <= tol else f'DIFFER ({stats_name}: {stats_worst:.3g})'}"
        f"; same RNG seed per batch; modes and buffers restored"
    )
    point = ""
    if rel > tol and located is not None:
        point, why = located
        detail += f"; {why}"
    return Check(
        "train",
        PASSED if ok else FAILED,
        where,
        detail,
        point,
        {"relative_diff": rel, "buffers_relative_diff": stats_worst},
    )


def _loss(outputs: list[torch.Tensor], seed: int = 1234) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for out in outputs:
        if out.is_floating_point():
            weight = torch.randn(out.shape, generator=generator).to(out.device)
            total = total + (out.float() * weight).sum()
    return total


def _seeded_grads(
    model: nn.Module, x: torch.Tensor, params: list[nn.Parameter], devices: list
) -> list[torch.Tensor | None]:
    """The gradients of ``params`` after one forward under seed 0 (no ``.grad`` written)."""
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        loss = _loss(_outputs(model, x))
    if not params or not loss.requires_grad:
        return [None] * len(params)
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def _gradient_check(run: _Run) -> Check:
    where = _where(run.device, run.dtype, "train")
    x = run.inputs[0]
    devices = [run.device] if run.device.type == "cuda" else []
    own = [(n, p) for n, p in run.original.named_parameters() if p.requires_grad]
    patched = [(n, p) for n, p in run.patched.named_parameters() if p.requires_grad]
    buffers = _Buffers(run.original, run.patched)
    problems: list[str] = []
    unreached: list[str] = []
    point = ""
    try:
        with _train_mode(run.original, run.patched), cudnn_settings(deterministic=True):
            reference = _seeded_grads(run.original, x, [p for _, p in own], devices)
            buffers.restore()
            tolerance = GRADIENT_TOLERANCE
            if run.device.type == "cuda":  # some CUDA backward kernels sum with atomics
                again = _seeded_grads(run.original, x, [p for _, p in own], devices)
                buffers.restore()
                tolerance = gradient_tolerance(reference, again)
            grads = _seeded_grads(run.patched, x, [p for _, p in patched], devices)
            buffers.restore()
            by_id = {id(p): g for (_, p), g in zip(patched, grads, strict=False)}
            by_name = {n: g for (n, _), g in zip(patched, grads, strict=False)}
            lost = [
                n
                for (n, p), g in zip(own, reference, strict=True)
                if g is not None and by_name.get(n) is None
            ]
            if lost:
                problems.append(
                    f"{len(lost)} parameters of the original get no gradient ({', '.join(lost[:3])})"
                )
            if run.identity and reference:
                pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
                for (n, _), g in zip(own, reference, strict=True):
                    have = by_name.get(n)
                    if g is not None and have is not None:
                        pairs.append((have, g))
                if pairs:
                    diff, scale = _max_diff([a for a, _ in pairs], [b for _, b in pairs])
                    if _relative(diff, scale) > tolerance:
                        problems.append(
                            "the original's gradients changed at identity "
                            f"({_relative(diff, scale):.3g} of {scale:.3g}; tolerance {tolerance:.3g})"
                        )
            late_all = _late_weights(run, x, by_id, devices, buffers)
            # Nothing of a block reaches the output: its blend gets no gradient and its weights
            # none within two steps (the grid tokens of a class-token model's last block).
            blend_map = _blends(run.reference)
            late_keys = {k for k, _ in late_all}
            unreached = sorted(
                k
                for k in run.reference.blocks
                if k in late_keys and not any(_nonzero(by_id.get(id(p))) for p in blend_map[k])
            )
            blends = {k: v for k, v in _blends(run.reference).items() if k not in unreached}
            for key, params in blends.items():
                for p in params:
                    g = by_id.get(id(p))
                    if g is None or (run.identity and not bool(g.abs().max() > 0)):
                        problems.append(f"the blend of {key} gets {'no' if g is None else 'a zero'} gradient")
                        point = point or key
            late = [(k, n) for k, n in late_all if k not in unreached]
            for key, name in late:
                problems.append(f"{key}.{name} gets no gradient within two SGD steps")
                point = point or key
    finally:
        buffers.restore()
    n_blends = sum(len(b) for b in _blends(run.reference).values())
    counted = f"{len(own)} trainable parameters of the original, {n_blends} blends"
    if unreached:
        counted += (
            f"; {len(unreached)} blocks cannot reach the output (no gradient for their blend or weights): "
            f"{', '.join(unreached[:3])}{' ...' if len(unreached) > 3 else ''}"
        )
    if problems:
        return Check("gradients", FAILED, where, "; ".join(problems[:4]) + f" ({counted})", point)
    return Check(
        "gradients",
        PASSED,
        where,
        f"{counted}: every original parameter gets its gradient, every blend that reaches the output "
        f"{'a non-zero one' if run.identity else 'one'}, every inserted weight one within two SGD steps",
    )


def gradient_tolerance(first: list[torch.Tensor | None], second: list[torch.Tensor | None]) -> float:
    """The tolerance for the original's gradients at identity, given two backward passes of
    the original alone: ``GRADIENT_TOLERANCE``, or 4 times the passes' own relative spread
    where that is larger (a device whose backward kernels sum in a varying order)."""
    runs = [(a, b) for a, b in zip(first, second, strict=True) if a is not None and b is not None]
    if not runs:
        return GRADIENT_TOLERANCE
    spread = _relative(*_max_diff([b for _, b in runs], [a for a, _ in runs]))
    return max(GRADIENT_TOLERANCE, 4 * spread)


def _nonzero(grad: torch.Tensor | None) -> bool:
    return grad is not None and bool(grad.abs().max() > 0)


STEP = 1e-2


def _late_weights(
    run: _Run, x: torch.Tensor, grads: Mapping[int, torch.Tensor | None], devices: list, buffers: _Buffers
) -> list[tuple[str, str]]:
    """The inserted weights with no non-zero gradient after one step on the blocks' parameters
    (each moved against its gradient by ``STEP`` at most: small, so no activation overflows
    in a deep model), run functionally: the models' own parameters are not changed."""
    from torch.func import functional_call

    prefix = {key: f"{key}." for key in run.reference.blocks}
    stepped: dict[str, torch.Tensor] = {}
    first: dict[str, bool] = {}
    for key, block in run.reference.blocks.items():
        for name, p in block.named_parameters():
            if not p.requires_grad:
                continue
            g = grads.get(id(p))
            full = prefix[key] + name
            first[full] = g is not None and bool(g.abs().max() > 0)
            step = p.detach() - (g.detach() * (STEP / g.abs().max()) if g is not None and first[full] else 0)
            stepped[full] = step.requires_grad_()
    if all(first.values()):
        return []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        loss = _loss(_tensors(functional_call(run.patched, stepped, (x,), strict=False)))
    second = torch.autograd.grad(loss, list(stepped.values()), allow_unused=True)
    buffers.restore()
    late = []
    for (full, _), g in zip(stepped.items(), second, strict=True):
        if not first[full] and (g is None or not bool(g.abs().max() > 0)):
            key = next(k for k in run.reference.blocks if full.startswith(prefix[k]))
            late.append((key, full[len(prefix[key]) :]))
    return late


def _compile_backend(device: torch.device) -> tuple[str, str]:
    """The default backend (inductor) when its compiler works here, else "eager" and why."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return ("inductor", "") if has_triton() else ("eager", "no Triton for inductor on this GPU")
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as error:
        return "eager", f"no C++ compiler for inductor ({str(error).splitlines()[0][:80]})"
    return "inductor", ""


def _compile_check(run: _Run) -> Check:
    import torch._dynamo

    backend, why = _compile_backend(run.device)
    where = _where(run.device, run.dtype, "eval") + f", backend {backend}"
    x = run.inputs[0]
    torch._dynamo.reset()
    try:
        with eval_mode(run.patched), torch.no_grad():
            eager = _outputs(run.patched, x)
            try:
                compiled = _outputs(torch.compile(run.patched, backend=backend), x)
            except Exception as error:
                return Check(
                    "compile",
                    FAILED,
                    where,
                    f"torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}",
                )
    finally:
        torch._dynamo.reset()
    tol = COMPILE_TOLERANCE if run.dtype == torch.float32 else run.tolerance()
    note = f"; {why}, so backend='eager'" if why else ""
    return _against_eager("compile", where, compiled, eager, tol, "compiled vs eager", note)


def _export_check(run: _Run) -> Check:
    where = _where(run.device, run.dtype, "eval")
    x = run.inputs[0]
    with eval_mode(run.original), eval_mode(run.patched):
        try:
            program = torch.export.export(run.patched, (x,))
        except Exception as error:
            failure = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            try:  # only now is the original's own export worth its time
                torch.export.export(run.original, (x,))
            except Exception as original_error:
                why = f"{type(original_error).__name__}: {str(original_error).splitlines()[0][:120]}"
                return Check("export", SKIPPED, where, f"the original does not export: {why}")
            return Check(
                "export", FAILED, where, f"the original exports, the patched model does not: {failure}"
            )
        with torch.no_grad():
            eager = _outputs(run.patched, x)
            exported = _outputs(program.module(), x)
    return _against_eager(
        "export", where, exported, eager, run.tolerance(), "torch.export.export runs; its module vs eager"
    )


def _against_eager(
    name: str,
    where: str,
    outputs: list[torch.Tensor],
    eager: list[torch.Tensor],
    tol: float,
    what: str,
    note: str = "",
) -> Check:
    """A check comparing another runtime's outputs with eager, relative to the output scale."""
    diff, scale = _max_diff(outputs, eager)
    rel = _relative(diff, scale)
    return Check(
        name,
        PASSED if rel <= tol else FAILED,
        where,
        f"{what}: {rel:.3g} of output scale {scale:.3g} (tolerance {tol:g}){note}",
        values={"relative_diff": rel},
    )


def _autocast_checks(run: _Run, dtypes: Sequence[torch.dtype]) -> list[Check]:
    low = [d for d in dtypes if d != run.dtype]
    if not low:
        where = _where(run.device, run.dtype, "eval")
        why = "no CUDA: only fp32 runs on the CPU" if run.device.type == "cpu" else f"dtypes={list(dtypes)}"
        return [Check("autocast", SKIPPED, where, why)]
    checks = []
    for dtype in low:
        name = f"autocast {str(dtype).replace('torch.', '')}"
        where = _where(run.device, dtype, "eval autocast")
        if run.invalid:
            checks.append(Check(name, SKIPPED, where, run.invalid))
            continue
        rtol, atol = torch.testing._comparison.default_tolerances(dtype)
        x = run.inputs[0]
        with eval_mode(run.original), eval_mode(run.patched), torch.no_grad():
            try:
                with torch.autocast(run.device.type, dtype=dtype):
                    expected = run.expected(x)
            except Exception as error:
                checks.append(
                    Check(
                        name,
                        SKIPPED,
                        where,
                        f"the original fails under autocast: {str(error).splitlines()[0][:120]}",
                    )
                )
                continue
            with torch.autocast(run.device.type, dtype=dtype):
                got = _outputs(run.patched, x)
        try:
            for g, e in zip(got, expected, strict=True):
                torch.testing.assert_close(g, e, rtol=rtol, atol=atol)
            checks.append(
                Check(
                    name,
                    PASSED,
                    where,
                    f"patched vs reference within rtol {rtol:g}, atol {atol:g} "
                    f"(torch.testing's {dtype} defaults)",
                )
            )
        except (AssertionError, ValueError) as error:
            checks.append(Check(name, FAILED, where, str(error).strip().splitlines()[0][:200]))
    return checks


def _wanted(checks: Sequence[str] | str | None) -> set[str]:
    if checks is None:
        return set(CHECKS) - {"compile"}
    if checks == "all":
        return set(CHECKS)
    if isinstance(checks, str):
        checks = [checks]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; allowed: {', '.join(CHECKS)}")
    return set(checks)


def validate(
    original: nn.Module,
    patched: nn.Module,
    *,
    input_size: Sequence[int] | None = None,
    device: str | torch.device = "auto",
    batch: int = 2,
    seeds: int = 3,
    dtypes: Sequence[torch.dtype] | None = None,
    checks: Sequence[str] | str | None = None,
) -> ValidationReport:
    """Check ``patched`` against ``original`` and report each check (see :data:`CHECKS`).

    ``seeds`` random batches of ``batch`` at ``input_size`` (C, H, W; default the plan's)
    run through the patched model, the plain original and the reference (the original with
    the patched model's blocks applied by hooks): patched vs reference within 1e-5 of the
    output scale in fp32 for any blend, and vs the plain original while every blend is 0;
    the same in train mode under one RNG state, BatchNorm statistics compared; gradients;
    parameters added vs the plan; shapes, dtypes, finiteness; ``torch.compile`` and
    ``torch.export`` against eager; bf16 / fp16 autocast (``dtypes``, default on CUDA).
    ``checks`` picks a subset; by default every check but ``compile`` (a compilation takes
    minutes on a CPU), which is then reported as skipped; ``checks="all"`` runs it too.
    Runs on CUDA when available (``device="auto"``); the models
    are not changed (modes, buffers and parameters are as they were). For a plan with a
    target, the targets are compared.
    """
    info = getattr(patched, "attn_inject", None)
    if not isinstance(info, InjectionInfo):
        raise ValidationError("the second model is not a patched model (it has no attn_inject plan)")
    if any(t.is_meta for t in _tensors_of(original, patched)):
        raise ValidationError(
            "the model's weights are on the meta device; materialise them before validating"
        )
    if batch < 1 or seeds < 1:
        raise ValueError(f"batch and seeds must be at least 1, got batch={batch}, seeds={seeds}")
    wanted = _wanted(checks)
    target = _resolve_device(device)
    original, patched = _on_device(original, patched, target)
    traced = bool(wanted & {"reference", "train", "autocast"})  # else the blocks are enough
    reference = Reference.build(original, patched, trace=traced)
    root = reference.root
    original_root = original.get_submodule(root) if root else original
    patched_root = patched.get_submodule(root) if root else patched
    plan = info.plan
    size = (
        tuple(input_size)
        if input_size is not None
        else tuple(plan.input_size) or default_input_size(original_root)
    )
    dtype = next((p.dtype for p in patched_root.parameters() if p.is_floating_point()), torch.float32)
    inputs = [
        torch.randn((batch, *size), generator=torch.Generator().manual_seed(s)).to(target, dtype)
        for s in range(seeds)
    ]
    blends = _blends(reference)
    at_identity = {key: bool(b) and all(not bool(p.detach().any()) for p in b) for key, b in blends.items()}
    identity = bool(blends) and all(at_identity.values())
    not_identity = [p.key for p in reference.unreachable if not at_identity.get(p.key, False)]
    invalid = (
        f"no hook reaches {', '.join(not_identity[:3])}, whose blocks are not at identity"
        if not_identity
        else ""
    )
    run = _Run(
        original_root,
        patched_root,
        reference,
        inputs,
        target,
        dtype,
        identity,
        frozenset(p.key for p in reference.unreachable),
        invalid,
    )
    if dtypes is None:
        dtypes = (torch.float32, torch.bfloat16, torch.float16) if target.type == "cuda" else (torch.float32,)
    added = count_params(patched) - count_params(original)
    results: list[Check] = []
    current = "the forward passes"
    try:
        with cudnn_settings(benchmark=False):
            evaluated, max_abs, scale, finite = _eval_checks(run, wanted)
            results += evaluated
            steps: list[tuple[str, Callable[[], list[Check]]]] = [
                ("train", lambda: [_train_check(run)]),
                ("gradients", lambda: [_gradient_check(run)]),
                ("compile", lambda: [_compile_check(run)]),
                ("export", lambda: [_export_check(run)]),
                ("autocast", lambda: _autocast_checks(run, dtypes)),
            ]
            for name, step in steps:
                if name in wanted:
                    current = name
                    results += step()
    except torch.OutOfMemoryError as error:
        raise ValidationError(
            f"out of memory on {_device_name(target)} during {current} at batch {batch}: "
            f"validate with batch=1 or device='cpu' ({str(error).splitlines()[0][:100]})"
        ) from None
    if checks is None:
        results.append(
            Check("compile", SKIPPED, _where(target, dtype, "eval"), "not asked for: checks='all' runs it")
        )
    if "parameters" in wanted:
        ok = added == plan.params_added
        results.append(
            Check(
                "parameters",
                PASSED if ok else FAILED,
                "model",
                f"added {added:,} ({'matches' if ok else 'DIFFERS from'} the plan's {plan.params_added:,})",
            )
        )
    order = {name: i for i, name in enumerate(CHECKS)}
    results.sort(key=lambda c: order[c.name.split()[0]])
    if root:  # points by their name in the model passed in
        results = [dataclasses.replace(c, point=f"{root}.{c.point}") if c.point else c for c in results]
    return ValidationReport(
        device=_device_name(target),
        input_shape=(batch, *size),
        init=plan.init,
        checks=tuple(results),
        unreachable=tuple((_join(root, p.key), p.unreachable) for p in reference.unreachable),
        max_abs_diff=max_abs,
        output_scale=scale,
        identity_expected=identity,
        params_added=added,
        params_planned=plan.params_added,
        finite=finite,
    )
