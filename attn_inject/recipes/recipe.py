"""Recipes: which block goes where, as YAML, a path, a dict or a built-in name.

A recipe is checked whole before anything is changed; every error names the source (file),
the key and what is allowed::

    name: cbam_after_every_stage
    description: CBAM after the last block of every stage
    init: identity
    rules:
      - block: {kind: cbam, ratio: 16, spatial_kernel: 7}
        at: stage_output

``fallback`` (optional) is a second list of rules, used only in a model where ``rules``
match no position at all and no module before the head is kept whole with layers inside.
``se_resnet`` puts SE on the residual branches, and in a network with no residual unit (VGG,
DenseNet, Inception, MobileNetV1) after the activation of every convolution, the paper's
integration into non-residual networks (arXiv 1709.01507, Sec. 3.3).
"""

from __future__ import annotations

import copy
import functools
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..blocks import BlockParamError, block_factory, block_param_names, check_block_params, list_blocks
from ..blocks.params import INIT_MODES
from ..core.errors import AttnInjectError, InputError
from ..core.files import NotRegularFileError, file_kind, open_regular
from ..core.messages import cut, shown
from ..core.values import is_int
from ..planning.candidates import POSITIONS  # live: the built-in and registered positions
from .patterns import PatternError, compile_pattern

__all__ = [
    "POSITIONS",
    "BlockSpec",
    "Recipe",
    "RecipeError",
    "Rule",
    "get_recipe",
    "list_recipes",
    "load_recipe",
    "parse_recipe_text",
    "positions_of",
]

RECIPE_KEYS = ("name", "description", "init", "target", "rules", "fallback")
RULE_KEYS = (
    "block",
    "at",
    "stages",
    "min_channels",
    "max_channels",
    "include",
    "exclude",
    "every",
    "channels_last",
    "name",
)
# NHWC maps and token grids: blocks that act on them natively do ("native"); NCHW-only blocks
# (timm's, a user's without a layout argument) are skipped there, or run through a permute
# ("permute"); or no block goes there ("skip").
CHANNELS_LAST = ("native", "permute", "skip")


class RecipeError(AttnInjectError, ValueError):
    """A recipe that cannot be used: the message names the source, the key and what is allowed."""


@dataclass(frozen=True)
class BlockSpec:
    """A block kind with its parameters, e.g. ``cbam(ratio=16, spatial_kernel=7)``."""

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.kind}({args})"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.params}


@dataclass(frozen=True)
class Rule:
    """One line of a recipe: put ``block`` at ``at`` wherever the filters let it."""

    block: BlockSpec
    at: str
    stages: tuple[int, ...] | None = None
    min_channels: int | None = None
    max_channels: int | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    every: int = 1
    channels_last: str = "native"  # NHWC maps and token grids: one of CHANNELS_LAST
    name: str | None = None  # its attribute name in its module (default: its kind, "gc" for "timm:gc")

    @property
    def block_name(self) -> str:
        """The name each block of this rule gets as a child of the module it acts in."""
        return self.name or self.block.kind.rpartition(":")[2]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"block": self.block.to_dict(), "at": self.at}
        if self.stages is not None:
            out["stages"] = list(self.stages)
        for key in ("min_channels", "max_channels"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.include:
            out["include"] = list(self.include)
        if self.exclude:
            out["exclude"] = list(self.exclude)
        if self.every != 1:
            out["every"] = self.every
        if self.channels_last != "native":
            out["channels_last"] = self.channels_last
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass(frozen=True)
class Recipe:
    """A checked recipe. ``text`` is its YAML, kept for checkpoint manifests."""

    name: str
    rules: tuple[Rule, ...]
    init: str = "identity"
    description: str = ""
    source: str = "<dict>"
    target: str | None = None  # a submodule to patch, e.g. "backbone.body"
    fallback: tuple[Rule, ...] = ()  # used only where ``rules`` place no block

    @property
    def all_rules(self) -> tuple[Rule, ...]:
        """``rules`` then ``fallback``: what a plan point's ``rule`` index counts in."""
        return self.rules + self.fallback

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "description": self.description, "init": self.init}
        if self.target is not None:
            out["target"] = self.target
        out["rules"] = [rule.to_dict() for rule in self.rules]
        if self.fallback:
            out["fallback"] = [rule.to_dict() for rule in self.fallback]
        return out

    @property
    def text(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _builtin_dir() -> Path:
    packaged = resources.files("attn_inject") / "builtin_recipes"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "recipes"  # a source checkout: the repository's recipes/


def builtin_recipe_paths() -> dict[str, Path]:
    return {p.stem: p for p in sorted(_builtin_dir().glob("*.yaml"))}


def list_recipes() -> list[str]:
    """The names of the built-in recipes (``get_recipe(name)`` gives one), as ``list_blocks``
    gives the blocks' names."""
    return list(builtin_recipe_paths())


def listed_recipes() -> list[Recipe]:
    """Every built-in recipe, its blocks' kinds and parameters not resolved (that waits for
    the recipe's use, as ``get_recipe`` does it): what ``attn-inject recipes`` lists, without
    importing timm for a ``timm:`` kind."""
    return [
        parse_recipe_text(read_recipe_file(path), source=str(path), check_blocks=False)
        for path in builtin_recipe_paths().values()
    ]


def get_recipe(name: str) -> Recipe:
    """The built-in recipe ``name``, parsed; a clear error listing the names otherwise."""
    paths = builtin_recipe_paths()
    if name not in paths:
        raise RecipeError(f"unknown recipe {shown(name)}: the built-in recipes are {', '.join(paths)}")
    return load_recipe(paths[name])


def load_recipe(recipe: str | Path | Mapping[str, Any] | Recipe) -> Recipe:
    """A :class:`Recipe` from a built-in name, a YAML path, YAML text, a dict, or a recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return parse_recipe(recipe, source="<dict>")
    if isinstance(recipe, str) and "\n" in recipe:
        return parse_recipe_text(recipe, source="<text>")
    if isinstance(recipe, Path) or (
        isinstance(recipe, str) and (recipe.endswith((".yaml", ".yml")) or "/" in recipe)
    ):
        return parse_recipe_text(read_recipe_file(Path(recipe)), source=str(recipe))
    if isinstance(recipe, str):
        builtins = builtin_recipe_paths()
        if recipe not in builtins:
            raise RecipeError(
                f"unknown recipe {shown(recipe)}: not a built-in recipe ({', '.join(builtins)}) "
                "and not a path to a .yaml file"
            )
        path = builtins[recipe]
        return parse_recipe_text(read_recipe_file(path), source=str(path))
    raise RecipeError(f"a recipe must be a name, a path, a dict or a Recipe, got {type(recipe).__name__}")


MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_VALUES = 10_000  # values a recipe may hold once its aliases are expanded


def read_recipe_file(path: Path) -> str:
    """The text of a recipe file: UTF-8, at most ``MAX_RECIPE_BYTES``; else one clear error
    (a folder, a FIFO or a device such as ``/dev/zero`` is named as such and never read)."""
    try:
        with open_regular(path) as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except NotRegularFileError as error:
        if stat.S_ISDIR(error.mode):
            raise RecipeError(f"{path}: is a directory, not a recipe file") from None
        raise RecipeError(
            f"{path}: is {file_kind(error.mode)}, not a regular file; a recipe is a YAML file "
            f"(UTF-8 text, at most {MAX_RECIPE_BYTES} bytes)"
        ) from None
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except OSError as error:
        raise RecipeError(f"{path}: cannot read the recipe file: {error.strerror or error}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: a recipe file is at most {MAX_RECIPE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        bom = data.startswith((b"\xff\xfe", b"\xfe\xff"))
        what = "UTF-16 (save it as UTF-8)" if bom else f"not UTF-8 text (byte {error.start})"
        raise RecipeError(f"{path}: the recipe file must be UTF-8 text; it is {what}") from None


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping, keys that are not plain
    values, and aliases that expand past ``MAX_YAML_VALUES`` values (an alias bomb: a few
    hundred bytes that expand to billions). Merge keys (``<<: *defaults``) are allowed."""

    def compose_document(self) -> Any:
        node = super().compose_document()
        _check_expansion(node)
        return node


def _check_expansion(root: yaml.Node | None) -> None:
    """Refuse a document that holds more than ``MAX_YAML_VALUES`` values once every alias is
    expanded, or an alias inside itself. Counted on the node graph, which aliases share:
    linear in the document's size, whatever it expands to."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            raise yaml.constructor.ConstructorError(
                None, None, "an alias refers to a value that contains it", node.start_mark
            )
        visiting.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        visiting.discard(key)
        sizes[key] = min(total, MAX_YAML_VALUES + 1)
        if total > MAX_YAML_VALUES:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"the document expands to more than {MAX_YAML_VALUES} values (aliases included); "
                "a recipe is far smaller",
                node.start_mark,
            )
        return sizes[key]

    if root is not None:
        size(root)


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # '<<: *defaults': its keys may be overridden by the mapping's own
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain value, got a {type(key).__name__}", key_node.start_mark
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {shown(key)} is given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

MAX_NUMBER_CHARS = 40  # characters of a number read from YAML


def _bounded_number(kind: str):
    """YAML's int / float constructor, refusing base-60 (``1:30:00``, YAML 1.1) and numbers
    longer than ``MAX_NUMBER_CHARS``: converting them costs time quadratic in their length."""
    construct = getattr(yaml.SafeLoader, f"construct_yaml_{kind}")

    def bounded(loader: _StrictLoader, node: yaml.ScalarNode) -> Any:
        text = str(node.value).replace("_", "")
        if ":" in text:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"{shown(text, 40)} is a base-60 number; quote it or write it in base 10",
                node.start_mark,
            )
        if len(text) > MAX_NUMBER_CHARS:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"a number of {len(text):,} characters; at most {MAX_NUMBER_CHARS} are read",
                node.start_mark,
            )
        return construct(loader, node)

    return bounded


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _bounded_number("int"))
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _bounded_number("float"))


CACHED_RECIPE_CHARS = 1 << 16  # recipes up to this size are read as YAML once per text


def parse_recipe_text(text: str, source: str, *, check_blocks: bool = True) -> Recipe:
    """A :class:`Recipe` from YAML text; ``source`` names it in errors (``check_blocks``:
    see :func:`parse_recipe`)."""
    if not isinstance(text, str):
        raise RecipeError(f"{source}: recipe text must be a string, got a {type(text).__name__}")
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{source}: a recipe is at most {MAX_RECIPE_BYTES} characters")
    if len(text) <= CACHED_RECIPE_CHARS:
        data = copy.deepcopy(_read_yaml_once(text, source))  # the checks below may not change it
    else:
        data = _read_yaml(text, source)
    # checked every time: the registered blocks may change
    return parse_recipe(data, source, check_blocks=check_blocks)


@functools.lru_cache(maxsize=64)
def _read_yaml_once(text: str, source: str) -> Any:
    return _read_yaml(text, source)


def read_yaml(text: str, source: str) -> Any:
    """YAML text read with every limit a recipe has (safe tags, keys once, aliases expanding
    to at most ``MAX_YAML_VALUES`` values, bounded numbers and nesting); one clear error."""
    return _read_yaml(text, source)


def _read_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        where = ""
        mark = getattr(error, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(error, "problem", None) or str(error)
        raise RecipeError(f"{source}: invalid YAML{where}: {cut(problem)}") from None
    except RecursionError:
        raise RecipeError(f"{source}: invalid YAML: nested too deeply") from None


def parse_recipe(data: Any, source: str, *, check_blocks: bool = True) -> Recipe:
    """Check ``data`` (a parsed recipe) key by key and build a :class:`Recipe`;
    ``check_blocks=False`` leaves each block's kind and parameters to the recipe's use (for
    listing the shipped recipes: a ``timm:`` kind is resolved by importing timm)."""

    def fail(key: str, message: str) -> RecipeError:
        return RecipeError(f"{source}: {key}: {message}")

    if not isinstance(data, Mapping):
        got = "an empty document" if data is None else f"a {type(data).__name__}"
        raise RecipeError(
            f"{source}: a recipe must be a mapping with keys {', '.join(RECIPE_KEYS)}; got {got}"
        )
    _reject_unknown(data, RECIPE_KEYS, "", fail)
    name = data.get("name", Path(source).stem if source != "<dict>" else "custom")
    if not isinstance(name, str) or not name:
        raise fail("name", f"must be a non-empty string, got {shown(name)}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise fail("description", f"must be a string, got {shown(description)}")
    init = data.get("init", "identity")
    if init not in INIT_MODES:
        raise fail("init", f"{shown(init)} is not allowed; allowed: {', '.join(INIT_MODES)}")
    target = data.get("target")
    if target is not None and (not isinstance(target, str) or not re.fullmatch(r"[\w.]*", target)):
        raise fail("target", f"must be a dotted submodule name such as 'backbone.body', got {shown(target)}")
    if "rules" not in data:
        raise fail("rules", "missing; a recipe needs a non-empty list of rules (each with 'block' and 'at')")
    rules = data["rules"]
    if not isinstance(rules, list) or not rules:
        raise fail(
            "rules", f"must be a non-empty list of rules (each with 'block' and 'at'), got {shown(rules)}"
        )
    parsed = tuple(_parse_rule(rule, f"rules[{i}]", fail, check_blocks) for i, rule in enumerate(rules))
    fallback = data.get("fallback", [])
    if not isinstance(fallback, list):
        raise fail(
            "fallback",
            "must be a list of rules (each with 'block' and 'at'), used where 'rules' place no block; "
            f"got {shown(fallback)}",
        )
    backup = tuple(_parse_rule(rule, f"fallback[{i}]", fail, check_blocks) for i, rule in enumerate(fallback))
    return Recipe(
        name=name,
        rules=parsed,
        init=init,
        description=description,
        source=source,
        target=target,
        fallback=backup,
    )


def _reject_unknown(data: Mapping[str, Any], allowed: tuple[str, ...], prefix: str, fail) -> None:
    for key in data:
        if key not in allowed:
            raise fail(f"{prefix}{_key_name(key)}", f"unknown key; allowed keys: {', '.join(allowed)}")


def _parse_stages(data: Mapping[str, Any], key: str, fail) -> tuple[int, ...] | None:
    stages = data.get("stages")
    if stages is None:
        return None
    if is_int(stages):
        stages = [stages]
    if not isinstance(stages, list) or not stages or any(not is_int(s) for s in stages):
        raise fail(
            f"{key}.stages",
            f"must be a list of stage indices (integers, negatives count from the end), got {shown(stages)}",
        )
    return tuple(stages)


def _parse_bounds(data: Mapping[str, Any], key: str, fail) -> dict[str, int | None]:
    bounds: dict[str, int | None] = {}
    for bound in ("min_channels", "max_channels"):
        value = data.get(bound)
        if value is not None and (not is_int(value) or value < 1):
            raise fail(f"{key}.{bound}", f"must be an integer >= 1, got {shown(value)}")
        bounds[bound] = value
    if bounds["min_channels"] and bounds["max_channels"] and bounds["min_channels"] > bounds["max_channels"]:
        raise fail(
            f"{key}.min_channels",
            f"{bounds['min_channels']} is greater than max_channels {bounds['max_channels']}",
        )
    return bounds


def _parse_patterns(data: Mapping[str, Any], key: str, fail) -> dict[str, tuple[str, ...]]:
    patterns: dict[str, tuple[str, ...]] = {}
    for which in ("include", "exclude"):
        value = data.get(which, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or any(not isinstance(v, str) for v in value):
            raise fail(
                f"{key}.{which}", f"must be a regular expression or a list of them, got {shown(value)}"
            )
        for pattern in value:
            try:
                compile_pattern(pattern)
            except PatternError as error:
                raise fail(
                    f"{key}.{which}", f"invalid regular expression {shown(pattern)}: {error}"
                ) from None
        patterns[which] = tuple(value)
    return patterns


def _parse_rule(data: Any, key: str, fail, check_blocks: bool = True) -> Rule:
    if not isinstance(data, Mapping):
        raise fail(key, f"must be a mapping with keys {', '.join(RULE_KEYS)}")
    _reject_unknown(data, RULE_KEYS, f"{key}.", fail)
    for required in ("block", "at"):
        if required not in data:
            raise fail(f"{key}.{required}", "missing; every rule needs 'block' and 'at'")
    block = _parse_block(data["block"], f"{key}.block", fail, check_blocks)
    at = data["at"]
    if at not in POSITIONS:
        raise fail(f"{key}.at", f"unknown position {shown(at)}; allowed: {', '.join(POSITIONS)}")
    stages = _parse_stages(data, key, fail)
    bounds = _parse_bounds(data, key, fail)
    patterns = _parse_patterns(data, key, fail)
    every = data.get("every", 1)
    if not is_int(every) or every < 1:
        raise fail(f"{key}.every", f"must be an integer >= 1 (1 keeps every match), got {shown(every)}")
    channels_last = data.get("channels_last", "native")
    if channels_last not in CHANNELS_LAST:
        raise fail(
            f"{key}.channels_last",
            f"{shown(channels_last)} is not allowed; allowed: {', '.join(CHANNELS_LAST)}",
        )
    name = data.get("name")
    if name is not None and (not isinstance(name, str) or not name.isidentifier() or len(name) > 64):
        raise fail(f"{key}.name", "must be a Python identifier of at most 64 characters (e.g. se, attn)")
    return Rule(
        block=block,
        at=at,
        stages=stages,
        every=every,
        channels_last=channels_last,
        name=name,
        min_channels=bounds["min_channels"],
        max_channels=bounds["max_channels"],
        include=patterns["include"],
        exclude=patterns["exclude"],
    )


def _parse_block(data: Any, key: str, fail, check_blocks: bool = True) -> BlockSpec:
    if isinstance(data, str):
        data = {"kind": data}
    if not isinstance(data, Mapping) or "kind" not in data:
        raise fail(
            key,
            f"must be a block kind ({', '.join(list_blocks())}) or a mapping with 'kind' and its parameters",
        )
    params = {k: v for k, v in data.items() if k != "kind"}
    kind = data["kind"]
    if not isinstance(kind, str):
        raise fail(f"{key}.kind", f"unknown block {shown(kind)}: allowed: {', '.join(list_blocks())}")
    if not check_blocks:
        return BlockSpec(kind=kind, params=dict(params))
    try:
        block_factory(kind)  # reaches timm only for a 'timm:' kind
    except InputError as error:
        raise fail(f"{key}.kind", str(error)) from None
    if "init" in params:
        raise fail(f"{key}.init", "init is set for the whole recipe (top-level 'init'), not per block")
    allowed = block_param_names(kind)
    for name in params:
        if allowed is not None and name not in allowed:
            raise fail(
                f"{key}.{_key_name(name)}",
                f"unknown parameter of block {shown(kind)}; allowed: {', '.join(allowed)}",
            )
    try:
        check_block_params(kind, params)
    except BlockParamError as error:
        raise fail(
            f"{key}.{error.param}",
            f"{shown(error.value)} is not allowed; must be {error.allowed}{_text_number_hint(error.value)}",
        ) from None
    except (ValueError, TypeError) as error:
        raise fail(key, str(error)) from None
    return BlockSpec(kind=kind, params=dict(params))


def _text_number_hint(value: Any) -> str:
    """Why YAML read a number as text: ``1e9`` (YAML 1.1 needs a dot and a signed exponent)."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return ""
        return f" (YAML reads {shown(value, 30)} as text, not a number; write it as {number!r})"
    return ""


def _key_name(key: Any) -> str:
    """A mapping key as an error names it: a string as is (cut), anything else as its repr."""
    return cut(key, 40) if isinstance(key, str) else shown(key, 40)


def positions_of(rules: Sequence[Rule]) -> str:
    """The positions ``rules`` name, each once, in order: "residual_branch, conv_output"."""
    return ", ".join(dict.fromkeys(r.at for r in rules))
