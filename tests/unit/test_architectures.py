"""Tests for sigclassd.models.architectures: seed parameter counts, shapes, lookahead."""

from __future__ import annotations

import numpy as np
import pytest

from sigclassd.models.architectures import HyperParams, build_model, lookahead, output_activation, output_units


def test_output_head_follows_class_count() -> None:
    """Two classes get one sigmoid unit; more get one softmax unit per class."""
    assert (output_units(2), output_activation(2)) == (1, "sigmoid")
    assert (output_units(5), output_activation(5)) == (5, "softmax")
    with pytest.raises(ValueError, match="at least 2 classes"):
        output_units(1)


def test_lookahead_is_the_right_pad_of_the_conv_stack() -> None:
    """'same' padding reads (k-1)*d - (k-1)*d//2 future samples per conv layer; causal and pooled none."""
    assert lookahead("seq2seq", HyperParams()) == 4
    assert lookahead("seq2seq", HyperParams(kernel=8, dilation=2)) == 7
    assert lookahead("seq2seq", HyperParams(kernel=5, conv_depth=3)) == 6
    assert lookahead("causal", HyperParams(kernel=9, conv_depth=2)) == 0
    assert lookahead("pooled", HyperParams()) == 0
    with pytest.raises(ValueError, match="unknown architecture"):
        lookahead("transformer", HyperParams())


def test_hyperparameters_must_be_positive() -> None:
    """A zero or negative size is rejected before Keras sees it."""
    with pytest.raises(ValueError, match="filters must be >= 1"):
        HyperParams(filters=0).validate()
    assert HyperParams.from_json(HyperParams(units=7).to_json()) == HyperParams(units=7)


@pytest.mark.tf
def test_seed_parameter_counts() -> None:
    """The seed seq2seq model has 12,481 parameters and the pooled one 25,648 (16 channels, binary)."""
    assert build_model("seq2seq", channels=16, n_classes=2).count_params() == 12_481
    assert build_model("causal", channels=16, n_classes=2).count_params() == 12_481
    assert build_model("pooled", channels=16, n_classes=2).count_params() == 25_648


@pytest.mark.tf
@pytest.mark.parametrize("arch", ["seq2seq", "causal", "pooled"])
@pytest.mark.parametrize(("n_classes", "units"), [(2, 1), (3, 3)])
def test_output_is_one_label_per_timestep(arch: str, n_classes: int, units: int) -> None:
    """Every architecture maps [batch, 400, C] to [batch, 400, units], probabilities in [0, 1]."""
    model = build_model(arch, channels=16, n_classes=n_classes)
    out = np.asarray(model(np.random.default_rng(0).normal(size=(3, 400, 16)).astype(np.float32)))
    assert out.shape == (3, 400, units)
    assert out.min() >= 0.0 and out.max() <= 1.0
    if units > 1:
        np.testing.assert_allclose(out.sum(axis=-1), 1.0, rtol=1e-5)


@pytest.mark.tf
def test_sequence_model_runs_on_any_length() -> None:
    """A seq2seq model labels a 1,234-sample stream in one call, as it does a window."""
    model = build_model("seq2seq", channels=4, n_classes=2, hp=HyperParams(filters=4, units=4))
    assert np.asarray(model(np.zeros((1, 1234, 4), np.float32))).shape == (1, 1234, 1)


@pytest.mark.tf
@pytest.mark.parametrize(
    ("arch", "hp"),
    [
        ("seq2seq", HyperParams(filters=4, units=4)),
        ("seq2seq", HyperParams(filters=4, units=4, kernel=8, dilation=2)),
        ("seq2seq", HyperParams(filters=4, units=4, kernel=4, dilation=3, conv_depth=2)),
        ("causal", HyperParams(filters=4, units=4, conv_depth=2)),
    ],
)
def test_declared_lookahead_matches_the_model(arch: str, hp: HyperParams) -> None:
    """Changing input sample 60 first changes output 60 - lookahead, never an earlier one."""
    model = build_model(arch, channels=3, n_classes=2, hp=hp)
    x = np.random.default_rng(1).normal(size=(1, 100, 3)).astype(np.float32)
    nudged = x.copy()
    nudged[0, 60] += 5.0
    diff = np.abs(np.asarray(model(nudged)) - np.asarray(model(x)))[0, :, 0]
    assert int(np.flatnonzero(diff > 0)[0]) == 60 - lookahead(arch, hp)


@pytest.mark.tf
def test_stateful_twin_shares_the_weight_layout() -> None:
    """The stateful training twin has the same trainable weight shapes, layer by layer, as the plain model."""
    plain = build_model("seq2seq", channels=5, n_classes=3)
    twin = build_model("seq2seq", channels=5, n_classes=3, stateful_batch=4)
    assert [w.shape for w in plain.trainable_weights] == [w.shape for w in twin.trainable_weights]
    with pytest.raises(ValueError, match="cannot carry state"):
        build_model("pooled", channels=5, n_classes=3, stateful_batch=4)
