"""The ONNX reader: PyTorch exports run by the NumPy engines exactly as PyTorch and onnxruntime run them.

The fixtures in tests/fixtures/onnx/ are real PyTorch exports (export_pytorch.py
made them, with PyTorch's outputs in the .npz beside each). Small graphs built
here with onnx.helper cover what the fixtures do not: a time-major input, the
activations, and every refusal.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sigclassd.artifact import read_artifact
from sigclassd.cli import main
from sigclassd.engine.activations import softmax
from sigclassd.engine.kernels import forward
from sigclassd.engine.onnx_reader import read_onnx, read_onnx_model
from sigclassd.engine.plan import step_plan, window_plan
from sigclassd.engine.stateful import StatefulEngine
from sigclassd.engine.windowed import WindowedEngine
from sigclassd.errors import EXIT_OK, ModelError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "onnx"
TOLERANCE = 1e-5
STREAMABLE = ("conv_lstm", "conv_gru_logits", "conv_lstm_dynamo")
ALL = (*STREAMABLE, "conv_bilstm")
LOGITS = ("conv_gru_logits",)


def to_btc(x: np.ndarray, axes: str) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, [axes.index(a) for a in "BTC"]))


def from_btc(x: np.ndarray, axes: str) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, ["BTC".index(a) for a in axes]))


def onnxruntime_probabilities(path: Path, x_btc: np.ndarray, logits: bool = False) -> np.ndarray:
    """onnxruntime over a [batch, time, channels] input, as [batch, time, units] (softmax of logits)."""
    model = read_onnx_model(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = session.run([model.output_name], {model.input_name: from_btc(x_btc, model.input_axes)})[0]
    y = np.transpose(y, [model.output_axes.index(a) for a in "BTU"])
    return softmax(y) if logits else y


@pytest.mark.parametrize("name", ALL)
def test_fixture_windowed_matches_pytorch_and_onnxruntime(name: str) -> None:
    """The window plan of each export gives PyTorch's committed outputs, and onnxruntime's on a longer input."""
    path = FIXTURES / f"{name}.onnx"
    model = read_onnx_model(path)
    ref = np.load(FIXTURES / f"{name}.npz")
    x = to_btc(ref["x"], model.input_axes)
    want = softmax(ref["y"]) if name in LOGITS else ref["y"]
    plan = window_plan(model.chain)
    assert np.abs(forward(plan, x) - want).max() <= TOLERANCE
    other = np.random.default_rng(7).normal(0, 2, (3, 301, x.shape[-1])).astype(np.float32)
    assert np.abs(forward(plan, other) - onnxruntime_probabilities(path, other, name in LOGITS)).max() <= TOLERANCE


def test_fixtures_read_as_the_layers_pytorch_built() -> None:
    """Layer kinds in order, the input layouts, the causal paddings and the folded batch norm."""
    kinds = {name: [layer.kind for layer in read_onnx(FIXTURES / f"{name}.onnx").layers] for name in ALL}
    assert kinds == {
        "conv_lstm": ["Conv1D", "Activation", "LSTM", "Dense", "Activation"],
        "conv_gru_logits": ["Conv1D", "Activation", "GRU", "GRU", "Dense"],
        "conv_lstm_dynamo": ["Conv1D", "LeakyReLU", "LSTM", "LSTM", "Dense", "Activation"],
        "conv_bilstm": ["Conv1D", "Activation", "Bidirectional", "Dense", "Activation"],
    }
    gru = read_onnx(FIXTURES / "conv_gru_logits.onnx")
    assert gru.layers[0].config["padding"] == "causal" and gru.layers[0].config["dilation_rate"] == [2]  # F.pad
    assert gru.layers[1].config["activation"] == "gelu"  # Div/Erf/Add/Mul/Mul recognised as one GELU
    assert gru.layers[2].config["reset_after"] is True and gru.layers[2].weights[2].shape == (2, 36)
    assert gru.input_shape == (None, None, 3)
    dyn = read_onnx_model(FIXTURES / "conv_lstm_dynamo.onnx")
    assert (dyn.input_axes, dyn.output_axes) == ("BCT", "BTU")
    assert dyn.chain.layers[0].config["padding"] == "causal"  # padding=2 both sides, the last 2 sliced off
    assert dyn.chain.layers[1].config["negative_slope"] == pytest.approx(0.1)


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each fixture made a model directory by `sigclassd import`, with a normalisation to undo."""
    out = {}
    for name in ALL:
        target = tmp_path_factory.mktemp("models") / name
        channels = read_onnx(FIXTURES / f"{name}.onnx").input_shape[-1]
        mean = ",".join(str(0.5 * (i + 1)) for i in range(channels))
        std = ",".join(str(1.5 + i) for i in range(channels))
        code = main(["import", str(FIXTURES / f"{name}.onnx"), "--out", str(target), "--norm-mean", mean,
                     "--norm-std", std])
        assert code == EXIT_OK
        out[name] = target
    return out


def raw_input(meta, btc: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """The raw samples whose normalisation is ``btc``."""
    return (btc * np.asarray(meta.norm_std, np.float32) + np.asarray(meta.norm_mean, np.float32)).astype(np.float32)


@pytest.mark.parametrize("name", ALL)
def test_windowed_engine_matches_pytorch(name: str, imported: dict[str, Path]) -> None:
    artifact = read_artifact(imported[name])
    ref = np.load(FIXTURES / f"{name}.npz")
    x = to_btc(ref["x"], read_onnx_model(artifact.model_path).input_axes)
    engine = WindowedEngine.load(artifact)
    assert engine.window > 0
    want = softmax(ref["y"]) if name in LOGITS else ref["y"]
    want = np.concatenate([1 - want, want], axis=-1) if want.shape[-1] == 1 else want
    # A window as long as the reference input: the engine takes any length the model does.
    got, _ = engine.run(raw_input(artifact.meta, x), np.full(len(x), x.shape[1]), np.zeros((len(x), 0), np.float32))
    assert np.abs(got - want).max() <= TOLERANCE


def streamed(engine: StatefulEngine, raw: np.ndarray, chunks: tuple[int, ...]) -> np.ndarray:
    """Rows fed in chunks of these sizes (repeated) with the state carried, then flushed: one label per sample."""
    state = np.stack([engine.initial_state()] * len(raw))
    outs = []
    start = i = 0
    while start < raw.shape[1]:
        size = min(chunks[i % len(chunks)], raw.shape[1] - start)
        y, state = engine.run(raw[:, start : start + size], np.full(len(raw), size), state)
        outs.append(y)
        start += size
        i += 1
    if engine.lookahead:
        outs.append(engine.flush(state)[0])
    return np.concatenate(outs, axis=1)[:, engine.lookahead :]


@pytest.mark.parametrize("name", STREAMABLE)
def test_stateful_engine_in_chunks_equals_the_whole_sequence(name: str, imported: dict[str, Path]) -> None:
    """Streams fed in uneven chunks with carried state, then flushed, get onnxruntime's whole-sequence labels,
    and PyTorch's on its committed input."""
    artifact = read_artifact(imported[name])
    engine = StatefulEngine.load(artifact)
    assert engine.lookahead == {"conv_lstm": 2, "conv_gru_logits": 0, "conv_lstm_dynamo": 0}[name]
    x = np.random.default_rng(3).normal(0, 1, (2, 257, artifact.meta.channels)).astype(np.float32)
    want = onnxruntime_probabilities(artifact.model_path, x, name in LOGITS)
    want = np.concatenate([1 - want, want], axis=-1) if want.shape[-1] == 1 else want
    got = streamed(engine, raw_input(artifact.meta, x), (1, 2, 5, 31, 64, 100, 54))
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOLERANCE
    ref = np.load(FIXTURES / f"{name}.npz")
    want = softmax(ref["y"]) if name in LOGITS else ref["y"]
    want = np.concatenate([1 - want, want], axis=-1) if want.shape[-1] == 1 else want
    x = to_btc(ref["x"], read_onnx_model(artifact.model_path).input_axes)
    assert np.abs(streamed(engine, raw_input(artifact.meta, x), (7, 1, 13)) - want).max() <= TOLERANCE


def test_bidirectional_is_refused_in_stateful_mode_with_the_reason() -> None:
    with pytest.raises(ModelError, match=r"Bidirectional|backward|non-causal"):
        step_plan(read_onnx(FIXTURES / "conv_bilstm.onnx"))


# ---------------------------------------------------------------- graphs built here


def save(tmp_path: Path, nodes: list, inits: dict[str, np.ndarray], *, in_shape: list, out_units: int,
         name: str = "m.onnx", opset: int = 17) -> Path:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / name
    onnx.save(model, path)
    return path


def conv_graph(activation_nodes: list, rng: np.random.Generator, out: str = "act") -> tuple[list, dict]:
    """[B, T, 3] -> Transpose -> Conv(k=3, 'same') -> <activation> -> Transpose -> MatMul + Add -> Softmax."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1], name="in_t"),
        helper.make_node("Conv", ["xt", "cw", "cb"], ["conv"], pads=[1, 1], kernel_shape=[3], name="conv"),
        *activation_nodes,
        helper.make_node("Transpose", [out], ["ht"], perm=[0, 2, 1], name="out_t"),
        helper.make_node("MatMul", ["ht", "w"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "b"], ["logits"], name="fc_bias"),
        helper.make_node("Softmax", ["logits"], ["y"], axis=-1, name="softmax"),
    ]
    inits = {"cw": rng.normal(0, 0.7, (5, 3, 3)), "cb": rng.normal(0, 0.5, 5), "w": rng.normal(0, 0.5, (5, 4)),
             "b": rng.normal(0, 0.5, 4)}
    return nodes, inits


def const(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.float32)))


ACTIVATIONS = {
    "silu (Sigmoid, Mul)": ([helper.make_node("Sigmoid", ["conv"], ["s"]),
                             helper.make_node("Mul", ["conv", "s"], ["act"])],
                            ("Activation", "silu")),
    "leaky relu": ([helper.make_node("LeakyRelu", ["conv"], ["act"], alpha=0.2)], ("LeakyReLU", 0.2)),
    "elu alpha 0.5": ([helper.make_node("Elu", ["conv"], ["act"], alpha=0.5)], ("ELU", 0.5)),
    "gelu tanh form": ([helper.make_node("Gelu", ["conv"], ["act"], approximate="tanh")],
                       ("Activation", "gelu_approximate")),
    "tanh then scale by 1": ([helper.make_node("Tanh", ["conv"], ["t"]), const("one", 1.0),
                              helper.make_node("Mul", ["t", "one"], ["act"])], ("Activation", "tanh")),
    "hardswish": ([helper.make_node("HardSwish", ["conv"], ["act"])], ("Activation", "hard_silu")),
    "hardsigmoid 1/6": ([helper.make_node("HardSigmoid", ["conv"], ["act"], alpha=1 / 6)],
                        ("Activation", "hard_sigmoid")),
    "relu6 as Clip": ([const("lo", 0.0), const("hi", 6.0), helper.make_node("Clip", ["conv", "lo", "hi"], ["act"])],
                      ("Activation", "relu6")),
    "gelu tanh form decomposed": ([const("c3", 3.0), const("k", 0.044715), const("s", 0.7978845608028654),
                                   const("half", 0.5), const("one1", 1.0),
                                   helper.make_node("Pow", ["conv", "c3"], ["p3"]),
                                   helper.make_node("Mul", ["p3", "k"], ["kp"]),
                                   helper.make_node("Add", ["conv", "kp"], ["inner"]),
                                   helper.make_node("Mul", ["inner", "s"], ["si"]),
                                   helper.make_node("Tanh", ["si"], ["th"]),
                                   helper.make_node("Add", ["th", "one1"], ["t1"]),
                                   helper.make_node("Mul", ["conv", "t1"], ["xt1"]),
                                   helper.make_node("Mul", ["xt1", "half"], ["act"])],
                                  ("Activation", "gelu_approximate")),
}


@pytest.mark.parametrize("case", ACTIVATIONS)
def test_activations_are_identified_whatever_ops_make_them(case: str, tmp_path: Path) -> None:
    nodes, expected = ACTIVATIONS[case]
    graph_nodes, inits = conv_graph(nodes, np.random.default_rng(1))
    path = save(tmp_path, graph_nodes, inits, in_shape=["B", "T", 3], out_units=4, opset=20)
    chain = read_onnx(path)
    layer = chain.layers[1]
    assert layer.kind == expected[0]
    assert expected[1] in (layer.config.get("activation"), pytest.approx(layer.config.get("negative_slope", 0)),
                           pytest.approx(layer.config.get("alpha", 0)))
    x = np.random.default_rng(2).normal(0, 2, (2, 40, 3)).astype(np.float32)
    assert np.abs(forward(window_plan(chain), x) - onnxruntime_probabilities(path, x)).max() <= TOLERANCE


def lstm_nodes(layout: int, x: str = "x", h0: str = "") -> list:
    return [helper.make_node("LSTM", [x, "W", "R", "B", "", h0, h0], ["Y", "Yh", "Yc"], hidden_size=4,
                             layout=layout, name="lstm")]


def lstm_inits(rng: np.random.Generator, width: int = 3) -> dict:
    return {"W": rng.normal(0, 0.5, (1, 16, width)), "R": rng.normal(0, 0.5, (1, 16, 4)),
            "B": rng.normal(0, 0.5, (1, 32)), "w": rng.normal(0, 0.5, (4, 2)), "b": rng.normal(0, 0.5, 2)}


def test_time_major_input_fed_straight_to_an_lstm(tmp_path: Path) -> None:
    """An input going straight into a time-major LSTM is [time, batch, channels]; its output stays time-major."""
    nodes = [*lstm_nodes(0), helper.make_node("Squeeze", ["Y", "one"], ["Ys"]),
             helper.make_node("MatMul", ["Ys", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["y"])]
    inits = {**lstm_inits(np.random.default_rng(4)), "one": np.array([1], np.int64)}
    path = save(tmp_path, nodes, inits, in_shape=["T", "B", 3], out_units=2)
    model = read_onnx_model(path)
    assert (model.input_axes, model.output_axes) == ("TBC", "TBU")
    x = np.random.default_rng(5).normal(0, 1, (3, 50, 3)).astype(np.float32)
    assert np.abs(forward(window_plan(model.chain), x) - onnxruntime_probabilities(path, x)).max() <= TOLERANCE


def refusal(tmp_path: Path, nodes: list, inits: dict, **kw) -> str:  # noqa: ANN003
    with pytest.raises(ModelError) as e:
        read_onnx(save(tmp_path, nodes, inits, in_shape=kw.pop("in_shape", ["B", "T", 3]), out_units=2, **kw))
    return str(e.value)


def test_refusals_name_the_op_the_node_and_what_to_do(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    head = [helper.make_node("Squeeze", ["Y", "one"], ["Ys"]), helper.make_node("MatMul", ["Ys", "w"], ["y"])]
    inits = {**lstm_inits(rng), "one": np.array([1], np.int64)}
    # An op the reader does not know.
    msg = refusal(tmp_path, [helper.make_node("Cos", ["x"], ["c"], name="weird"), *lstm_nodes(1, "c"), *head], inits)
    assert "node 'weird' (Cos)" in msg and "not supported" in msg and "Conv (1-D" in msg
    # A per-window classifier reading the LSTM's last state.
    msg = refusal(tmp_path, [*lstm_nodes(1), helper.make_node("Squeeze", ["Yh", "zero"], ["h"]),
                             helper.make_node("MatMul", ["h", "w"], ["y"])], {**inits, "zero": np.array([0], np.int64)})
    assert "last hidden or cell state" in msg and "every timestep" in msg
    last_state_out = helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y", "y"], hidden_size=4, layout=1)
    msg = refusal(tmp_path, [last_state_out], inits)  # the graph's output is h_n itself
    assert "the output 'y'" in msg and "last hidden or cell state" in msg
    # A learned (non-zero) initial state.
    msg = refusal(tmp_path, [*lstm_nodes(1, h0="h0"), *head], {**inits, "h0": np.ones((1, 1, 4), np.float32)})
    assert "initial state is not zero" in msg
    # A residual connection: a conv's input added to its activated output.
    residual = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
                helper.make_node("Conv", ["xt", "cw"], ["c"], kernel_shape=[1]),
                helper.make_node("Relu", ["c"], ["r"]),
                helper.make_node("Add", ["r", "xt"], ["s"], name="residual"),
                helper.make_node("Transpose", ["s"], ["y"], perm=[0, 2, 1])]
    msg = refusal(tmp_path, residual, {"cw": rng.normal(0, 1, (3, 3, 1))})
    assert "node 'residual' (Add)" in msg and "residual" in msg and "only chains are served" in msg
    # An op the reader does not know, unnamed: named by what it makes.
    msg = refusal(tmp_path, [helper.make_node("Cos", ["x"], ["c"]), *lstm_nodes(1, "c"), *head], inits)
    assert "node (unnamed, making ['c']) (Cos)" in msg
    # A 'valid' conv is fine, an asymmetric padding that is neither 'same' nor causal is not.
    conv = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
            helper.make_node("Conv", ["xt", "cw"], ["c"], pads=[0, 2], kernel_shape=[3], name="odd_pad"),
            helper.make_node("Transpose", ["c"], ["y"], perm=[0, 2, 1])]
    msg = refusal(tmp_path, conv, {"cw": rng.normal(0, 1, (2, 3, 3))})
    assert "node 'odd_pad' (Conv)" in msg and "'same'" in msg and "'causal'" in msg
    # Too old an opset.
    msg = refusal(tmp_path, [*lstm_nodes(1), *head], inits, opset=11)
    assert "opset 11" in msg and "opset_version=17" in msg
    # No fixed channel count.
    msg = refusal(tmp_path, [*lstm_nodes(1), *head], inits, in_shape=["B", "T", "C"])
    assert "fixed channel axis" in msg


def test_weights_in_a_side_file_are_refused_with_how_to_embed_them(tmp_path: Path) -> None:
    model = onnx.load(FIXTURES / "conv_lstm.onnx")
    onnx.save(model, tmp_path / "split.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="split.onnx.data", size_threshold=0)
    with pytest.raises(ModelError, match=r"separate file.*external_data=False"):
        read_onnx(tmp_path / "split.onnx")


def test_not_an_onnx_file(tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelError, match=r"cannot read .*bad.onnx as an ONNX model"):
        read_onnx(tmp_path / "bad.onnx")


def test_without_the_onnx_package_it_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed: import raises ImportError
    with pytest.raises(ModelError, match=r"needs the onnx package.*pip install.*\[onnx\]"):
        read_onnx(FIXTURES / "conv_lstm.onnx")


def test_gru_without_linear_before_reset_is_keras_reset_after_false(tmp_path: Path) -> None:
    """ONNX's default GRU (reset before the recurrent product) is Keras' reset_after=False, its two biases summed."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             helper.make_node("GRU", ["xt", "W", "R", "B"], ["Y", "Yh"], hidden_size=4, name="gru"),
             helper.make_node("Squeeze", ["Y", "one"], ["Ys"]),
             helper.make_node("Transpose", ["Ys"], ["Yb"], perm=[1, 0, 2]),
             helper.make_node("MatMul", ["Yb", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["g"]),
             helper.make_node("Softmax", ["g"], ["y"], axis=-1)]
    inits = {"W": rng.normal(0, 0.5, (1, 12, 3)), "R": rng.normal(0, 0.5, (1, 12, 4)), "B": rng.normal(0, 0.5, (1, 24)),
             "one": np.array([1], np.int64), "w": rng.normal(0, 0.5, (4, 2)), "b": rng.normal(0, 0.5, 2)}
    path = save(tmp_path, nodes, inits, in_shape=["B", "T", 3], out_units=2)
    chain = read_onnx(path)
    assert chain.layers[0].kind == "GRU" and chain.layers[0].config["reset_after"] is False
    assert chain.layers[0].weights[2].shape == (12,)
    x = np.random.default_rng(9).normal(0, 1, (2, 30, 3)).astype(np.float32)
    assert np.abs(forward(window_plan(chain), x) - onnxruntime_probabilities(path, x)).max() <= TOLERANCE
    assert step_plan(chain).lookahead == 0  # and it streams


def test_prelu_per_feature_slope(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    nodes, inits = conv_graph([helper.make_node("PRelu", ["conv", "slope"], ["act"])], rng)
    inits["slope"] = rng.uniform(0.05, 0.5, (5, 1))  # PyTorch's [channels, 1] for a [batch, channels, time] input
    path = save(tmp_path, nodes, inits, in_shape=["B", "T", 3], out_units=4)
    chain = read_onnx(path)
    assert chain.layers[1].kind == "PReLU" and chain.layers[1].weights[0].shape == (1, 5)
    x = np.random.default_rng(11).normal(0, 2, (2, 40, 3)).astype(np.float32)
    assert np.abs(forward(window_plan(chain), x) - onnxruntime_probabilities(path, x)).max() <= TOLERANCE


def test_reading_does_not_import_the_whole_onnx_package() -> None:
    """The daemon parses with onnx's protobuf schema only: `import onnx` would add ~1 s (ml_dtypes) to start-up."""
    import subprocess

    code = ("import sys; from pathlib import Path; from sigclassd.engine.onnx_reader import read_onnx; "
            f"read_onnx(Path({str(FIXTURES / 'conv_gru_logits.onnx')!r})); "
            "print(sorted(m for m in ('onnx', 'ml_dtypes', 'onnxruntime') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_fixed_shape_export_with_its_sizes_in_the_reshapes() -> None:
    """A dynamo export without dynamic axes writes batch 2 and time 50 into its reshapes: read, windowed only."""
    path = FIXTURES / "bigru_fixed.onnx"
    model = read_onnx_model(path)
    assert model.chain.input_shape == (None, 50, 3)
    assert [layer.kind for layer in model.chain.layers] == ["Bidirectional", "Bidirectional", "Dense"]
    assert model.chain.layers[0].config["layer"]["class_name"] == "GRU"
    ref = np.load(FIXTURES / "bigru_fixed.npz")
    plan = window_plan(model.chain)
    assert np.abs(forward(plan, ref["x"]) - softmax(ref["y"])).max() <= TOLERANCE
    other = np.random.default_rng(12).normal(0, 2, ref["x"].shape).astype(np.float32)
    assert np.abs(forward(plan, other) - onnxruntime_probabilities(path, other, logits=True)).max() <= TOLERANCE
    # and one window at a time, as the engine may run it: the batch size is not baked into the layers
    assert np.abs(forward(plan, other[:1]) - forward(plan, other)[:1]).max() <= TOLERANCE


def test_log_softmax_and_input_normalisation_inside_the_graph_say_what_to_do(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    nodes, inits = conv_graph([helper.make_node("Relu", ["conv"], ["act"])], rng)
    nodes[-1] = helper.make_node("LogSoftmax", ["logits"], ["y"], axis=-1, name="logp")
    msg = refusal(tmp_path, nodes, inits)
    assert "node 'logp' (LogSoftmax)" in msg and "export the logits or a Softmax" in msg
    nodes, inits = conv_graph([helper.make_node("Relu", ["conv"], ["act"])], rng)
    nodes.insert(0, helper.make_node("Sub", ["x0", "mean"], ["x"], name="standardise"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["B", "T", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v.astype(np.float32), k)
                               for k, v in {**inits, "mean": rng.normal(0, 1, 3)}.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "norm.onnx")
    with pytest.raises(ModelError, match=r"node 'standardise' \(Sub\).*--norm-mean/--norm-std"):
        read_onnx(tmp_path / "norm.onnx")
