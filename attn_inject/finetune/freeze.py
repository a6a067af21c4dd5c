"""Train only the inserted blocks (and, by option, the classifier head) first.

``freeze_base(model)`` turns off gradients for every parameter outside the inserted blocks
and keeps the BatchNorm layers of the frozen part in eval mode — their running statistics
stay fixed and they normalise with them — even when ``model.train()`` is called, as
detectron's frozen BatchNorm does without replacing any module (so ``state_dict`` keys and
the patched model stay as they are). ``freeze_base(model, frozen=False)`` undoes it::

    >>> ai.freeze_base(patched, head=True)     # blocks and classifier train
    >>> ai.freeze_base(patched, frozen=False)  # everything trains again
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..core.deprecation import renamed_arguments
from ..core.errors import InputError
from .distributed import unwrap

__all__ = ["freeze_base", "head_names"]

_HOOK = "_attn_inject_frozen_norm"


def head_names(model: nn.Module) -> tuple[str, ...]:
    """The classifier's module names: timm's ``pretrained_cfg["classifier"]``, else the last
    ``nn.Linear`` of the model (torchvision's ``fc`` or ``classifier.N``)."""
    cfg = getattr(model, "pretrained_cfg", None)
    names = dict(model.named_modules())
    if isinstance(cfg, dict) and cfg.get("classifier"):
        given = cfg["classifier"]
        found = tuple(n for n in ((given,) if isinstance(given, str) else tuple(given)) if n in names)
        if found:
            return found
    linear = [n for n, m in names.items() if isinstance(m, nn.Linear)]
    return (linear[-1],) if linear else ()


@renamed_arguments("0.2.0", model="patched")
def freeze_base(patched: nn.Module, frozen: bool = True, *, head: bool = False) -> list[str]:
    """Freeze (or, with ``frozen=False``, unfreeze) everything but the inserted blocks and,
    with ``head=True``, the classifier (:func:`head_names`). Returns the names of the
    parameters that train afterwards."""
    from ..surgery.record import inserted_blocks

    model = unwrap(patched)
    trained = list(inserted_blocks(model))
    if head:
        heads = head_names(model)
        if not heads:
            raise InputError(f"head=True: {type(model).__name__} has no classifier to keep training")
        trained += heads

    def is_trained(name: str) -> bool:
        return not frozen or any(name == t or name.startswith(t + ".") for t in trained)

    for name, param in model.named_parameters():
        param.requires_grad_(is_trained(name))
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm):
            continue
        handle = module.__dict__.pop(_HOOK, None)
        if handle is not None:
            handle.remove()
        if is_trained(name):
            module.train(model.training)
        else:
            module.eval()
            module.__dict__[_HOOK] = module.register_forward_pre_hook(_stay_in_eval)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _stay_in_eval(module: nn.Module, args: object) -> None:
    """A frozen norm layer keeps its statistics whatever ``model.train()`` said."""
    module.training = False
