"""OnnxGraph (jaxvc/models/onnx_graph.py), run under jax.jit, against onnxruntime on CPU.

1. an ArcFace-like IResNet and 2. an SCRFD-like detector (dynamic H, W: Shape/Gather/Concat/Resize in the graph),
both built in torch with random weights and randomized batch-norm statistics and exported with the legacy
TorchScript exporter, as insightface's released models were; 3. single-op graphs built with onnx.helper for the ops
and attribute combinations those two don't cover; 4. load-time errors; 5. params as a jit argument.
"""
import numpy as np
import pytest

from tests.conftest import relative_error

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

import jax  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from jaxvc.models.onnx_graph import OnnxError, OnnxGraph  # noqa: E402
from jaxvc.bench.torch_face_models import IResNet, TinySCRFD, export, randomize_norms  # noqa: E402

BOUND = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")


def ort_run(path, feeds: dict) -> list:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.fixture(scope="module")
def arcface(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_norms(IResNet(), seed=1)
    path = export(model, torch.randn(1, 3, 112, 112), tmp_path_factory.mktemp("arcface") / "iresnet.onnx",
                  ["input.1"], ["embedding"], {"input.1": {0: "batch"}, "embedding": {0: "batch"}})
    return path, OnnxGraph.from_file(path)


def test_arcface_iresnet_matches_onnxruntime(arcface):
    path, graph = arcface
    assert graph.input_names == ["input.1"] and graph.input_shapes == [(None, 3, 112, 112)]
    assert graph.output_names == ["embedding"]
    types = {node.op_type for node in graph.nodes}
    assert {"Conv", "BatchNormalization", "PRelu", "Add", "Flatten", "Gemm"} <= types, types
    assert all(value.dtype == np.float32 for value in graph.params.values()) and len(graph.params) > 20
    x = np.random.default_rng(2).standard_normal((3, 3, 112, 112)).astype(np.float32)
    (ours,) = jax.jit(graph.__call__)(graph.params, x)
    (reference,) = ort_run(path, {"input.1": x})
    error = relative_error(ours, reference)
    print(f"arcface relative error {error:.2e}")
    assert ours.shape == (3, 512) and error < BOUND
    # Older exports list every initializer among the graph inputs too (keep_initializers_as_inputs): not inputs here.
    model = onnx.load(str(path))
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                             for t in model.graph.initializer)
    legacy = OnnxGraph.from_model(model, source="legacy")
    assert legacy.input_names == ["input.1"] and sorted(legacy.params) == sorted(graph.params)


def test_scrfd_detector_dynamic_shapes_match_onnxruntime(tmp_path):
    torch.manual_seed(3)
    model = randomize_norms(TinySCRFD(), seed=4)
    names = [f"{kind}_{stride}" for kind in ("score", "bbox", "kps") for stride in (8, 16, 32)]
    path = export(model, torch.randn(1, 3, 160, 224), tmp_path / "scrfd.onnx", ["input.1"], names,
                  {"input.1": {2: "height", 3: "width"}, **{name: {0: "count"} for name in names}})
    graph = OnnxGraph.from_file(path)
    types = {node.op_type for node in graph.nodes}
    assert {"Shape", "Gather", "Concat", "Resize", "Reshape", "Transpose", "AveragePool", "MaxPool"} <= types, types
    assert graph.input_shapes == [(1, 3, None, None)] and graph.output_names == names
    run = jax.jit(graph.__call__)
    rng = np.random.default_rng(5)
    for height, width in ((160, 224), (96, 96)):
        x = rng.standard_normal((1, 3, height, width)).astype(np.float32)
        ours, reference = run(graph.params, x), ort_run(path, {"input.1": x})
        errors = {name: relative_error(a, b) for name, a, b in zip(names, ours, reference)}
        print(f"scrfd {height}x{width} worst relative error {max(errors.values()):.2e}")
        assert ours[0].shape == (2 * (height // 8) * (width // 8), 1)
        assert max(errors.values()) < BOUND, errors


# ---------------------------------------------------------------------------------------------- 3. single-op graphs
_rng = np.random.default_rng(6)


def data(*shape):
    """A graph input (traced under jit)."""
    return "input", _rng.standard_normal(shape).astype(np.float32)


def weight(*shape):
    """A float initializer (a parameter)."""
    return "init", _rng.standard_normal(shape).astype(np.float32)


def const(values, dtype=np.int64):
    """An initializer holding shape-like values (static)."""
    return "init", np.array(values, dtype)


def case(op, inputs, opset=13, outputs=1, **attrs):
    return op, inputs, opset, outputs, attrs


CASES = []
CASES += [
    case("ConvTranspose", [data(1, 4, 5, 6), weight(4, 3, 3, 3), weight(6)], strides=[2, 2], pads=[1, 0, 2, 1],
         output_padding=[1, 1], group=2, dilations=[1, 2]),
    case("ConvTranspose", [data(1, 2, 5, 5), weight(2, 3, 3, 3)], strides=[2, 2], auto_pad="SAME_UPPER"),
    case("ConvTranspose", [data(1, 2, 5, 5), weight(2, 3, 3, 3)], strides=[2, 2], output_shape=[10, 10]),
    case("Conv", [data(1, 4, 9, 10), weight(6, 2, 3, 3), weight(6)], strides=[2, 2], group=2, auto_pad="SAME_LOWER"),
    case("Conv", [data(1, 4, 9, 10), weight(4, 4, 3, 3)], strides=[1, 2], dilations=[2, 3], pads=[2, 0, 1, 3]),
    case("Conv", [data(1, 3, 9, 10), weight(4, 3, 2, 3)], strides=[2, 3], auto_pad="SAME_UPPER"),
    case("Conv", [data(2, 3, 11), weight(4, 3, 3)], pads=[2, 1], strides=[2]),
    case("MaxPool", [data(1, 2, 7, 8)], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    case("MaxPool", [data(1, 1, 5, 5)], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
    case("MaxPool", [data(1, 2, 9, 9)], kernel_shape=[3, 2], strides=[2, 1], auto_pad="SAME_UPPER"),
    case("AveragePool", [data(1, 2, 7, 8)], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
         count_include_pad=0),
    case("AveragePool", [data(1, 2, 7, 8)], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
         count_include_pad=1),
    case("AveragePool", [data(1, 2, 8, 7)], kernel_shape=[2, 3], strides=[2, 2], pads=[0, 1, 1, 0],
         count_include_pad=1),
    case("GlobalAveragePool", [data(2, 3, 5, 4)]),
    case("GlobalMaxPool", [data(2, 3, 5, 4)]),
    case("InstanceNormalization", [data(2, 3, 5, 6), weight(3), weight(3)], epsilon=1e-3),
    case("BatchNormalization", [data(2, 3, 4), weight(3), weight(3), weight(3), ("init", np.ones(3, np.float32))]),
]
CASES += [
    case("Resize", [data(1, 2, 5, 7), None, None, const([1, 2, 8, 11])], mode="linear"),
    case("Resize", [data(1, 2, 10, 12), None, const([1, 1, 0.6, 0.5], np.float32)], mode="linear"),
    case("Resize", [data(1, 2, 5, 7), None, None, const([1, 2, 9, 4])], mode="linear",
         coordinate_transformation_mode="align_corners"),
    case("Resize", [data(1, 2, 5, 7), None, None, const([1, 2, 1, 14])], mode="linear",
         coordinate_transformation_mode="pytorch_half_pixel"),
    case("Resize", [data(1, 2, 4, 6), None, const([1, 1, 2, 1.5], np.float32)], mode="nearest",
         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
    case("Resize", [data(1, 2, 5, 7), None, None, const([1, 2, 3, 10])]),  # nearest, half_pixel, round_prefer_floor
    case("Resize", [data(1, 2, 5, 7), None, None, const([1, 2, 12, 5])], coordinate_transformation_mode=
         "tf_half_pixel_for_nn", nearest_mode="round_prefer_ceil"),
    case("Resize", [data(1, 2, 5, 7), None, None, const([1, 2, 8, 9])], coordinate_transformation_mode=
         "align_corners", nearest_mode="ceil"),
    case("Resize", [data(1, 2, 5, 7), const([], np.float32), const([1, 1, 2, 3], np.float32)], opset=11),
    case("Resize", [data(1, 2, 5, 7), const([1, 1, 2, 0.5], np.float32)], opset=10, mode="linear"),
    case("Upsample", [data(1, 2, 3, 4), const([1, 1, 2, 3], np.float32)], opset=9),
    case("Pad", [data(2, 5, 6), const([0, 2, 1, 0, 3, 2])], mode="edge"),
    case("Pad", [data(2, 5, 6), const([0, 2, 1, 0, 3, 2])], mode="reflect"),
    case("Pad", [data(2, 5, 6), const([1, -1, 2, 0, 2, -2]), const(1.5, np.float32)]),
    case("Pad", [data(2, 5, 6), const([1, 1, 3, 1]), None, const([2, 0])], opset=18, mode="reflect"),
    case("Pad", [data(2, 5, 6)], opset=9, pads=[0, 1, 2, 0, 0, 1], value=-2.0),
    case("Slice", [data(3, 7, 8), const([-1, 10, 1]), const([-100, 1, 3]), const([1, 2, 0]), const([-1, -2, 1])]),
    case("Slice", [data(3, 7, 8), const([5, -3]), const([1, 2**62]), const([1, -1]), const([-2, 1])]),
    case("Split", [data(3, 7), const([2, 5])], outputs=2, axis=1),
    case("Split", [data(6, 3)], opset=11, outputs=3),
    case("Split", [data(3, 7)], opset=18, outputs=3, axis=1, num_outputs=3),
    case("Gemm", [data(4, 3), weight(5, 4), weight(5)], transA=1, transB=1, alpha=0.5, beta=2.0),
    case("Gemm", [data(3, 4), weight(4, 5), weight(3, 5)]),
    case("MatMul", [data(2, 3, 4), weight(4, 5)]),
    case("Softmax", [data(2, 3, 4)], opset=11, axis=1),
    case("Softmax", [data(2, 3, 4)], axis=1),
    case("LogSoftmax", [data(2, 3, 4)]),
    case("Clip", [data(3, 4), const(-0.5, np.float32), const(0.3, np.float32)], opset=11),
    case("Clip", [data(3, 4)], opset=7, min=-0.2),
    case("Where", [("input", _rng.random((3, 1)) > 0.5), data(3, 4), data(4)]),
    case("ReduceMean", [data(2, 3, 4, 5)], axes=[1, 3], keepdims=0),
    case("ReduceSum", [data(2, 3, 4), const([-1])]),
    case("ReduceMax", [data(2, 3, 4), const([0, 2])], opset=18),
    case("ArgMax", [data(3, 4, 5)], axis=1, keepdims=0),
    case("TopK", [data(3, 6), const([3])], outputs=2, largest=0),
    case("Expand", [data(3, 1), const([2, 1, 4])]),
    case("Tile", [data(2, 3), const([2, 3])]),
    case("Gather", [data(4, 5), const([[-1, 0], [2, -2]])], axis=1),
    case("Transpose", [data(2, 3, 4)], perm=[1, 2, 0]),
    case("Flatten", [data(2, 3, 4, 5)], axis=2),
    case("Unsqueeze", [data(3, 4), const([0, -1])]),
    case("Unsqueeze", [data(3, 4)], opset=11, axes=[1]),
    case("Squeeze", [data(3, 1, 4, 1), const([-1])]),
    case("Reshape", [data(2, 3, 4), const([0, -1, 2])]),
    case("Concat", [data(2, 3), weight(2, 1)], axis=-1),
    case("HardSigmoid", [data(3, 4)], alpha=0.3),
    case("LeakyRelu", [data(3, 4)], alpha=0.2),
    case("PRelu", [data(2, 3, 4), weight(3, 1)]),
    case("Erf", [data(3, 4)]),
    case("Pow", [("input", np.abs(data(3, 4)[1])), weight(4)]),
    case("Div", [data(3, 4), ("init", np.full(4, 1.5, np.float32))]),
    case("Max", [data(3, 4), data(4), data(3, 1)]),
    case("Min", [data(3, 4), data(4)]),
    case("Sum", [data(3, 4), data(4), data(3, 1)]),
    case("Mean", [data(3, 4), data(3, 4)]),
    case("Sub", [data(3, 4), weight(3, 1)]),
    case("ReduceMin", [data(2, 3, 4)], axes=[0, 2]),
    case("ReduceProd", [data(2, 3, 4)], axes=[1], keepdims=0),
    case("ArgMax", [("input", _rng.integers(0, 3, (3, 5)).astype(np.float32))], axis=1, select_last_index=1),
    case("ArgMin", [("input", _rng.integers(0, 3, (3, 5)).astype(np.float32))], axis=0),
    case("Shape", [data(2, 3, 4, 5)], opset=15, start=1, end=-1),
    case("Size", [data(2, 3, 4)]),
    case("ConstantOfShape", [const([2, 3])], value=numpy_helper.from_array(np.array([7], np.int64))),
    case("Range", [const(2), const(11), const(3)]),
    case("Cast", [("input", 4 * data(3, 4)[1])], to=TensorProto.INT64),
    case("Dropout", [data(3, 4)], opset=12, outputs=2),
    case("Equal", [("input", _rng.integers(0, 3, (3, 4))), const([1, 0, 2, 1])]),
    case("Greater", [data(3, 4), data(4)]),
    case("Less", [data(3, 4), data(3, 1)]),
    case("Not", [("input", _rng.random((3, 4)) > 0.5)]),
    *[case(op, [("input", np.abs(data(3, 4)[1]) + 0.1)]) for op in ("Sqrt", "Log", "Reciprocal")],
    *[case(op, [data(3, 4)]) for op in ("Exp", "Abs", "Floor", "Ceil", "Neg", "Tanh", "Sigmoid", "Relu", "Identity")],
]


def single_op_model(op, inputs, opset, outputs, attrs):
    names, graph_inputs, initializers, feeds = [], [], [], {}
    for index, item in enumerate(inputs):
        if item is None:
            names.append("")
            continue
        kind, value = item
        names.append(f"x{index}")
        if kind == "input":
            elem = helper.np_dtype_to_tensor_dtype(value.dtype)
            graph_inputs.append(helper.make_tensor_value_info(f"x{index}", elem, value.shape))
            feeds[f"x{index}"] = value
        else:
            initializers.append(numpy_helper.from_array(value, f"x{index}"))
    out_names = [f"y{j}" for j in range(outputs)]
    node = helper.make_node(op, names, out_names, name=f"the_{op.lower()}", **attrs)
    graph = helper.make_graph([node], "single", graph_inputs, [helper.make_empty_tensor_value_info(n)
                                                               for n in out_names], initializer=initializers)
    return helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", opset)]), feeds


@pytest.mark.parametrize("op, inputs, opset, outputs, attrs",
                         [pytest.param(*c, id=f"{i:02d}-{c[0]}-opset{c[2]}") for i, c in enumerate(CASES)])
def test_single_op_matches_onnxruntime(tmp_path, op, inputs, opset, outputs, attrs):
    model, feeds = single_op_model(op, inputs, opset, outputs, attrs)
    path = tmp_path / "op.onnx"
    onnx.save(model, str(path))
    graph = OnnxGraph.from_file(path)
    reference = ort_run(path, feeds)
    ours = jax.jit(graph.run)(graph.params, feeds)
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference):
        assert a.shape == b.shape, (a.shape, b.shape)
        if np.issubdtype(b.dtype, np.floating):
            error = relative_error(a, b) if np.any(b) else float(np.abs(a).max())
            print(f"{op} relative error {error:.1e}")
            assert error < BOUND
        else:
            np.testing.assert_array_equal(np.asarray(a), b)


def test_float_initializers_feeding_a_shape_stay_static(tmp_path):
    """Resize sizes computed from Shape(x) times a float initializer: that initializer must stay a static constant
    (not a traced parameter), or the sizes would not be concrete under jit."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Slice", ["shape", "two", "four"], ["hw"]),
             helper.make_node("Cast", ["hw"], ["hw_float"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["hw_float", "factor"], ["scaled"]),
             helper.make_node("Cast", ["scaled"], ["hw_out"], to=TensorProto.INT64),
             helper.make_node("Concat", ["nc", "hw_out"], ["sizes"], axis=0),
             helper.make_node("Resize", ["x", "", "", "sizes"], ["resized"], mode="linear"),
             helper.make_node("Mul", ["resized", "gain"], ["y"])]
    initializers = [numpy_helper.from_array(np.array(v, dtype), name) for name, v, dtype in
                    [("two", [2], np.int64), ("four", [4], np.int64), ("nc", [1, 2], np.int64),
                     ("factor", [1.5, 2.5], np.float32), ("gain", [1.25], np.float32)]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, "h", "w"])],
                              [helper.make_empty_tensor_value_info("y")], initializer=initializers)
    path = tmp_path / "shape_chain.onnx"
    onnx.save(helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    runner = OnnxGraph.from_file(path)
    assert sorted(runner.params) == ["gain"]  # "factor" is static
    x = np.random.default_rng(7).standard_normal((1, 2, 6, 4)).astype(np.float32)
    (ours,) = jax.jit(runner.__call__)(runner.params, x)
    (reference,) = ort_run(path, {"x": x})
    assert ours.shape == (1, 2, 9, 10) and relative_error(ours, reference) < BOUND


# ------------------------------------------------------------------------------------------------------ 4. errors
def save_single_op(tmp_path, op, inputs, opset=13, outputs=1, domain="", **attrs):
    model, _ = single_op_model(op, inputs, opset, outputs, attrs)
    if domain:
        model.graph.node[0].domain = domain
        model.opset_import.append(helper.make_opsetid(domain, 1))
    path = tmp_path / f"{op}.onnx"
    onnx.save(model, str(path))
    return path


def test_unsupported_ops_and_attributes_fail_at_load(tmp_path):
    nms = [data(1, 4, 4), data(1, 1, 4), const([3]), const([0.5], np.float32)]
    path = save_single_op(tmp_path, "NonMaxSuppression", nms)
    with pytest.raises(OnnxError, match=r"node 'the_nonmaxsuppression' \(NonMaxSuppression\) is not supported") as e:
        OnnxGraph.from_file(path)
    assert str(path) in str(e.value) and "supported ops: " in str(e.value)
    path = save_single_op(tmp_path, "FaceAlign", [data(1, 3)], domain="com.example")
    with pytest.raises(OnnxError, match=r"\(com\.example::FaceAlign\) is not supported"):
        OnnxGraph.from_file(path)
    path = save_single_op(tmp_path, "Resize", [data(1, 1, 4, 4), None, const([1, 1, 2, 2], np.float32)], mode="cubic")
    with pytest.raises(OnnxError, match=r"\(Resize\): mode='cubic' is not supported"):
        OnnxGraph.from_file(path)
    path = save_single_op(tmp_path, "Conv", [data(1, 1, 4, 4), weight(1, 1, 3, 3)], made_up=3)
    with pytest.raises(OnnxError, match=r"\(Conv\): attribute\(s\) made_up not implemented"):
        OnnxGraph.from_file(path)


def test_missing_or_invalid_file(tmp_path):
    missing = tmp_path / "nowhere" / "det_10g.onnx"
    with pytest.raises(OnnxError, match=str(missing)):
        OnnxGraph.from_file(missing)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\x00 not a protobuf \x13\x37" * 10)
    with pytest.raises(OnnxError, match=str(garbage)):
        OnnxGraph.from_file(garbage)


def test_bad_inputs_and_data_dependent_shapes(tmp_path, arcface):
    _, graph = arcface
    with pytest.raises(OnnxError, match=r"input 'input.1' has shape \(1, 3, 64, 64\).*\('\?', 3, 112, 112\)"):
        graph(graph.params, np.zeros((1, 3, 64, 64), np.float32))
    path = save_single_op(tmp_path, "Reshape", [data(2, 6), ("input", np.array([3, 4], np.int64))])
    runner = OnnxGraph.from_file(path)
    x, target = np.ones((2, 6), np.float32), np.array([3, 4], np.int64)
    assert runner(runner.params, x, target)[0].shape == (3, 4)  # eager: the target is concrete
    with pytest.raises(OnnxError, match=r"\(Reshape\): input 1 .* is shape-like .* depends on the graph's input"):
        jax.jit(runner.__call__)(runner.params, x, target)


# ------------------------------------------------------------------------------------------- 5. params under jit
def test_params_are_a_jit_argument(arcface):
    _, graph = arcface
    traces = []

    def forward(params, x):
        traces.append(1)
        return graph(params, x)[0]

    run = jax.jit(forward)
    x = np.random.default_rng(8).standard_normal((2, 3, 112, 112)).astype(np.float32)
    eager, jitted = graph(graph.params, x)[0], run(graph.params, x)
    error = relative_error(jitted, eager)
    print(f"jit vs eager relative error {error:.1e}")
    assert error < 1e-6
    changed = jax.tree.map(lambda p: p * 1.05, graph.params)  # new values, same pytree: no retrace
    moved = run(changed, x)
    assert len(traces) == 1  # traced once for both calls
    assert relative_error(moved, eager) > 1e-3 and relative_error(moved, graph(changed, x)[0]) < 1e-6
