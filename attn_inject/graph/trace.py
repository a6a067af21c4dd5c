"""Tracing a model into a torch.fx graph.

Leaves (modules kept whole as ``call_module``) are torch.nn's own, timm's registered
non-traceable modules, the package's attention blocks (every inserted block, found by its
marker, and every block class of the package, so a patched model can be patched again), the
classes registered with :func:`register_leaf_module`, and small modules whose forward depends
on ``self.training`` (DropPath, StochasticDepth): traced through, their train-time behaviour
would be frozen to the mode at trace time. Functions timm registers as non-traceable are
wrapped whole.

Two strategies, tried in order:

1. ``whole``: the model's forward is traced through, with every optional argument of the
   root's ``forward`` fixed to its default (``concrete_args``: ``mask=None`` stays ``None``
   instead of becoming a graph input whose ``if mask is not None`` fx cannot decide).
   A root ``forward(x, *args, **kwargs)``, or one a decorator wraps in ``(*args, **kwargs)``
   (``functools.wraps``: HF transformers' ``@can_return_tuple``), is traced for the call
   ``model(x)``: its named parameters (``inspect.signature`` follows ``__wrapped__``) are the
   graph's inputs, ``*args`` and ``**kwargs`` are empty (:func:`fixed_arity`), and the
   decorator's own code runs as part of the trace.
2. ``opaque``: when tracing fails inside a submodule (control flow on a traced value, a
   proxy iterated...), that innermost submodule becomes a leaf, kept whole and called as it
   is, and tracing starts again; up to ``MAX_OPAQUE`` times. The rest of the model stays
   open to insertion; the opaque modules and why are recorded in :class:`TraceResult`.

A failure in the root's own forward code has no submodule to isolate: it raises
:class:`TraceError` with fx's reason (``target=`` can then name a traceable submodule).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import dis
import inspect
import re
import sys
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn

from ..core.errors import AttnInjectError, InputError
from ..core.kept import Kept
from ..core.markers import is_inserted_block
from ..core.messages import shown
from ..core.views import unregistered

__all__ = [
    "FX_CONSTANT",
    "Assumption",
    "ModelAttribute",
    "ModelProxy",
    "ModelTracer",
    "OpaqueModule",
    "TraceError",
    "TraceResult",
    "TracerFactory",
    "TypedOutputCodeGen",
    "caches_kept",
    "eval_mode",
    "fixed_arity",
    "fx_constants_dropped",
    "keep_fx_constants",
    "keep_output_type",
    "mode",
    "plain_tracer",
    "register_leaf_module",
    "thread_in_place",
    "timm_notrace",
    "trace",
    "tracing_guards",
    "tracing_strategy",
    "unregister_leaf_module",
    "values_kept",
    "writes_undone",
]

MAX_OPAQUE = 32


class TraceError(AttnInjectError, RuntimeError):
    """torch.fx could not trace the model."""


def timm_notrace() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """The module types and functions timm registers as not traceable."""
    try:
        import timm.models  # noqa: F401  (registers every model's non-traceable modules)
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return (), ()
    functions = tuple(f for f in get_notrace_functions() if callable(f))
    return tuple(get_notrace_modules()), functions


_READS_TRAINING: dict[type, bool] = {}


def reads_training(module: nn.Module) -> bool:
    """Whether the module's own forward reads ``self.training`` (an inline dropout, a
    train-only branch): traced, that code would be fixed to the mode it was traced in."""
    cls = type(module)
    if isinstance(module, fx.GraphModule):
        return False
    if cls not in _READS_TRAINING:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _READS_TRAINING[cls] = "self.training" in source
    return _READS_TRAINING[cls]


def depends_on_training(module: nn.Module) -> bool:
    """A module without parametrised children whose forward reads ``self.training``."""
    if not reads_training(module):
        return False
    return not any(True for child in module.children() for _ in child.parameters())


def _skipinit_known(module: nn.Module) -> bool:
    """timm's skipinit gain: ``None`` when off, a parameter when on, applied in place by
    ``out.mul_(gain)``, which :func:`thread_in_place` makes part of the data flow. A module
    without the attribute is not the one this rule knows, and stays whole."""
    if "skipinit_gain" in module._parameters:
        return True
    return "skipinit_gain" in vars(module) and vars(module)["skipinit_gain"] is None


# timm modules registered as not traceable, with the condition under which the reason timm
# gives does not apply to an instance. NormFreeBlock: "mul_ causes FX to drop a relevant
# node", the in-place skipinit gain, which the trace threads into the data flow.
TRACEABLE_WHEN: dict[str, Callable[[nn.Module], bool]] = {
    "timm.models.nfnet.NormFreeBlock": _skipinit_known,
}


# Methods whose result depends only on the sizes, dtype and device of their tensor argument
# (timm's shifted-window masks: ``get_attn_mask(x)`` fills a mask by item assignment at
# sizes read from ``x``, which fx cannot trace). Traced, such a call is one ``call_method``
# node on the module, run as written at every call, so the module around it stays open to
# insertion and its static and dynamic-size variants get the same points.
SIZE_ONLY_METHODS: dict[str, tuple[str, ...]] = {
    "timm.models.swin_transformer.SwinTransformerBlock": ("get_attn_mask",),
    "timm.models.swin_transformer_v2.SwinTransformerV2Block": ("get_attn_mask",),
    "timm.models.swin_transformer_v2_cr.SwinTransformerBlock": ("get_attn_mask",),
}


def size_only_methods(module: nn.Module) -> tuple[str, ...]:
    """The methods of ``module`` that :data:`SIZE_ONLY_METHODS` records as one call."""
    cls = type(module)
    for klass in cls.__mro__:
        names = SIZE_ONLY_METHODS.get(_dotted(klass))
        if names:
            return tuple(n for n in names if callable(getattr(module, n, None)))
    return ()


@contextlib.contextmanager
def size_only_calls_recorded(
    model: nn.Module, tracer: fx.Tracer, named: Sequence[tuple[str, nn.Module]] | None = None
) -> Iterator[None]:
    """While ``tracer`` traces ``model``, a call of a size-only method with a traced value
    becomes one ``call_method`` node on its module (reached by ``get_attr``)."""
    patched: list[tuple[nn.Module, str]] = []
    for path, module in model.named_modules() if named is None else named:
        for name in size_only_methods(module):
            if name in vars(module):
                continue
            module.__dict__[name] = _recording(tracer, path, name, getattr(module, name))
            patched.append((module, name))
    try:
        yield
    finally:
        for module, name in patched:
            module.__dict__.pop(name, None)


def _recording(tracer: fx.Tracer, path: str, name: str, method: Callable) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        if not _proxies((args, kwargs)):
            return method(*args, **kwargs)
        before = _last_node(tracer.graph)
        try:
            return method(*args, **kwargs)  # traceable as written (no mask: returns None)
        except Exception:
            _erase_after(tracer.graph, before)
        owner = tracer.create_proxy("get_attr", path, (), {})
        return tracer.create_proxy("call_method", name, (owner, *args), kwargs)

    return call


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# Module classes traced as leaves, by dotted name; a subclass is a leaf too. The package's
# blocks all derive from LayoutBlock (SE, ECA, CBAM, SimAM, and Blended, which wraps timm's
# kinds and registered blocks without a blend of their own).
_LEAF_MODULES: dict[str, None] = {"attn_inject.blocks.layout.LayoutBlock": None}
_BUILT_IN_LEAVES = frozenset(_LEAF_MODULES)


def _leaf_name(module_class: type | str) -> str:
    if isinstance(module_class, type) and issubclass(module_class, nn.Module):
        return _dotted(module_class)
    dotted = isinstance(module_class, str) and "." in module_class
    if dotted and all(part.isidentifier() for part in str(module_class).split(".")):
        return str(module_class)
    raise InputError(
        f"leaf module {shown(module_class)} must be an nn.Module class or its dotted name "
        "('package.module.Class')"
    )


def register_leaf_module(module_class: type | str) -> str:
    """Trace every instance of ``module_class`` (an ``nn.Module`` class, or its dotted name
    ``"package.module.Class"`` so that the class need not be imported) and of its subclasses
    whole, as one ``call_module`` node: no block goes inside it, and code fx cannot trace in
    its forward stays out of the trace. Returns the dotted name; registering it again is a
    no-op."""
    name = _leaf_name(module_class)
    _LEAF_MODULES[name] = None
    _LEAF_CLASSES.clear()
    return name


def unregister_leaf_module(module_class: type | str) -> str:
    """Trace ``module_class`` through again, as before :func:`register_leaf_module`; the
    package's own blocks stay leaves."""
    name = _leaf_name(module_class)
    unregistered(_LEAF_MODULES, name, _BUILT_IN_LEAVES, "leaf module", "leaf modules")
    _LEAF_CLASSES.clear()
    return name


def registered_leaf(module: nn.Module) -> bool:
    """Whether ``module``'s class, or a class it derives from, is a registered leaf."""
    cls = type(module)
    known = _LEAF_CLASSES.get(cls)
    if known is None:
        known = _LEAF_CLASSES[cls] = any(_dotted(klass) in _LEAF_MODULES for klass in cls.__mro__)
    return known


# registered_leaf's answer per class, for the registry as it is (emptied when it changes).
_LEAF_CLASSES: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def traceable_despite_notrace(module: nn.Module) -> bool:
    """Whether a module timm keeps whole can be traced through in this instance."""
    cls = type(module)
    condition = TRACEABLE_WHEN.get(_dotted(cls))
    return condition is not None and condition(module)


NamedTensors = dict[int, tuple[str, torch.Tensor]]  # id -> (first name, the tensor)


@dataclasses.dataclass(frozen=True, eq=False)
class TensorNames:
    """A module's parameters and buffers, each under the first name its
    ``named_parameters()`` / ``named_buffers()`` gives it (the name fx's own walk finds).
    The tables hold the tensors, so an ``id`` is never one of a tensor freed since. A name
    is given only while it still holds its tensor: a forward that re-registers, replaces or
    deletes a tensor during the trace sends that tensor to fx's own walk. (One change stays
    unseen: a tensor the forward also registers under a name that comes before its own,
    which fx would then name by that name; both name the same tensor.)"""

    root: nn.Module
    parameters: NamedTensors
    buffers: NamedTensors

    @classmethod
    def of(cls, root: nn.Module) -> TensorNames:
        parameters: NamedTensors = {}
        for name, p in root.named_parameters():
            parameters.setdefault(id(p), (name, p))
        buffers: NamedTensors = {}
        for name, b in root.named_buffers():
            buffers.setdefault(id(b), (name, b))
        return cls(root, parameters, buffers)

    def parameter(self, value: torch.Tensor) -> str | None:
        return self._named(self.parameters, value, "_parameters")

    def buffer(self, value: torch.Tensor) -> str | None:
        return self._named(self.buffers, value, "_buffers")

    def _named(self, table: NamedTensors, value: torch.Tensor, slots: str) -> str | None:
        """``value``'s name in ``table`` while that name still holds it in the module tree."""
        found = table.get(id(value))
        if found is None or found[1] is not value:
            return None
        path, _, leaf = found[0].rpartition(".")
        try:
            module = self.root.get_submodule(path)
        except AttributeError:  # a module on the way removed during the trace
            return None
        return found[0] if getattr(module, slots).get(leaf) is value else None


Instructions = tuple[tuple[int, ...], tuple[tuple[str, Any], ...]]

# Each code object's instructions, read once across traces (code objects never change);
# bounded, and emptied by ``forget_kept_results`` as every result kept across calls is.
_read_code: Kept[Instructions] = Kept(4096)


def _instructions(code: Any) -> Instructions:
    """The offsets and (opname, argval) of ``code``'s instructions."""

    def read() -> Instructions:
        listed = list(dis.get_instructions(code))
        return tuple(i.offset for i in listed), tuple((i.opname, i.argval) for i in listed)

    return _read_code.get(code, read)


def unpacked_count(code: Any, last_instruction: int) -> int | None:
    """How many values the instruction at ``last_instruction`` of ``code`` unpacks, when it
    is an ``UNPACK_SEQUENCE`` (``a, b, c = x``): fx's own rule in ``Proxy.__iter__``."""
    offsets, instructions = _instructions(code)
    if sys.version_info >= (3, 11):
        index = bisect.bisect_left(offsets, last_instruction)
    else:
        index = last_instruction // 2
    opname, argval = instructions[index]
    return int(argval) if opname == "UNPACK_SEQUENCE" else None


class ModelProxy(fx.Proxy):
    """fx's proxy, iterated as fx iterates it (an unpacking ``a, b, c = x`` gives three
    items, anything else asks the tracer), with the calling code's instructions read once
    per code object instead of at every iteration: fx disassembles the whole calling
    function each time, which was about a third of tracing a Swin Transformer."""

    def __getattr__(self, name: str) -> Any:
        return ModelAttribute(self, name)

    def __iter__(self) -> Iterator[fx.Proxy]:
        frame = inspect.currentframe()
        calling = frame.f_back if frame is not None else None
        if calling is None:
            raise AssertionError("a proxy iterated with no calling frame")
        count = unpacked_count(calling.f_code, calling.f_lasti)
        if count is not None:
            items: Any = self  # fx adds __getitem__ at run time
            return (items[i] for i in range(count))
        return self.tracer.iter(self)


class ModelAttribute(fx.proxy.Attribute, ModelProxy):
    """fx's attribute proxy (``x.shape``), iterated as :class:`ModelProxy` is."""


# Argument types fx's create_arg returns as they are (its base types' commonest).
_AS_THEY_ARE = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device})


class ModuleStack(collections.OrderedDict):
    """fx's stack of the modules being called, copied into every node's
    ``meta["nn_module_stack"]`` as an ``OrderedDict`` by a plain constructor call: ``copy.copy``
    rebuilds it through ``__reduce_ex__``, a tenth of a whole trace."""

    def __copy__(self) -> collections.OrderedDict:
        return collections.OrderedDict(self)


class ModuleScope(fx.proxy.Scope):
    """fx's scope of the module being called, which fx copies at every module call to restore
    it after: copied by a plain constructor call instead of ``copy.copy``'s generic path."""

    def __copy__(self) -> fx.proxy.Scope:
        return fx.proxy.Scope(self.module_path, self.module_type)


class ModelTracer(fx.Tracer):
    """An fx tracer with timm's leaves, attention blocks, registered leaf modules and
    train-dependent modules as leaves."""

    def __init__(
        self,
        leaf_types: tuple[type, ...] = (),
        autowrap_functions: tuple[Callable, ...] = (),
        opaque: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(autowrap_functions=autowrap_functions)
        self.module_stack = ModuleStack()
        self.scope = ModuleScope("", None)
        self.leaf_types = tuple(leaf_types)
        self._listed: dict[type, bool] = {}  # whether a class is one of leaf_types, by class
        self.opaque = opaque
        self.failed_in: tuple[str, BaseException] | None = None  # innermost traced-through module
        self.calls: list[ModuleCall] = []  # every module call, in the order the calls ended
        self.output_type: type | None = None  # the root's output, a dict that is a dataclass
        self.assumptions: list[Assumption] = []  # plain values the code needed (none here: fx refuses)
        self._tensor_names: TensorNames | None = None
        self._leaves: dict[tuple[int, str], tuple[nn.Module, bool]] = {}  # (module, name) -> leaf
        self._signatures: dict[Callable, inspect.Signature] = {}  # forward -> its signature
        self._read_buffers: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}  # see getattr

    def trace(self, root: nn.Module | Callable[..., Any], concrete_args: Any = None) -> fx.Graph:
        self._tensor_names = None  # read from this root when first needed
        self._leaves = {}
        self._signatures = {}
        self._read_buffers = {}
        try:
            return super().trace(root, concrete_args)
        finally:
            _put_back(self._read_buffers.values())

    def _kept_as_read(self, buffer: torch.Tensor) -> torch.Tensor:
        """A buffer handed to the traced code as itself (fx's way), with its value kept to be
        put back after the trace: code that writes into it (``self.calls.add_(1)``) runs on
        the real tensor while tracing."""
        if id(buffer) not in self._read_buffers:
            self._read_buffers.update((id(kept[0]), kept) for kept in values_kept([buffer]))
        return buffer

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ModelProxy(node, self)

    def _names(self) -> TensorNames:
        if self._tensor_names is None:  # once per trace (``trace`` resets it)
            self._tensor_names = TensorNames.of(self.root)
        return self._tensor_names

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        """fx's own ``getattr`` (a parameter, or a buffer, read as a module attribute becomes
        a ``get_attr`` proxy, one per name), with the name found in a table of the root's
        tensors instead of a walk of every parameter per read, which made a trace quadratic
        in the model's size (timm's norm layers read their weights as attributes)."""
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        if self.param_shapes_constant:  # fx's ParameterProxy: left to fx, as it is
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        names = self._names()
        name = names.parameter(attr_val) if isinstance(attr_val, nn.Parameter) else None
        if name is None and self.proxy_buffer_attributes:
            name = names.buffer(attr_val)
        if name is None:
            value = super().getattr(attr, attr_val, parameter_proxy_cache)  # fx's walk, as ever
            return self._kept_as_read(value) if value is attr_val else value
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def create_arg(self, a: Any) -> Any:
        """fx's own ``create_arg``; a parameter or buffer of the root is found by the table,
        and the commonest arguments take fx's answer directly: a proxy its node, a plain
        constant itself, a plain tuple, list or dict of named values each of its items' (fx
        reaches the same answers after half a dozen checks for rarer kinds)."""
        kind = type(a)
        if kind in _AS_THEY_ARE:
            return a
        if isinstance(a, fx.Proxy):
            return a.node
        if kind is tuple:
            return tuple([self.create_arg(item) for item in a])
        if kind is list:
            return [self.create_arg(item) for item in a]
        if kind is dict and all(type(key) is str for key in a):
            return {key: self.create_arg(value) for key, value in a.items()}
        if isinstance(a, torch.Tensor):
            names = self._names()
            name = names.parameter(a) if isinstance(a, nn.Parameter) else names.buffer(a)
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def create_args_for_root(
        self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None
    ) -> tuple[Any, list[Any]]:
        fixed = fixed_arity(root_fn) if is_module else None
        fn, args = super().create_args_for_root(fixed or root_fn, is_module, concrete_args)

        def returning(*given: Any) -> Any:
            out = fn(*given)
            if isinstance(out, dict) and dataclasses.is_dataclass(out):
                self.output_type = type(out)
            return out

        return returning, args

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if isinstance(m, nn.Sequential) and not self._installed(m):
            # A slice of an installed Sequential (VoVNet's ``self.stem[:-1](x)``): a new
            # container of installed members, traced through to them.
            return forward(*args, **kwargs)
        before = _last_node(self.graph)
        arguments = None  # read before the call, which may edit a list it is given (HRNet)
        try:
            if not self.is_leaf_module(m, self.path_of_module(m)):
                arguments = _bound_arguments(m, args, kwargs, self._signatures)
        except NameError:
            pass
        try:
            result = super().call_module(m, forward, args, kwargs)
        except Exception as error:
            if self.failed_in is None:
                name = self.path_of_module(m)
                if not self.is_leaf_module(m, name):
                    self.failed_in = (name, error)
            raise
        self._record_call(m, before, args, kwargs, arguments, result)
        return result

    def _installed(self, m: nn.Module) -> bool:
        try:
            self.path_of_module(m)
        except NameError:
            return False
        return True

    def _record_call(
        self,
        m: nn.Module,
        before: fx.Node | None,
        args: tuple,
        kwargs: dict,
        arguments: tuple[tuple[str, Any], ...] | None,
        result: Any,
    ) -> None:
        try:
            name = self.path_of_module(m)
        except NameError:
            return
        after = _last_node(self.graph)
        nodes: list[fx.Node] = []
        if after is not None and after is not before:
            node = before.next if before is not None else next(iter(self.graph.nodes))
            while True:
                nodes.append(node)
                if node is after:
                    break
                node = node.next
        inputs = [p.node for p in _proxies((args, kwargs))]
        leaf = self.is_leaf_module(m, name)
        self.calls.append(
            ModuleCall(
                path=name,
                leaf=leaf,
                nodes=tuple(nodes),
                inputs=tuple(inputs),
                output=result.node if isinstance(result, fx.Proxy) else None,
                arguments=None if leaf else arguments,
                result=None if leaf else _as_nodes(result),
            )
        )

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Whether fx records ``m`` as one node; asked three times a call (here, by fx's
        ``call_module`` and when the call is recorded), and answered once per module and
        name in a trace."""
        key = (id(m), module_qualified_name)
        found = self._leaves.get(key)
        if found is not None and found[0] is m:
            return found[1]
        leaf = self._is_leaf(m, module_qualified_name)
        self._leaves[key] = (m, leaf)
        return leaf

    def _is_leaf(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.opaque:
            return True
        if is_inserted_block(m) or registered_leaf(m):
            return True
        listed = self._listed.get(type(m))
        if listed is None:
            listed = self._listed[type(m)] = isinstance(m, self.leaf_types)
        if listed and not traceable_despite_notrace(m):
            return True
        if isinstance(m, nn.Sequential):
            return False
        if super().is_leaf_module(m, module_qualified_name):
            return True
        return depends_on_training(m)


def _listed(model: nn.Module, modules: Sequence[nn.Module] | None) -> Iterable[nn.Module]:
    """``modules`` where the caller has just listed the model's modules, else a walk of them."""
    return model.modules() if modules is None else modules


@contextlib.contextmanager
def eval_mode(model: nn.Module, modules: Sequence[nn.Module] | None = None) -> Iterator[nn.Module]:
    """Put every module in eval mode for the duration, then restore each module's own flag
    (``modules``: the model's, when the caller has just listed them)."""
    with mode(model, training=False, modules=modules):
        yield model


@contextlib.contextmanager
def mode(model: nn.Module, training: bool, modules: Sequence[nn.Module] | None = None) -> Iterator[nn.Module]:
    """Every module in train (or eval) mode for the duration, then each one's own flag back."""
    flags = [(m, m.training) for m in _listed(model, modules)]
    for m, _ in flags:
        m.__dict__["training"] = training  # the flag only: cheaper than Module.__setattr__
    try:
        yield model
    finally:
        for m, flag in flags:
            m.__dict__["training"] = flag


@dataclasses.dataclass(frozen=True)
class ModuleCall:
    """One call of a submodule while tracing: the graph nodes its forward created (in order),
    the graph values it was given, and the node it returned (None: not a single tensor)."""

    path: str
    leaf: bool
    nodes: tuple[fx.Node, ...]
    inputs: tuple[fx.Node, ...]
    output: fx.Node | None
    arguments: tuple[tuple[str, Any], ...] | None = None  # parameter -> value (graph values as nodes)
    result: Any = None  # what the call returned, graph values as nodes


def _last_node(graph: fx.Graph) -> fx.Node | None:
    for node in reversed(graph.nodes):
        return node
    return None


def _erase_after(graph: fx.Graph, last: fx.Node | None) -> None:
    """Remove the nodes a failed attempt added after ``last``, newest first."""
    while (node := _last_node(graph)) is not None and node is not last:
        graph.erase_node(node)


def _proxies(value: Any) -> list[fx.Proxy]:
    found: list[fx.Proxy] = []

    def visit(v: Any) -> Any:
        if isinstance(v, fx.Proxy):
            found.append(v)
        return v

    fx.node.map_aggregate(value, visit)
    return found


def _as_nodes(value: Any) -> Any:
    return fx.node.map_aggregate(value, lambda v: v.node if isinstance(v, fx.Proxy) else v)


def _bound_arguments(
    m: nn.Module, args: tuple, kwargs: dict, signatures: dict[Any, inspect.Signature]
) -> tuple[tuple[str, Any], ...] | None:
    """The call's arguments by ``forward`` parameter name, in order (None: *args / **kwargs).
    ``signatures`` keeps each class's ``forward`` signature (``self`` first) for the trace."""
    method: Any = m.forward
    function: Any = getattr(method, "__func__", None)  # the class's plain function, bound to ``m``
    by_class = isinstance(function, types.FunctionType) and getattr(method, "__self__", None) is m
    try:
        if by_class:
            signature = signatures.get(function) or inspect.signature(function)
            signatures[function] = signature
            bound = signature.bind(m, *args, **kwargs)
        else:
            signature = inspect.signature(method)
            bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        return None
    named = [(name, _as_nodes(value)) for name, value in bound.arguments.items()]
    return tuple(named[1:] if by_class else named)  # without ``self``


def is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


@dataclasses.dataclass(frozen=True)
class OpaqueModule:
    """A submodule fx could not trace through, kept whole (no block can go inside it)."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class Assumption:
    """A traced value the model's code needed as a plain one (``bool``, ``int``, a length),
    fixed to what the planned input gives and checked at every call of a rewritten forward
    (:mod:`attn_inject.graph.specialise`)."""

    module: str  # where the code ran ("" for the root)
    use: str  # bool, int, float or len
    source: str  # the graph value, by its node's name
    value: Any

    def __str__(self) -> str:
        return f"{self.use}({self.source}) == {self.value!r} in {self.module or 'the root'}"


@dataclasses.dataclass(frozen=True)
class TraceResult:
    """The traced graph, the submodules kept opaque, and the sizes specialised."""

    graph: fx.Graph
    opaque: tuple[OpaqueModule, ...] = ()
    calls: tuple[ModuleCall, ...] = ()
    assumptions: tuple[Assumption, ...] = ()


def tracing_strategy(opaque: tuple[OpaqueModule, ...], assumptions: tuple[Assumption, ...] = ()) -> str:
    """How a model was traced: "whole"; "specialised" when sizes were fixed to the planned
    input's; "opaque" when submodules were kept whole."""
    return "opaque" if opaque else "specialised" if assumptions else "whole"


OUTPUT_TYPE = "_attn_inject_output_type"  # the name of the output's class in generated code


class TypedOutputCodeGen(fx.graph.CodeGen):
    """fx's code for a graph whose output fx keeps as a ``dict`` but the model returned as
    a dict that is also a dataclass (HF transformers' ``ModelOutput``): the generated
    ``return`` rebuilds that class from the dict (``return BaseModelOutput(**{...})``), so
    a rewritten forward returns what the model's own did."""

    def __init__(self, output_type: type) -> None:
        super().__init__()
        self.output_type = output_type

    def generate_output(
        self,
        output_args: Any,
        *,
        descs: Any = None,
        repr_fn: Callable[[object], str] | None = None,
    ) -> str:
        plain = super().generate_output(output_args, repr_fn=repr_fn).removeprefix("return ")
        return f"return {OUTPUT_TYPE}(**{plain})"

    def _gen_python_code(self, *args: Any, **kwargs: Any) -> Any:
        code = super()._gen_python_code(*args, **kwargs)
        code.globals[OUTPUT_TYPE] = self.output_type
        return code

    def process_outputs(self, outputs: Any) -> Any:
        return self.output_type(**outputs)


def keep_output_type(graph: fx.Graph, output_type: type | None) -> None:
    """Have ``graph``'s code return ``output_type`` where fx made the model's output a
    plain dict (:class:`TypedOutputCodeGen`)."""
    if output_type is None or type(graph._codegen) is not fx.graph.CodeGen:
        return
    output = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
    if output is not None and output.args and isinstance(output.args[0], dict):
        graph.set_codegen(TypedOutputCodeGen(output_type))


def thread_in_place(graph: fx.Graph) -> None:
    """Make in-place tensor methods part of the data flow: ``out.mul_(gain)`` (timm's
    NormFreeBlock skipinit) is traced as a node that nothing reads, while the code after it
    reads ``out``, which it changed. Nodes after it now read its result instead, which is the
    same tensor at run time, so the generated code computes what the model's does and a
    block after ``out`` sees the changed value."""
    for node in graph.nodes:
        if not (node.op == "call_method" and _is_in_place(node.target)):
            continue
        source = node.args[0] if node.args else None
        if isinstance(source, fx.Node):
            later = {user for user in source.users if user > node}
            source.replace_all_uses_with(node, delete_user_cb=later.__contains__)


def _is_in_place(name: object) -> bool:
    return isinstance(name, str) and name.endswith("_") and not name.startswith("_")


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:240]


def fixed_arity(forward: Callable[..., Any]) -> Callable[..., Any] | None:
    """``forward`` (a function of ``self``) as a function of its named parameters alone, with
    ``*args`` and ``**kwargs`` empty, when it takes them or a decorator wraps it; None when
    fx can trace it as it is, or when it names no parameter (nothing to trace it for).

    ``@can_return_tuple def forward(self, pixel_values=None, **kwargs)`` becomes::

        def forward(self, pixel_values=_default_pixel_values):
            return _root(self, pixel_values)

    where ``_root`` is the decorated function, so the decorator runs as part of the trace.
    fx alone reads the parameters of the innermost function but calls the outer one with
    them, and turns ``*args`` into one traced value that the code cannot unpack."""
    if not inspect.isfunction(forward):
        return None
    try:
        signature = inspect.signature(forward)  # follows __wrapped__ to the real parameters
    except (TypeError, ValueError):
        return None
    parameters = list(signature.parameters.values())[1:]
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    wrapped = inspect.unwrap(forward) is not forward
    if not wrapped and not any(p.kind in variadic for p in parameters):
        return None
    named = [p for p in parameters if p.kind not in variadic]
    if not named:
        return None
    namespace: dict[str, Any] = {"_root": forward}
    params: list[str] = ["self"]
    call: list[str] = ["self"]
    # A default only where every later parameter has one (the function must compile).
    defaulted = len(named)
    while defaulted > 0 and named[defaulted - 1].default is not inspect.Parameter.empty:
        defaulted -= 1
    for i, p in enumerate(named):
        text = p.name
        if i >= defaulted:
            namespace[f"_default_{p.name}"] = p.default
            text += f"=_default_{p.name}"
        params.append(text)
        call.append(f"{p.name}={p.name}" if p.kind is inspect.Parameter.KEYWORD_ONLY else p.name)
    source = f"def forward({', '.join(params)}):\n    return _root({', '.join(call)})\n"
    name = getattr(forward, "__qualname__", "forward")
    exec(compile(source, f"<fixed arity of {name}>", "exec"), namespace)
    function = namespace["forward"]
    function.__qualname__ = name
    return function


def default_concrete_args(model: nn.Module) -> dict[str, Any]:
    """The root forward's optional arguments fixed to their defaults."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in parameters[1:]
        if p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and (p.default is None or isinstance(p.default, (bool, int, float, str)))
    }


TracerFactory = Callable[
    [tuple[type, ...], tuple[Callable, ...], frozenset[str], dict[str, Any]], ModelTracer
]


def plain_tracer(
    leaf_types: tuple[type, ...],
    functions: tuple[Callable, ...],
    opaque: frozenset[str],
    concrete: dict[str, Any],
) -> ModelTracer:
    return ModelTracer(leaf_types, functions, opaque)


def trace(model: nn.Module, make_tracer: TracerFactory = plain_tracer) -> TraceResult:
    """Trace ``model`` in eval mode; node targets name the model's own submodules. A
    submodule fx cannot trace through is kept whole (:class:`OpaqueModule`)."""
    leaf_types: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    if is_timm_model(model) or isinstance(model, fx.GraphModule):
        leaf_types, functions = timm_notrace()
    concrete = default_concrete_args(model) if not isinstance(model, fx.GraphModule) else {}
    opaque: list[OpaqueModule] = []
    with tracing_guards(model):
        return _trace(model, leaf_types, functions, concrete, opaque, make_tracer)


@contextlib.contextmanager
def tracing_guards(model: nn.Module) -> Iterator[None]:
    """What tracing ``model`` needs set aside and put back: its caches, gradient
    checkpointing and hooks (below), its modules listed once for the three."""
    modules = list(model.modules())
    with caches_kept(model, modules), checkpointing_off(model, modules), hooks_off(model, modules):
        yield


HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


@contextlib.contextmanager
def hooks_off(model: nn.Module, modules: Sequence[nn.Module] | None = None) -> Iterator[None]:
    """The modules' own hooks set aside while tracing: a hook would otherwise run on proxies
    (a capture hook would keep them) and be baked into the graph. They are put back after."""
    saved = [
        (m, key, value)
        for m in _listed(model, modules)
        for key in HOOK_DICTS
        if (value := m.__dict__.get(key))
    ]
    for m, key, value in saved:
        m.__dict__[key] = type(value)()
    try:
        yield
    finally:
        for m, key, value in saved:
            m.__dict__[key] = value


CHECKPOINT_FLAGS = ("grad_checkpointing", "memory_efficient")  # timm's and torchvision's


@contextlib.contextmanager
def checkpointing_off(model: nn.Module, modules: Sequence[nn.Module] | None = None) -> Iterator[None]:
    """Gradient checkpointing switched off for the duration: the checkpointed path reads
    ``x.requires_grad`` and calls ``torch.utils.checkpoint``, which a trace cannot keep.
    The flags are restored afterwards; code that is not rewritten still checkpoints."""
    flags = [
        (m, key)
        for m in _listed(model, modules)
        for key in CHECKPOINT_FLAGS
        if isinstance(m.__dict__.get(key), bool) and m.__dict__[key]
    ]
    for m, key in flags:
        m.__dict__[key] = False
    try:
        yield
    finally:
        for m, key in flags:
            m.__dict__[key] = True


@contextlib.contextmanager
def caches_kept(model: nn.Module, modules: Sequence[nn.Module] | None = None) -> Iterator[None]:
    """Restore the model's own state after tracing or a meta pass: a cache filled while
    tracing (timm's ``attention_bias_cache``, keyed by ``str(x.device)``) would otherwise keep
    proxies of this graph and hand them to the next trace, and a forward that stores what it
    computed (Ultralytics' ``Detect`` keeps ``self.anchors`` and ``self.shape``) would keep
    proxies or meta tensors, which the model's next real call would use. On every module but
    torch.nn's own layers (whose forwards store nothing): every attribute a forward rebinds
    is put back (a private ``self._calls += 1`` too), every one it adds removed, and every
    plain dict, list and set refilled as it was (a ``self.shapes.append(...)``, a buffer
    registered in ``forward``: ``_buffers`` is a plain dict). What the graph reads stays:
    the constants fx keeps on the root as ``_tensor_constant<i>``, and submodules a forward
    creates on its first call."""
    own = [m for m in _listed(model, modules) if not type(m).__module__.startswith(_TORCH_LAYERS)]
    # Each module's whole __dict__ copied at C speed
    attributes = [(m, vars(m).copy()) for m in own]
    containers = [
        (value, kind(value))
        for _, saved in attributes
        for key, value in saved.items()
        if ((kind := type(value)) is dict or kind is list or kind is set) and key != "_modules"
    ]
    try:
        yield
    finally:
        for container, content in containers:
            if not _same_items(container, content):
                container.clear()
                if type(container) is list:
                    container.extend(content)
                else:
                    container.update(content)
        for m, saved in attributes:
            state = vars(m)
            for key in [k for k in state if k not in saved and not _FX_CONSTANT.fullmatch(k)]:
                del state[key]
            for key, value in saved.items():
                if state.get(key, _MISSING) is not value:
                    state[key] = value


@contextlib.contextmanager
def fx_constants_dropped(model: nn.Module) -> Iterator[None]:
    """The tensor constants fx keeps on the modules it traces (``_tensor_constant<i>``, read
    by the graph while a plan is made and copied with any module the rewrite changes) taken
    off ``model``'s own modules after: each call would otherwise leave more on the input model.
    Those that were there before (a GraphModule's own) stay."""
    modules = list(model.modules())
    had = [m for m in modules if _FIRST_CONSTANT in vars(m)]
    before = {id(m): set(filter(_FX_CONSTANT.fullmatch, vars(m))) for m in had}
    try:
        yield
    finally:
        for m in modules:
            state = vars(m)
            if _FIRST_CONSTANT in state:
                kept = before.get(id(m), set())
                for key in [k for k in state if _FX_CONSTANT.fullmatch(k) and k not in kept]:
                    del state[key]


FX_CONSTANT = "fx_constant"  # node.meta key: the tensor a get_attr of an fx constant reads


def keep_fx_constants(graph: fx.Graph, root: nn.Module) -> None:
    """Each ``get_attr`` of a constant fx kept on ``root`` holds its tensor in its node's meta,
    so the graph reads it after :func:`fx_constants_dropped` took it off the input model (a
    plan's multiply-add count runs the graph later)."""
    for node in graph.nodes:
        if node.op == "get_attr" and _FX_CONSTANT.fullmatch(str(node.target)):
            value = vars(root).get(str(node.target))
            if isinstance(value, torch.Tensor):
                node.meta[FX_CONSTANT] = value


def _same_items(container: Any, content: Any) -> bool:
    """Whether a dict, list or set holds the very objects it held (by identity: ``==`` on
    tensors is elementwise)."""
    if len(container) != len(content):
        return False
    if type(container) is dict:
        return all(container.get(key, _MISSING) is value for key, value in content.items())
    if type(container) is list:
        return all(a is b for a, b in zip(container, content, strict=True))
    return all(any(a is b for b in container) for a in content) if len(content) < 64 else False


def _put_back(kept: Iterable[tuple[torch.Tensor, int, torch.Tensor]]) -> None:
    """Each ``(tensor, version, value)``: the value put back into a tensor written into in
    place since (its version moved, or its values differ: a write through ``.data`` moves
    no version), through ``.data`` so that autograd's version is not moved by the undoing."""
    with torch.no_grad():
        for tensor, version, value in kept:
            same_layout = tensor.shape == value.shape and tensor.dtype == value.dtype
            if same_layout and tensor._version == version and torch.equal(tensor.data, value):
                continue
            if same_layout:
                tensor.data.copy_(value)
            else:  # resized or retyped in place: the value as it was, by its own storage
                tensor.data = value


def values_kept(tensors: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """What :func:`_put_back` needs to undo in-place writes to ``tensors``: each with its
    version and a copy. Meta tensors hold no values; inference tensors (made under
    ``torch.inference_mode``) keep no version and cannot be written outside it."""
    return [
        (t, t._version, t.detach().clone())
        for t in tensors
        if isinstance(t, torch.Tensor) and t.layout == torch.strided and not (t.is_meta or t.is_inference())
    ]


@contextlib.contextmanager
def writes_undone(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Every in-place write to ``tensors`` within undone after: a module run for real to learn
    its output's shape (its buffers are the model's own)."""
    kept = values_kept(tensors)
    try:
        yield
    finally:
        _put_back(kept)


_MISSING = object()
_FX_CONSTANT = re.compile(r"_tensor_constant\d+")  # fx's name for a tensor constant it keeps on the root
_FIRST_CONSTANT = "_tensor_constant0"  # fx numbers them from 0 on each module
_TORCH_LAYERS = "torch.nn.modules."  # torch.nn's own layer classes are defined under it


def _trace(
    model: nn.Module,
    leaf_types: tuple[type, ...],
    functions: tuple[Callable, ...],
    concrete: dict[str, Any],
    opaque: list[OpaqueModule],
    make_tracer: TracerFactory,
) -> TraceResult:
    while True:
        tracer = make_tracer(leaf_types, functions, frozenset(o.name for o in opaque), concrete)
        named = list(model.named_modules())  # as they are for this attempt
        with eval_mode(model, [m for _, m in named]), size_only_calls_recorded(model, tracer, named):
            try:
                graph = tracer.trace(model, concrete_args=concrete or None)
                keep_fx_constants(graph, model)
                thread_in_place(graph)
                keep_output_type(graph, tracer.output_type)
                return TraceResult(graph, tuple(opaque), tuple(tracer.calls), tuple(tracer.assumptions))
            except Exception as error:  # fx raises many kinds: TraceError, TypeError, RuntimeError...
                failed = tracer.failed_in
                if failed is None or len(opaque) >= MAX_OPAQUE:
                    where = (
                        "in its own forward" if failed is None else f"after {len(opaque)} opaque submodules"
                    )
                    raise TraceError(
                        f"torch.fx cannot trace {type(model).__name__} ({where}): {_reason(error)}"
                    ) from error
                opaque.append(OpaqueModule(failed[0], _reason(failed[1])))
