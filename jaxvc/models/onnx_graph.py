"""Run an ONNX model file as a pure, jittable JAX function.

    graph = OnnxGraph.from_file("w600k_r50.onnx")
    (embedding,) = jax.jit(graph.__call__)(graph.params, faces)  # faces (N, 3, 112, 112) float32

Why: jaxvc's face-similarity metric runs insightface's released face models (the SCRFD detector ``det_10g.onnx``,
ArcFace ``w600k_r50.onnx`` / ``glintr100.onnx``), which exist only as ONNX files. Executing the graph with jax.numpy /
jax.lax (``onnx_ops``) lets them run on TPU/GPU inside jitted evaluation code; onnxruntime is only the tests'
reference. The ONNX layout (NCHW) is kept.

How: nodes run in topological order. A value is either a static numpy array or a jax array: initializers that are
not parameters, Constant nodes, and every node whose inputs are all static (``Shape`` of a traced tensor is static,
since shapes are concrete under jit; Gather / Unsqueeze / Concat / Cast on those too) are computed with numpy while
tracing, so Reshape targets, Resize sizes and Slice bounds stay concrete. ``params`` are the float initializers that
feed data inputs (weights, biases, batch-norm statistics, PReLU slopes, Add/Mul constants): they are a pytree argument,
not constants baked into the compiled program. Float initializers that flow, through any chain of nodes, into a
shape-like input (Reshape's shape, Resize's scales, ...) and all integer initializers stay static.

Every node is checked when the model loads, not on the first call: an op outside ``OPS``, an attribute the op's
implementation does not know, or an attribute value it does not implement (Resize mode "cubic", say) raises
``OnnxError`` naming the file, the node and the op. Opsets 7..21 of the default domain are implemented.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxvc.models import onnx_ops as ops
from jaxvc.models.onnx_ops import ONNX_DTYPES, Node, OnnxError, is_static

__all__ = ["OPS", "OnnxError", "OnnxGraph", "OpSpec"]

MIN_OPSET, MAX_OPSET = 7, 21


# ------------------------------------------------------------------------------------------------------- op table
@dataclasses.dataclass(frozen=True)
class OpSpec:
    """How to run one op type: the function, the attributes it implements (any other is refused at load time, since
    ignoring it could change the result), the input positions that must be static (they decide output shapes) and a
    load-time check of attribute values."""

    fn: Callable[..., Any]
    attrs: frozenset[str] = frozenset()
    static_inputs: tuple[int, ...] = ()
    check: Callable[[Node], str | None] | None = None  # an error message for unsupported attribute values


def _one_of(key: str, default: str, allowed: tuple[str, ...]):
    def check(node: Node) -> str | None:
        value = node.attr(key, default)
        if value not in allowed:
            return f"{key}={value!r} is not supported (supported: {', '.join(allowed)})"
        return None
    return check


def _checks(*checks):
    def check(node: Node) -> str | None:
        return next((message for c in checks if (message := c(node))), None)
    return check


def _check_resize(node: Node) -> str | None:
    if node.attr("antialias", 0):
        return "antialias=1 is not supported"
    if node.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        return f"keep_aspect_ratio_policy={node.attr('keep_aspect_ratio_policy')!r} is not supported (only stretch)"
    return _checks(_one_of("mode", "nearest", ("nearest", "linear")),
                   _one_of("coordinate_transformation_mode", "half_pixel", ops.COORDINATE_MODES),
                   _one_of("nearest_mode", "round_prefer_floor", ops.NEAREST_MODES))(node)


def _check_batch_norm(node: Node) -> str | None:
    if node.attr("training_mode", 0) or node.attr("spatial", 1) != 1 or any(node.outputs[1:]):
        return "only inference batch normalization (spatial=1, one output, training_mode=0) is supported"
    return None


def _check_cast(node: Node) -> str | None:
    return None if node.attr("to") in ONNX_DTYPES else f"Cast to ONNX data type {node.attr('to')} is not supported"


def _check_constant(node: Node) -> str | None:
    keys = {"value", "value_float", "value_floats", "value_int", "value_ints"} & set(node.attrs)
    return None if len(keys) == 1 else "a Constant needs exactly one of value, value_float(s), value_int(s)"


def _check_max_pool(node: Node) -> str | None:
    if any(node.outputs[1:]):
        return "MaxPool's Indices output is not supported"
    return _one_of("auto_pad", "NOTSET", ops.AUTO_PADS)(node)


def _spec(fn, attrs="", static=(), check=None) -> OpSpec:
    return OpSpec(fn, frozenset(attrs.split()), tuple(static), check)


_CONV = "auto_pad dilations group kernel_shape pads strides"
_POOL = "auto_pad ceil_mode dilations kernel_shape pads strides"
_REDUCE = "axes keepdims noop_with_empty_axes"
_pad_check = _one_of("auto_pad", "NOTSET", ops.AUTO_PADS)

OPS: dict[str, OpSpec] = {
    "Conv": _spec(ops.conv, _CONV, check=_pad_check),
    "ConvTranspose": _spec(ops.conv_transpose, _CONV + " output_padding output_shape", check=_pad_check),
    "MaxPool": _spec(ops.max_pool, _POOL + " storage_order", check=_check_max_pool),
    "AveragePool": _spec(ops.average_pool, _POOL + " count_include_pad", check=_pad_check),
    "GlobalAveragePool": _spec(ops.global_pool("mean")),
    "GlobalMaxPool": _spec(ops.global_pool("max")),
    "BatchNormalization": _spec(ops.batch_norm, "epsilon momentum spatial training_mode", check=_check_batch_norm),
    "InstanceNormalization": _spec(ops.instance_norm, "epsilon"),
    "Relu": _spec(ops.relu),
    "PRelu": _spec(ops.prelu),
    "LeakyRelu": _spec(ops.leaky_relu, "alpha"),
    "Sigmoid": _spec(ops.jax_unary(jax.nn.sigmoid)),
    "Tanh": _spec(ops.unary("tanh")),
    "HardSigmoid": _spec(ops.hard_sigmoid, "alpha beta"),
    "Erf": _spec(ops.jax_unary(jax.lax.erf)),
    "Clip": _spec(ops.clip, "min max"),
    "Softmax": _spec(ops.softmax(log=False), "axis"),
    "LogSoftmax": _spec(ops.softmax(log=True), "axis"),
    "Add": _spec(ops.variadic("add")),
    "Sub": _spec(ops.variadic("subtract")),
    "Mul": _spec(ops.variadic("multiply")),
    "Div": _spec(ops.divide),
    "Pow": _spec(ops.power),
    "Max": _spec(ops.variadic("maximum")),
    "Min": _spec(ops.variadic("minimum")),
    "Sum": _spec(ops.variadic("add")),
    "Mean": _spec(ops.mean),
    "Equal": _spec(ops.variadic("equal")),
    "Greater": _spec(ops.variadic("greater")),
    "GreaterOrEqual": _spec(ops.variadic("greater_equal")),
    "Less": _spec(ops.variadic("less")),
    "LessOrEqual": _spec(ops.variadic("less_equal")),
    "And": _spec(ops.variadic("logical_and")),
    "Or": _spec(ops.variadic("logical_or")),
    "Not": _spec(ops.unary("logical_not")),
    "Where": _spec(ops.where),
    **{name: _spec(ops.unary(name.lower())) for name in ("Sqrt", "Exp", "Log", "Abs", "Floor", "Ceil", "Reciprocal")},
    "Neg": _spec(ops.unary("negative")),
    "Flatten": _spec(ops.flatten, "axis"),
    "Gemm": _spec(ops.gemm, "alpha beta transA transB"),
    "MatMul": _spec(ops.matmul),
    "Reshape": _spec(ops.reshape, "allowzero", static=(1,)),
    "Transpose": _spec(ops.transpose, "perm"),
    "Concat": _spec(ops.concat, "axis"),
    "Split": _spec(ops.split, "axis split num_outputs", static=(1,)),
    "Slice": _spec(ops.slice_, "starts ends axes", static=(1, 2, 3, 4)),
    "Squeeze": _spec(ops.squeeze, "axes", static=(1,)),
    "Unsqueeze": _spec(ops.unsqueeze, "axes", static=(1,)),
    "Shape": _spec(ops.shape, "start end"),
    "Size": _spec(ops.size),
    "Gather": _spec(ops.gather, "axis"),
    "Constant": _spec(ops.constant, "value value_float value_floats value_int value_ints", check=_check_constant),
    "ConstantOfShape": _spec(ops.constant_of_shape, "value", static=(0,)),
    "Identity": _spec(ops.identity),
    "Dropout": _spec(ops.dropout, "ratio seed", static=(1, 2)),
    "Cast": _spec(ops.cast, "to saturate", check=_check_cast),
    "Expand": _spec(ops.expand, static=(1,)),
    "Tile": _spec(ops.tile, static=(1,)),
    "Range": _spec(ops.range_, static=(0, 1, 2)),
    "Resize": _spec(ops.resize, "mode coordinate_transformation_mode nearest_mode cubic_coeff_a exclude_outside "
                    "extrapolation_value antialias axes keep_aspect_ratio_policy", static=(1, 2, 3),
                    check=_check_resize),
    "Upsample": _spec(ops.upsample, "mode scales", static=(1,),
                      check=_one_of("mode", "nearest", ("nearest", "linear", "bilinear"))),
    "Pad": _spec(ops.pad, "mode pads value", static=(1, 3),
                 check=_one_of("mode", "constant", ("constant", "edge", "reflect"))),
    "ReduceMean": _spec(ops.reduce("mean"), _REDUCE, static=(1,)),
    "ReduceSum": _spec(ops.reduce("sum"), _REDUCE, static=(1,)),
    "ReduceMax": _spec(ops.reduce("max"), _REDUCE, static=(1,)),
    "ReduceMin": _spec(ops.reduce("min"), _REDUCE, static=(1,)),
    "ReduceProd": _spec(ops.reduce("prod"), _REDUCE, static=(1,)),
    "ArgMax": _spec(ops.arg_reduce("argmax"), "axis keepdims select_last_index"),
    "ArgMin": _spec(ops.arg_reduce("argmin"), "axis keepdims select_last_index"),
    "TopK": _spec(ops.top_k, "axis largest sorted", static=(1,)),
}


# ------------------------------------------------------------------------------------------------------------ loading
def _attribute_value(attribute, where: str):
    """An AttributeProto as a Python value: strings decoded, tensors as numpy arrays."""
    from onnx import AttributeProto, helper, numpy_helper

    if attribute.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS, AttributeProto.SPARSE_TENSOR,
                          AttributeProto.SPARSE_TENSORS, AttributeProto.TYPE_PROTO, AttributeProto.TYPE_PROTOS):
        raise OnnxError(f"{where}: attribute {attribute.name!r} is a subgraph, sparse tensor or type, not supported")
    value = helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode()
    if attribute.type == AttributeProto.TENSOR:
        return numpy_helper.to_array(value)
    if attribute.type in (AttributeProto.FLOATS, AttributeProto.INTS, AttributeProto.STRINGS, AttributeProto.TENSORS):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value


def _tensor_shape(value_info) -> tuple[int | None, ...] | None:
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)


def _sorted_nodes(nodes: list[Node], defined: set[str], source: str) -> list[Node]:
    """The nodes in an order where every input is defined before use. ONNX files are sorted already (one pass, order
    kept); this also tolerates files that are not, and names the first value nothing defines."""
    defined, ordered, pending = set(defined) | {""}, [], list(nodes)
    while pending:
        waiting = []
        for node in pending:
            if all(name in defined for name in node.inputs):
                ordered.append(node)
                defined.update(node.outputs)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            node = waiting[0]
            missing = next(name for name in node.inputs if name not in defined)
            raise OnnxError(f"{source}: node {node.name!r} ({node.op_type}) reads {missing!r}, which no graph input, "
                            "initializer or node defines (or the graph has a cycle)")
        pending = waiting
    return ordered


def _static_values(nodes: list[Node]) -> set[str]:
    """Names of the values that must be static: the shape-like inputs of every node, and, backwards, everything they
    are computed from (except through Shape / Size, which only read their input's static shape). One reverse pass
    suffices: a node's consumers all come after it."""
    needed: set[str] = set()
    for node in reversed(nodes):
        if node.op_type not in ("Shape", "Size") and any(o in needed for o in node.outputs):
            needed.update(node.inputs)
        spec = OPS[node.op_type]
        needed.update(node.inputs[i] for i in spec.static_inputs if i < len(node.inputs))
    needed.discard("")
    return needed


class OnnxGraph:
    """An ONNX graph as a pure function ``graph(params, *inputs) -> tuple of outputs`` (see the module docstring).

    Attributes: ``params`` (name -> float32 numpy array; pass it, or any pytree of arrays with the same keys, as the
    first argument), ``input_names``, ``input_shapes`` (None for symbolic dimensions), ``output_names``, ``nodes``,
    ``opset`` and ``source`` (the file, for messages).
    """

    def __init__(self, nodes: list[Node], params: dict[str, np.ndarray], constants: dict[str, np.ndarray],
                 inputs: list[tuple[str, tuple | None, Any]], output_names: list[str], opset: int, source: str):
        self.nodes = tuple(nodes)
        self.params = params
        self._constants = constants
        self.input_names = [name for name, _, _ in inputs]
        self.input_shapes = [shape for _, shape, _ in inputs]
        self._input_dtypes = [dtype for _, _, dtype in inputs]
        self.output_names = list(output_names)
        self.opset = opset
        self.source = source
        # Values no later node reads are dropped while running (eager calls keep less memory alive).
        last_use: dict[str, int] = {}
        for index, node in enumerate(self.nodes):
            for name in node.inputs:
                last_use[name] = index
        keep = set(self.output_names)
        self._release = [[n for n in dict.fromkeys(node.inputs) if n and last_use[n] == index and n not in keep]
                         for index, node in enumerate(self.nodes)]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "OnnxGraph":
        """Read an ``.onnx`` file (external data files next to it are read too)."""
        path = os.fspath(path)
        try:
            import onnx
        except ImportError as error:
            raise OnnxError(f"{path}: reading ONNX files needs the onnx package (pip install onnx)") from error
        if not os.path.isfile(path):
            raise OnnxError(f"{path}: no such ONNX model file")
        try:
            model = onnx.load(path)
        except Exception as error:  # protobuf decode errors, missing external data, ...
            raise OnnxError(f"{path}: not a readable ONNX model ({type(error).__name__}: {error})") from error
        return cls.from_model(model, source=path)

    @classmethod
    def from_model(cls, model, source: str = "<onnx model>") -> "OnnxGraph":
        """From an in-memory ``onnx.ModelProto``; ``source`` names it in error messages."""
        from onnx import numpy_helper

        graph = model.graph
        opsets = {o.domain: o.version for o in model.opset_import}
        opset = opsets.get("", opsets.get("ai.onnx"))
        if opset is None or not graph.output:
            raise OnnxError(f"{source}: not an ONNX model (no default-domain opset import or no graph outputs)")
        if not MIN_OPSET <= opset <= MAX_OPSET:
            raise OnnxError(f"{source}: opset {opset} is outside the opsets this runner implements "
                            f"({MIN_OPSET}..{MAX_OPSET})")
        if graph.sparse_initializer:
            raise OnnxError(f"{source}: sparse initializers are not supported")
        initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        inputs = [(i.name, _tensor_shape(i), ONNX_DTYPES.get(i.type.tensor_type.elem_type))
                  for i in graph.input if i.name not in initializers]
        nodes = [cls._node(proto, index, opset, source) for index, proto in enumerate(graph.node)]
        nodes = _sorted_nodes(nodes, {name for name, _, _ in inputs} | set(initializers), source)
        static = _static_values(nodes)
        consumed = {name for node in nodes for name in node.inputs}
        params = {name: value for name, value in initializers.items()
                  if value.dtype.kind == "f" and name not in static and name in consumed}
        constants = {name: value for name, value in initializers.items() if name not in params}
        return cls(nodes, params, constants, inputs, [o.name for o in graph.output], opset, source)

    @staticmethod
    def _node(proto, index: int, opset: int, source: str) -> Node:
        name = proto.name or f"#{index}"
        spec = OPS.get(proto.op_type) if proto.domain in ("", "ai.onnx") else None
        op = proto.op_type if proto.domain in ("", "ai.onnx") else f"{proto.domain}::{proto.op_type}"
        where = f"{source}: node {name!r} ({op})"
        if spec is None:
            raise OnnxError(f"{where} is not supported by jaxvc's ONNX runner; supported ops: {', '.join(sorted(OPS))}")
        attrs = {a.name: _attribute_value(a, where) for a in proto.attribute}
        unknown = sorted(set(attrs) - spec.attrs)
        if unknown:
            raise OnnxError(f"{where}: attribute(s) {', '.join(unknown)} not implemented (implemented: "
                            f"{', '.join(sorted(spec.attrs)) or 'none'})")
        node = Node(name, proto.op_type, tuple(proto.input), tuple(proto.output), attrs, opset)
        message = spec.check(node) if spec.check is not None else None
        if message:
            raise OnnxError(f"{where}: {message}")
        return node

    # -------------------------------------------------------------------------------------------------------- running
    def __call__(self, params: Mapping[str, Any], *inputs) -> tuple:
        """The graph's outputs (a tuple, in ``output_names`` order) for positional inputs (``input_names`` order)."""
        if len(inputs) != len(self.input_names):
            raise OnnxError(f"{self.source}: expected {len(self.input_names)} input(s) {self.input_names}, "
                            f"got {len(inputs)}")
        return self.run(params, dict(zip(self.input_names, inputs)))

    def run(self, params: Mapping[str, Any], inputs: Mapping[str, Any]) -> tuple:
        """Like ``__call__``, the inputs given by name (ONNX names such as ``input.1`` are not Python identifiers)."""
        missing = [name for name in self.params if name not in params]
        if missing:
            raise OnnxError(f"{self.source}: params lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
        unknown = sorted(set(inputs) - set(self.input_names))
        if unknown or len(inputs) != len(self.input_names):
            raise OnnxError(f"{self.source}: inputs {sorted(inputs)} do not match the graph's {self.input_names}")
        env: dict[str, Any] = dict(self._constants)
        env.update({name: jnp.asarray(params[name]) for name in self.params})
        for name, shape, dtype in zip(self.input_names, self.input_shapes, self._input_dtypes):
            env[name] = self._checked_input(name, shape, dtype, inputs[name])
        for node, release in zip(self.nodes, self._release):
            self._run_node(node, env)
            for name in release:
                del env[name]
        return tuple(jnp.asarray(env[name]) for name in self.output_names)

    def _checked_input(self, name: str, shape, dtype, value):
        value = jnp.asarray(value, None if dtype is None else jax.dtypes.canonicalize_dtype(dtype))
        if shape is not None and (value.ndim != len(shape) or
                                  any(d is not None and d != v for d, v in zip(shape, value.shape))):
            expected = tuple("?" if d is None else d for d in shape)
            raise OnnxError(f"{self.source}: input {name!r} has shape {value.shape}, the graph expects {expected}")
        return value

    def _run_node(self, node: Node, env: dict[str, Any]) -> None:
        spec = OPS[node.op_type]
        args = [env[name] if name else None for name in node.inputs]
        while args and args[-1] is None:
            args.pop()
        for index in spec.static_inputs:
            if index < len(args) and args[index] is not None:
                args[index] = self._static(node, index, args[index])
        xp = np if all(is_static(a) for a in args if a is not None) else jnp
        try:
            result = spec.fn(node, xp, *args)
        except Exception as error:
            shapes = [None if a is None else tuple(np.shape(a)) for a in args]
            raise OnnxError(f"{self.source}: node {node.name!r} ({node.op_type}) failed on inputs of shapes {shapes}: "
                            f"{type(error).__name__}: {error}") from error
        results = result if isinstance(result, tuple) else (result,)
        wanted = [(name, i) for i, name in enumerate(node.outputs) if name]
        if any(i >= len(results) for _, i in wanted):
            raise OnnxError(f"{self.source}: node {node.name!r} ({node.op_type}): output(s) beyond the "
                            f"{len(results)} this runner computes were requested")
        for name, i in wanted:
            value = results[i]
            env[name] = np.asarray(value) if isinstance(value, np.generic) else value

    def _static(self, node: Node, index: int, value) -> np.ndarray:
        """A shape-like input as numpy: it decides output shapes, so it must be known while tracing."""
        if is_static(value):
            return np.asarray(value)
        try:
            return np.asarray(value)  # a concrete jax array (eager call)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as error:
            raise OnnxError(f"{self.source}: node {node.name!r} ({node.op_type}): input {index} "
                            f"({node.inputs[index]!r}) is shape-like (a shape, axes, sizes or scales) but depends on "
                            "the graph's input values, which jax.jit cannot trace") from error
