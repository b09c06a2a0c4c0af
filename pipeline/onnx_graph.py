"""The network as an ONNX graph: built from its weights, and checked against its architecture.

Training writes ``model.onnx`` beside ``model.keras`` (`pipeline.artifact`): the same
network `pipeline.model.build_model` makes, written node by node with ``onnx.helper``
(Gemm, the activation, ..., Gemm, Softmax; dropout is the identity at inference). Scoring
evaluates it with ONNX Runtime, so neither its driver nor its executors import TensorFlow.

A graph is accepted only if it is exactly the graph this module builds for the
architecture recorded in ``metadata.json``: `check_graph` reads the weights out of the
received graph, builds the expected graph from them and compares the two. Any other
operator, input, attribute, shape, opset or external data is refused, unread.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from pipeline.config import TrainSettings
from pipeline.contract import FEATURE_DIM, FEATURES, NUM_CLASSES, PROBABILITIES
from pipeline.errors import ModelError

OPSET = 20  # the first with Gelu
IR_VERSION = 9  # the IR of opset 20
PRODUCER = "digits-pipeline"
ROWS = "rows"  # the symbolic batch dimension

# Keras activation -> ONNX nodes applied to one tensor: (op, attributes) in order. `swish`
# is x * sigmoid(x); Keras's `selu` constants are ONNX's defaults; "linear" adds nothing.
_ACTIVATIONS: dict[str, list[tuple[str, dict]]] = {
    "relu": [("Relu", {})],
    "tanh": [("Tanh", {})],
    "sigmoid": [("Sigmoid", {})],
    "elu": [("Elu", {"alpha": 1.0})],
    "selu": [("Selu", {})],
    "gelu": [("Gelu", {"approximate": "none"})],
    "swish": [("Sigmoid", {}), ("Mul", {})],
    "softplus": [("Softplus", {})],
    "linear": [],
}


def weight_shapes(settings: TrainSettings) -> list[tuple[int, ...]]:
    """Kernel and bias shapes of each Dense layer, in order, as Keras stores them."""
    sizes = [FEATURE_DIM, *settings.hidden_units, NUM_CLASSES]
    shapes: list[tuple[int, ...]] = []
    for fan_in, units in itertools.pairwise(sizes):
        shapes += [(fan_in, units), (units,)]
    return shapes


def weight_names(settings: TrainSettings) -> list[str]:
    """The initializer names of the weights, in the order of `weight_shapes`."""
    layers = [f"hidden_{i}" for i in range(len(settings.hidden_units))] + ["probabilities"]
    return [f"{layer}/{part}" for layer in layers for part in ("kernel", "bias")]


def build_graph(settings: TrainSettings, weights: Sequence[np.ndarray]) -> bytes:
    """The serialised ONNX model of the network of `settings` with `weights`.

    `weights` are the Dense layers' kernels and biases in order (Keras's `get_weights`
    of `build_model`'s model). Input ``features`` float32 (rows, 784); output
    ``probabilities`` float32 (rows, 10).
    """
    from onnx import TensorProto, helper

    return _model(settings, weights, helper, TensorProto).SerializeToString()


def _model(settings: TrainSettings, weights: Sequence[np.ndarray], helper, tensor_proto):
    shapes = weight_shapes(settings)
    names = weight_names(settings)
    if len(weights) != len(shapes):
        raise ModelError(
            f"the network of these settings has {len(shapes)} weight arrays, got {len(weights)}"
        )
    initializers = []
    for name, shape, array in zip(names, shapes, weights, strict=True):
        array = np.asarray(array)
        if tuple(array.shape) != shape:
            raise ModelError(f"weights {name} have shape {array.shape}, expected {shape}")
        initializers.append(
            helper.make_tensor(
                name,
                tensor_proto.FLOAT,
                shape,
                np.ascontiguousarray(array, dtype="<f4").tobytes(),
                raw=True,
            )
        )
    nodes = []
    x = FEATURES
    activations = [*settings.activations(), "softmax"]
    for layer, activation in enumerate(activations):
        kernel, bias = names[2 * layer], names[2 * layer + 1]
        prefix = kernel.rsplit("/", 1)[0]
        dense = f"{prefix}/dense"
        nodes.append(helper.make_node("Gemm", [x, kernel, bias], [dense], name=dense))
        x = dense
        if activation == "softmax":
            nodes.append(
                helper.make_node("Softmax", [x], [PROBABILITIES], name=PROBABILITIES, axis=-1)
            )
            continue
        for step, (op, attributes) in enumerate(_ACTIVATIONS[activation]):
            out = f"{prefix}/{activation}_{step}"
            inputs = [dense, x] if op == "Mul" else [x]  # swish: dense * sigmoid(dense)
            nodes.append(helper.make_node(op, inputs, [out], name=out, **attributes))
            x = out
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info(FEATURES, tensor_proto.FLOAT, [ROWS, FEATURE_DIM])],
        [helper.make_tensor_value_info(PROBABILITIES, tensor_proto.FLOAT, [ROWS, NUM_CLASSES])],
        initializer=initializers,
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name=PRODUCER,
    )


def check_graph(settings: TrainSettings, onnx_bytes: bytes, where: str) -> None:
    """Refuse an ONNX model that is not the graph `build_graph` makes for `settings`.

    Only the protobuf is parsed; nothing in it is run. The weights are read out of the
    received graph (float32 raw data of the expected shapes only), the expected graph is
    built from them, and the two must be identical but for the producer's fields.
    """
    import onnx
    from onnx import TensorProto, helper

    try:
        received = onnx.load_model_from_string(onnx_bytes)
    except Exception as exc:  # protobuf's DecodeError, whose module path varies by version
        raise ModelError(f"{where} is not a valid ONNX model: {exc}") from None
    by_name = {t.name: t for t in received.graph.initializer}
    weights = []
    for name, shape in zip(weight_names(settings), weight_shapes(settings), strict=True):
        tensor = by_name.get(name)
        expected_bytes = 4 * int(np.prod(shape))
        if (
            tensor is None
            or tensor.data_type != TensorProto.FLOAT
            or tuple(tensor.dims) != shape
            or tensor.data_location != TensorProto.DEFAULT
            or len(tensor.raw_data) != expected_bytes
        ):
            raise ModelError(
                f"{where} does not hold weights {name} of shape {shape} as this pipeline "
                f"writes them: it was not built for the architecture in metadata.json; "
                f"refusing it"
            )
        weights.append(np.frombuffer(tensor.raw_data, dtype="<f4").reshape(shape))
    expected = _model(settings, weights, helper, TensorProto)
    for field in ("producer_name", "producer_version", "model_version", "doc_string"):
        expected.ClearField(field)
        if received.HasField(field):
            setattr(expected, field, getattr(received, field))
    if expected.SerializeToString(deterministic=True) != received.SerializeToString(
        deterministic=True
    ):
        ops = sorted({n.op_type for n in received.graph.node})
        raise ModelError(
            f"{where} is not the graph this pipeline builds for the architecture in "
            f"metadata.json (hidden_units {settings.hidden_units}, activations "
            f"{settings.activations()}; the file has operators {ops}): refusing it"
        )


def session(onnx_bytes: bytes, threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """A function from (n, 784) float32 features to (n, 10) probabilities, run by ONNX
    Runtime on the CPU with `threads` threads (a Spark task's ``spark.task.cpus``).

    Call it only with bytes that passed `check_graph` or their recorded checksum.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only
    runner = onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])

    def predict(x: np.ndarray) -> np.ndarray:
        return runner.run([PROBABILITIES], {FEATURES: x})[0]

    return predict
