"""The rewrite pass: add each planned block as a module and a ``call_module`` node.

Following torch.ao's recipe: the blocks live in one ``nn.ModuleDict`` on the root
(``patched.attention``), each node is created with ``graph.inserting_after(producer)``,
the planned consumers are rewired to read it, then the graph is linted and recompiled.
The original model's top-level modules, parameters, buffers and plain attributes are
re-attached to the new module, so every original ``state_dict`` key stays and timm
metadata (``pretrained_cfg``, ``num_classes``...) survives; the original model is not changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .blocks import accepts_init, create_block
from .graph.layout import NHWC
from .plan import Plan

__all__ = ["AttentionBlocks", "InjectionInfo", "rewrite"]

CONTAINER = "attention"
PRESERVED = "_user_preserved_attributes"  # GraphModule restores these on deepcopy
ANNOTATIONS = ("val", "layout")


class AttentionBlocks(nn.ModuleDict):
    """The inserted blocks of a patched model, keyed by insertion point."""


@dataclass(frozen=True)
class InjectionInfo:
    """What a patched model remembers: its plan (recipe, init, model name, input size) and
    where its blocks live. ``patched.attn_inject`` holds it."""

    plan: Plan
    container: str = CONTAINER
    base_model: str | None = None  # e.g. "tv:resnet18": what ``ai.save`` records to rebuild it
    base_kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def container_path(self) -> str:
        """Where the blocks live, from the model ``inject`` returned (target included)."""
        return f"{self.plan.target}.{self.container}" if self.plan.target else self.container

    @property
    def block_keys(self) -> list[str]:
        return [f"{self.container_path}.{p.key}" for p in self.plan]


def _reference_tensor(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in list(model.parameters()) + list(model.buffers()):
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _container_name(model: nn.Module) -> str:
    existing = getattr(model, CONTAINER, None)
    if existing is None or isinstance(existing, AttentionBlocks):
        return CONTAINER
    name = "attn_inject_blocks"
    if hasattr(model, name) and not isinstance(getattr(model, name), AttentionBlocks):
        raise ValueError(f"{type(model).__name__} already has attributes {CONTAINER!r} and {name!r}")
    return name


def build_blocks(plan: Plan, device: torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
    blocks = {}
    for point in plan:
        extra = {"init": plan.init} if accepts_init(point.block.kind) else {}
        with torch.device(device):
            block = create_block(point.block.kind, point.channels, **point.block.params, **extra)
        block = block.to(dtype=dtype)
        # a leaf when the patched model is traced again (a plain attribute: nn.Module's
        # __setattr__ is typed for tensors and modules only)
        block._attn_inject_block = True  # type: ignore[assignment]
        blocks[point.key] = block
    return blocks


def rewrite(
    graph: fx.Graph, plan: Plan, original: nn.Module, base: tuple[str, dict[str, Any]] | None = None
) -> fx.GraphModule:
    """Insert the planned blocks into ``graph`` (traced from ``original``) and return the
    patched module, compiled once."""
    container_name = _container_name(original)
    container = AttentionBlocks(getattr(original, container_name, None))  # None or AttentionBlocks
    device, dtype = _reference_tensor(original)
    new_blocks = build_blocks(plan, device, dtype)
    for key in new_blocks:
        if key in container:
            raise ValueError(f"the model already has a block named {container_name}.{key}")
    container.update(new_blocks)

    by_name = {node.name: node for node in graph.nodes}
    # Edge insertions first: an all-users insertion on the same producer then wraps them.
    ordered = sorted(plan, key=lambda p: p.consumers is None)
    for point in ordered:
        producer = by_name[point.node]
        target = f"{container_name}.{point.key}"
        with graph.inserting_after(producer):
            if point.layout == NHWC:  # channels-last map: the block sees NCHW, permuted back after
                to_nchw = graph.call_method("permute", (producer, 0, 3, 1, 2))
                with graph.inserting_after(to_nchw):
                    block = graph.call_module(target, (to_nchw,))
                with graph.inserting_after(block):
                    node = graph.call_method("permute", (block, 0, 2, 3, 1))
                reads_producer = to_nchw
            else:
                node = reads_producer = graph.call_module(target, (producer,))
        if point.consumers is None:
            producer.replace_all_uses_with(
                node, delete_user_cb=lambda user, reads=reads_producer: user is not reads
            )
        else:
            for consumer in point.consumers:
                by_name[consumer].replace_input_with(producer, node)
    for node in graph.nodes:
        for key in ANNOTATIONS:
            node.meta.pop(key, None)
    holder = nn.Module()
    _reattach(original, holder)
    holder.add_module(container_name, container)
    for node in graph.nodes:
        if node.op == "get_attr":
            atom = str(node.target).split(".")[0]
            if not hasattr(holder, atom):  # e.g. tensor constants the tracer stored on the model
                setattr(holder, atom, getattr(original, atom))
    gm = fx.GraphModule(holder, graph, type(original).__name__)
    _reattach(holder, gm)
    gm.training = original.training
    graph.lint()
    preserved = gm.meta.setdefault(PRESERVED, {})
    for key, value in vars(original).items():
        if not key.startswith("_") and key != "training" and not hasattr(gm, key):
            setattr(gm, key, value)
            preserved[key] = value
    info = InjectionInfo(plan=plan, container=container_name)
    if base is not None:  # the model's name and builder arguments, so it can be rebuilt
        info = InjectionInfo(plan, container_name, base[0], tuple(sorted(base[1].items())))
    gm.attn_inject = info  # type: ignore[assignment]  # a plain attribute, see build_blocks
    preserved["attn_inject"] = info
    return gm


def _reattach(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the source's own top-level modules, parameters and buffers (a
    GraphModule holds only those its graph uses, under plain containers)."""
    for name, child in source.named_children():
        setattr(target, name, child)
    for name, param in source._parameters.items():
        if param is not None:
            target.register_parameter(name, param)
    for name, buffer in source._buffers.items():
        if buffer is not None:
            target.register_buffer(name, buffer, persistent=name not in source._non_persistent_buffers_set)
