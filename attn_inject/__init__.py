"""attn-inject: SE, ECA and CBAM attention inserted into built torchvision and timm CNNs.

>>> import timm, attn_inject as ai
>>> model = timm.create_model("resnet50")
>>> print(ai.plan(model, "cbam_after_every_stage"))
>>> patched = ai.inject(model, "cbam_after_every_stage")   # identical outputs at insertion
"""

from ._version import __version__
from .blocks import (
    BlockInfo,
    BlockParamError,
    create_block,
    describe_blocks,
    list_blocks,
    register_block,
    unregister_block,
)
from .core.errors import AttnInjectError
from .core.errors import InputError as InputError  # reachable as ai.InputError, as before
from .finetune import blends, freeze_base, param_groups
from .finetune import gates as gates  # deprecated: blends
from .graph.shapes import ShapeError
from .graph.trace import TraceError, register_leaf_module, unregister_leaf_module
from .planning.candidates import POSITIONS, register_position, unregister_position
from .planning.match import plan
from .planning.points import InsertionPoint, Plan, PlanError, SkippedPoint
from .recipes.recipe import (
    BlockSpec,
    Recipe,
    RecipeError,
    Rule,
    get_recipe,
    list_recipes,
    load_recipe,
)
from .saving import hf, ultralytics
from .saving.checkpoint import CheckpointError
from .saving.file import Manifest, load, read_manifest, save
from .saving.hub import save_pretrained
from .saving.timm_bridge import register_timm_model
from .surgery.derive import base_class, has_rewritten_forward
from .surgery.derive import rewritten_forward as rewritten_forward  # deprecated: has_rewritten_forward
from .surgery.inject import InjectError, inject
from .surgery.record import InjectionInfo, block_parameters, inserted_blocks
from .validation import ValidationError, ValidationReport, register_check, unregister_check, validate

# deprecated names, kept for one release (each warns, naming the new one; not in __all__):
# gates -> blends, rewritten_forward -> has_rewritten_forward
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
    "blends",
    "block_parameters",
    "create_block",
    "describe_blocks",
    "freeze_base",
    "get_recipe",
    "has_rewritten_forward",
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
    "register_leaf_module",
    "register_position",
    "register_timm_model",
    "save",
    "save_pretrained",
    "ultralytics",
    "unregister_block",
    "unregister_check",
    "unregister_leaf_module",
    "unregister_position",
    "validate",
]
