"""attn-inject: SE, ECA and CBAM attention inserted into built torchvision and timm CNNs.

>>> import timm, attn_inject as ai
>>> model = timm.create_model("resnet50")
>>> print(ai.plan(model, "cbam_after_every_stage"))
>>> patched = ai.inject(model, "cbam_after_every_stage")   # identical outputs at insertion
"""

from collections.abc import Iterator

from torch import nn

from . import hf
from ._version import __version__
from .blocks import BlockInfo, BlockParamError, create_block, describe_blocks, list_blocks, register_block
from .checkpoint import CheckpointError
from .derive import base_class, rewritten_forward
from .errors import AttnInjectError, InputError
from .finetune import freeze_base, gates, param_groups
from .graph.shapes import ShapeError
from .graph.trace import TraceError
from .hub import save_pretrained
from .injection import InjectError, inject
from .planning import InsertionPoint, Plan, PlanError, SkippedPoint, plan
from .recipe import POSITIONS, BlockSpec, Recipe, RecipeError, Rule, get_recipe, list_recipes, load_recipe
from .record import InjectionInfo, patched_record
from .rewrite import find_blocks
from .serialize import Manifest, load, read_manifest, save
from .timm_bridge import register_timm_model
from .validation import ValidationError, ValidationReport, register_check, validate

__all__ = [
    "POSITIONS",
    "AttnInjectError",
    "BlockInfo",
    "BlockParamError",
    "BlockSpec",
    "CheckpointError",
    "InjectError",
    "InjectionInfo",
    "InsertionPoint",
    "Manifest",
    "Plan",
    "PlanError",
    "Recipe",
    "RecipeError",
    "Rule",
    "ShapeError",
    "SkippedPoint",
    "TraceError",
    "ValidationError",
    "ValidationReport",
    "__version__",
    "base_class",
    "block_parameters",
    "create_block",
    "describe_blocks",
    "freeze_base",
    "gates",
    "get_recipe",
    "hf",
    "inject",
    "inserted_blocks",
    "list_blocks",
    "list_recipes",
    "load",
    "load_recipe",
    "param_groups",
    "plan",
    "read_manifest",
    "register_block",
    "register_check",
    "register_timm_model",
    "rewritten_forward",
    "save",
    "save_pretrained",
    "validate",
]


def inserted_blocks(patched: nn.Module) -> dict[str, nn.Module]:
    """The attention blocks ``inject`` inserted into ``patched``, by qualified module name,
    in module order (e.g. ``{"layer1.0.se": SqueezeExcite(...), ...}``)."""
    if patched_record(patched) is None:
        raise InputError("not a patched model: it has no attn_inject plan")
    return find_blocks(patched)


def block_parameters(patched: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of the inserted blocks, e.g. for their own optimizer param group."""
    for block in inserted_blocks(patched).values():
        yield from block.parameters()
