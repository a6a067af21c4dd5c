"""A changed module stays what it was: an instance of a generated subclass of its own class.

Surgery changes a module in one of two ways, and both keep ``isinstance``, every method, the
container protocol and the forward's signature (its optional arguments included):

- **around**: blocks run on what the module is given (``before``, one argument each) or on
  what it returns (``after``); in between, the class's own ``forward`` runs as written, so
  its keyword arguments, ``self.training`` branches and ``checkpoint_seq`` keep working::

      class Bottleneck(timm.models.resnet.Bottleneck):
          def forward(self, x):
              return self.cbam(self.forward_without_attention(x))

- **graph**: the module's forward is the code of its rewritten fx graph; arguments the trace
  fixed to a constant keep their place in the signature and are checked at every call.

The generated code is real source (registered with ``linecache``), so ``torch.jit.script``,
``torch.fx.symbolic_trace``, ``inspect`` and ``copy.deepcopy`` treat the subclass as any
other. The subclass keeps its base's name, qualified name and ``__module__``: tracers that
treat ``torch.nn``'s own layers as leaves still do.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import linecache
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import _jit_internal, fx, nn

from ..core.deprecation import deprecated_alias
from ..core.errors import InputError
from ..core.values import CONSTANT_TYPES

__all__ = [
    "INNER_FORWARD",
    "Around",
    "base_class",
    "derive_around",
    "derive_graph",
    "derived_spec",
    "has_rewritten_forward",
    "holds_nodes",
    "rewritten_forward",
]

INNER_FORWARD = "forward_without_attention"  # the base class's forward, as a method of the subclass
GRAPH_FORWARD = "forward_rewritten"  # the rewritten graph's code, as a method of the subclass
SPEC = "_attn_inject_derived"  # on a generated class: what it adds to its base
# Methods that code assigns to ``module.forward`` of an instance, bypassing the class's forward:
# Ultralytics' ``fuse()`` folds BatchNorm into a Conv, then sets ``m.forward = m.forward_fuse``.
# The blocks run around these too, with the same code as around ``forward``.
SWAPPED_FORWARDS = ("forward_fuse",)
_counter = itertools.count()
RESULT = "out"  # the name the generated forward keeps the module's result in


@dataclass(frozen=True)
class Around:
    """Blocks a module runs around its own forward: ``before`` maps a parameter name to the
    blocks applied to that argument, in order; ``after`` the blocks applied to its result;
    ``sizes`` maps a block to the two values it is also given (a token grid's height and
    width, for a grid that follows the input size): each a parameter, or an item of a tuple
    parameter (``size[0]``)."""

    before: tuple[tuple[str, tuple[str, ...]], ...] = ()
    after: tuple[str, ...] = ()
    sizes: tuple[tuple[str, tuple[str, str]], ...] = ()

    def add(
        self,
        *,
        before: str | None = None,
        after: str | None = None,
        block: str,
        sizes: tuple[str, str] | None = None,
    ) -> Around:
        given = self.sizes if sizes is None else (*self.sizes, (block, (sizes[0], sizes[1])))
        if after is not None or before is None:
            return Around(self.before, (*self.after, block), given)
        names = dict(self.before)
        names[before] = (*names.get(before, ()), block)
        return Around(tuple(names.items()), self.after, given)

    def call(self, block: str, value: str) -> str:
        """The code that runs ``block`` on ``value`` (with its sizes' parameters)."""
        extra = "".join(f", {name}" for name in dict(self.sizes).get(block, ()))
        return f"self.{block}({value}{extra})"


@dataclass(frozen=True)
class _Spec:
    """What a generated class adds to ``base``: blocks ``around`` its forward, or a rewritten
    forward (``graph``: the graph's code and its globals, and the checks of the signature)."""

    base: type[nn.Module]
    around: Around = field(default_factory=Around)
    graph: tuple[str, dict[str, Any], tuple[str, ...], tuple[str, ...], Any] | None = None


def _restore(spec: _Spec) -> nn.Module:
    """An empty instance of the class ``spec`` describes (unpickling; the state follows)."""
    if spec.graph is None:
        cls = _around_class(spec.base, spec.around)
    else:
        source, code_globals, checks, passed, forward = spec.graph
        named = {
            k: importlib.import_module(v.name) if isinstance(v, _Imported) else v
            for k, v in code_globals.items()
        }
        cls = _graph_class(spec.base, source, named, checks, passed, forward)
    return cls.__new__(cls)


@dataclass(frozen=True)
class _Imported:
    """A module the generated code names, pickled by its name."""

    name: str


def _reduce(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    """Pickle a module of a generated class by what its class adds, not by its name."""
    spec = type(self).__dict__[SPEC]
    if spec.graph is not None:
        source, code_globals, checks, passed, forward = spec.graph
        portable = {
            k: _Imported(v.__name__) if isinstance(v, types.ModuleType) else v
            for k, v in code_globals.items()
        }
        spec = _Spec(spec.base, spec.around, (source, portable, checks, passed, forward))
    return (_restore, (spec,), self.__getstate__())


def derived_spec(module: nn.Module) -> _Spec | None:
    """What the module's generated class adds to its base (None: not a generated class)."""
    spec = type(module).__dict__.get(SPEC)
    return spec if isinstance(spec, _Spec) else None


def has_rewritten_forward(module: nn.Module) -> bool:
    """Whether ``module``'s forward is a rewritten graph (not its class's own code)."""
    spec = derived_spec(module)
    return spec is not None and spec.graph is not None


rewritten_forward = deprecated_alias(has_rewritten_forward, "rewritten_forward", since="0.2.0")


def base_class(module: nn.Module) -> type[nn.Module]:
    """The user's class of ``module`` (its own class unless it is a generated one)."""
    spec = derived_spec(module)
    return spec.base if spec is not None else type(module)


def _compile(source: str, name: str, namespace: dict[str, Any], line: int = 1) -> Any:
    """Run ``source`` as a file of its own that ``inspect`` and TorchScript can read back,
    starting at line ``line`` of it."""
    filename = f"<attn-inject-{next(_counter)}>"
    source = "\n" * (line - 1) + source
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]


def _signature_text(signature: inspect.Signature, defaults: dict[str, Any]) -> tuple[str, list[str]]:
    """The parameter list (defaults by name in ``defaults``) and the call that passes them on."""
    params: list[str] = []
    call: list[str] = []
    star = False
    for i, param in enumerate(signature.parameters.values()):
        if i == 0:
            params.append(param.name)  # self
            continue
        text = param.name
        if param.annotation is not inspect.Parameter.empty:
            key = f"_annotation_{param.name}"
            defaults[key] = param.annotation
            text += f": {param.annotation if isinstance(param.annotation, str) else key}"
        if param.default is not inspect.Parameter.empty:
            key = f"_default_{param.name}"
            defaults[key] = param.default
            text += f"={key}"
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            text, star = f"*{param.name}", True  # (annotations of *args are left out)
            call.append(f"*{param.name}")
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            text = f"**{param.name}"
            call.append(f"**{param.name}")
        elif param.kind is inspect.Parameter.KEYWORD_ONLY:
            if not star:
                params.append("*")
                star = True
            call.append(f"{param.name}={param.name}")
        elif param.kind is inspect.Parameter.POSITIONAL_ONLY:
            call.append(param.name)
        else:
            call.append(param.name)
        params.append(text)
    text = ", ".join(params)
    if signature.return_annotation is not inspect.Signature.empty:
        defaults["_annotation_return"] = signature.return_annotation
        returned = signature.return_annotation
        text += f") -> {returned if isinstance(returned, str) else '_annotation_return'}"
    else:
        text += ")"
    return text, call


def _namespace(base: type[nn.Module]) -> dict[str, Any]:
    """The base forward's globals (its annotations resolve there), for the generated code."""
    forward = base.forward
    return dict(getattr(forward, "__globals__", {}))


def _make_class(base: type[nn.Module], attributes: Mapping[str, Any], spec: _Spec) -> type[nn.Module]:
    namespace = {
        **attributes,
        SPEC: spec,
        "__reduce_ex__": _reduce,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
    }
    return type(base.__name__, (base,), namespace)


def _size_parameter(given: str) -> str:
    """The parameter a block's size value reads: ``size`` of ``size[0]``; anything but a
    name or a name's item, or the name the generated code keeps the result in, is refused
    (it becomes code)."""
    name, bracket, rest = given.partition("[")
    item = not bracket or (rest.endswith("]") and rest[:-1].isdecimal() and rest[:-1].isascii())
    if not (name.isidentifier() and item) or name == RESULT:
        raise InputError(
            f"a block's grid size must be a parameter or its item (size[0]), not {RESULT!r}; got {given!r}"
        )
    return name


_AROUND_CLASSES: dict[tuple[type[nn.Module], Around], type[nn.Module]] = {}


def _around_class(base: type[nn.Module], around: Around) -> type[nn.Module]:
    if (base, around) in _AROUND_CLASSES:
        return _AROUND_CLASSES[(base, around)]
    signature = inspect.signature(base.forward)
    names = [p.name for p in signature.parameters.values()][1:]
    missing = [name for name, _ in around.before]
    missing += [_size_parameter(given) for _, pair in around.sizes for given in pair]
    missing = [name for name in missing if name not in names]
    if missing:
        raise InputError(f"{base.__qualname__}.forward has no parameter {missing[0]!r}")
    namespace = _namespace(base)
    params, call = _signature_text(signature, namespace)
    overloads = _script_overloads(base)

    def around_code(name: str, inner: str) -> str:
        lines = [f"def {name}({params}:"]
        for argument, blocks in around.before:
            for block in blocks:
                lines.append(f"    {argument} = {around.call(block, argument)}")
        lines.append(f"    {RESULT} = self.{inner}({', '.join(call)})")
        lines += [f"    {RESULT} = {around.call(block, RESULT)}" for block in around.after]
        lines.append(f"    return {RESULT}")
        return "\n".join(lines) + "\n"

    # TorchScript takes the overloads of a method only from code within its class's lines.
    line = base.forward.__code__.co_firstlineno if overloads else 1
    forward = _compile(around_code("forward", INNER_FORWARD), "forward", namespace, line)
    forward.__signature__ = signature
    forward.__annotations__ = dict(getattr(base.forward, "__annotations__", {}))
    inner = _renamed(base.forward, INNER_FORWARD)
    if overloads:
        _add_script_overloads(inner, base.__name__, overloads)
    attributes = {"forward": forward, INNER_FORWARD: inner}
    for name in SWAPPED_FORWARDS:
        variant = getattr(base, name, None)
        if inspect.isfunction(variant) and inspect.signature(variant) == signature:
            inner_name = f"{name}_without_attention"
            attributes[name] = _compile(around_code(name, inner_name), name, namespace)
            attributes[inner_name] = _renamed(variant, inner_name)
    if issubclass(base, nn.ModuleDict):
        attributes.update(_dict_without({*around.after, *(b for _, names in around.before for b in names)}))
    cls = _make_class(base, attributes, _Spec(base, around))
    _AROUND_CLASSES[(base, around)] = cls
    return cls


def _script_overloads(base: type[nn.Module]) -> list[Any]:
    """The signatures TorchScript compiles ``base.forward`` for, where its class declares them
    with ``torch.jit._overload_method`` (torchvision's ``_DenseLayer`` takes a tensor or a
    list of them); [] where it declares none. A generated ``forward`` of the same module and
    name is compiled for them too; the forward it calls must be overloaded alike."""
    by_class = _jit_internal._overloaded_methods.get(_jit_internal._qualified_name(base.forward), {})
    return list(by_class.get(base.__name__, ()))  # looked up by the class's name, as TorchScript does


def _add_script_overloads(method: Any, class_name: str, overloads: list[Any]) -> None:
    """Declare ``overloads`` for ``method`` of the class named ``class_name``, as
    ``torch.jit._overload_method`` would have in the class's own code."""
    name = _jit_internal._qualified_name(method)
    _jit_internal._overloaded_methods.setdefault(name, {})[class_name] = overloads
    _jit_internal._overloaded_method_class_fileno[(name, class_name)] = method.__code__.co_firstlineno


def _dict_without(blocks: set[str]) -> dict[str, Any]:
    """A ModuleDict's protocol without ``blocks`` (a dense block iterates its own items): its
    length, keys and iteration stay the original's; the blocks stay its children, so
    ``state_dict``, ``.to()`` and ``named_modules`` still see them."""

    def items(self: nn.ModuleDict) -> list[tuple[str, nn.Module]]:
        return [(k, v) for k, v in self._modules.items() if k not in blocks and v is not None]

    def keys(self: nn.ModuleDict) -> list[str]:
        return [k for k, _ in items(self)]

    def values(self: nn.ModuleDict) -> list[nn.Module]:
        return [v for _, v in items(self)]

    def length(self: nn.ModuleDict) -> int:
        return len(items(self))

    def iterate(self: nn.ModuleDict) -> Any:
        return iter(keys(self))

    def contains(self: nn.ModuleDict, key: object) -> bool:
        return key in keys(self)

    return {
        "items": items,
        "keys": keys,
        "values": values,
        "__len__": length,
        "__iter__": iterate,
        "__contains__": contains,
    }


def derive_around(module: nn.Module, around: Around) -> None:
    """Make ``module`` (a copy the caller owns) run ``around``'s blocks, which must be its
    children, around its class's forward. A module already derived keeps its earlier blocks."""
    spec = derived_spec(module)
    if spec is not None and spec.graph is not None:
        raise InputError(f"{spec.base.__qualname__}'s forward is already rewritten")
    if spec is not None:
        merged = spec.around
        sizes = dict(around.sizes)
        for name, blocks in around.before:
            for block in blocks:
                merged = merged.add(before=name, block=block, sizes=sizes.get(block))
        for block in around.after:
            merged = merged.add(after="", block=block, sizes=sizes.get(block))
        around = merged
    module.__class__ = _around_class(base_class(module), around)


def _guard(name: str, value: Any, where: str) -> list[str]:
    """Lines that refuse an argument other than the constant the trace fixed it to."""
    if value is None:
        test = f"{name} is not None"
    elif isinstance(value, CONSTANT_TYPES):
        test = f"{name} != {value!r}"
    else:
        return []
    message = (
        f"{where}'s forward was rewritten with {name}={value!r}; call it with that value, "
        "or inject into a model whose rewritten modules are not given it"
    )
    return [f"    if {test}:", f"        raise RuntimeError({message!r})"]


def _guard_empty(param: inspect.Parameter, where: str) -> list[str]:
    """Lines that refuse ``*args`` / ``**kwargs`` that are not empty, as the trace had them."""
    star = "*" if param.kind is inspect.Parameter.VAR_POSITIONAL else "**"
    message = (
        f"{where}'s forward was rewritten for a call without {star}{param.name}; call it without "
        "them, or inject into a model whose rewritten modules are not given them"
    )
    return [f"    if {param.name}:", f"        raise RuntimeError({message!r})"]


def derive_graph(
    module: nn.Module,
    graph: fx.Graph,
    arguments: tuple[tuple[str, Any], ...],
    where: str,
    forward: Any = None,
) -> None:
    """Make ``module`` (a copy the caller owns) run ``graph`` as its forward, with its class's
    signature (or that of ``forward``, the function an instance used as its forward).
    ``arguments`` are the call's arguments the graph was traced with, by parameter (graph
    values as nodes); any other parameter, or a constant argument, is checked against the
    value the trace fixed."""
    base = base_class(module)
    forward = forward or base.forward
    signature = inspect.signature(forward)
    traced = dict(arguments)
    checks: list[str] = []
    passed: list[str] = []
    for i, param in enumerate(signature.parameters.values()):
        if i == 0:
            continue
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            checks += _guard_empty(param, where)  # traced empty (trace.fixed_arity)
            continue
        if param.name in traced:
            value = traced[param.name]
            passed.append(param.name)
            if not holds_nodes(value):
                checks += _guard(param.name, value, where)
        elif param.default is not inspect.Parameter.empty:
            checks += _guard(param.name, param.default, where)
    code = graph.python_code(root_module="self")
    module.__class__ = _graph_class(
        base, code.src.lstrip(), dict(code.globals), tuple(checks), tuple(passed), forward
    )


def _graph_class(
    base: type[nn.Module],
    source: str,
    code_globals: dict[str, Any],
    checks: tuple[str, ...],
    passed: tuple[str, ...],
    forward: Any,
) -> type[nn.Module]:
    signature = inspect.signature(forward)
    namespace = {**_namespace(base), **code_globals}
    method = _compile(source, "forward", namespace)
    method.__name__ = method.__qualname__ = GRAPH_FORWARD
    params, _ = _signature_text(signature, namespace)
    lines = [f"def forward({params}:", *checks, f"    return self.{GRAPH_FORWARD}({', '.join(passed)})"]
    wrapper = _compile("\n".join(lines) + "\n", "forward", namespace)
    wrapper.__signature__ = signature
    wrapper.__annotations__ = dict(getattr(forward, "__annotations__", {}))
    attributes = {
        "forward": wrapper,
        GRAPH_FORWARD: method,
        INNER_FORWARD: _renamed(forward, INNER_FORWARD),
    }
    graph = (source, code_globals, checks, passed, forward)
    return _make_class(base, attributes, _Spec(base, graph=graph))


def _renamed(function: Any, name: str) -> Any:
    """``function`` under another name (TorchScript compiles a method under its own name)."""
    copy = types.FunctionType(
        function.__code__, function.__globals__, name, function.__defaults__, function.__closure__
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__annotations__ = dict(function.__annotations__)
    copy.__qualname__ = function.__qualname__.rpartition(".")[0] + "." + name
    return copy


def holds_nodes(value: Any) -> bool:
    """Whether ``value`` (a node, or containers of them) holds a graph value."""
    found = False

    def visit(v: Any) -> Any:
        nonlocal found
        found = found or isinstance(v, fx.Node)
        return v

    fx.node.map_aggregate(value, visit)
    return found
