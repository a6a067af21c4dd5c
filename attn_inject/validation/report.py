"""What :func:`~attn_inject.validation.validate` returns: one :class:`Check` per check, and
the :class:`ValidationReport` that holds them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.errors import AttnInjectError
from ..core.tables import render_table

__all__ = [
    "FAILED",
    "IDENTITY_TOLERANCE",
    "PASSED",
    "SKIPPED",
    "Check",
    "ValidationError",
    "ValidationReport",
]

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
IDENTITY_TOLERANCE = 1e-5  # fp32: max |patched - reference| over max |reference|


class ValidationError(AttnInjectError, ValueError):
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
        rows = [
            (
                c.name,
                c.status.upper() if c.status == FAILED else c.status,
                c.where,
                f"{c.detail} [at {c.point}]" if c.point else c.detail,
            )
            for c in self.checks
        ]
        verdict = "PASSED" if self.passed else f"FAILED ({', '.join(c.name for c in self.failed)})"
        head = f"validation on {self.device}, input {tuple(self.input_shape)}, init={self.init}: {verdict}"
        tail = [f"  no hook reaches {b}: {r}" for b, r in self.unreachable]
        body = render_table(("check", "status", "where", "detail"), rows, indent="  ", rule_under_last=False)
        return "\n".join([head, body, *tail])

    def __str__(self) -> str:
        return self.table()
