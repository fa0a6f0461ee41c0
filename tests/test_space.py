"""The JAHS-Bench-201 joint space: hyperparameters, coding, validation and dead edges."""

from __future__ import annotations

import ConfigSpace as CS
import numpy as np
import pytest

from dehbws.errors import UserError
from dehbws.space import (
    OP_KEYS,
    OP_NAMES,
    active_edge_ops,
    build_space,
    edge_ops,
    is_dead_cell,
    to_plain,
    validate_config,
)


def test_space_has_the_jahs_hyperparameters() -> None:
    space = build_space()
    assert sorted(space.keys()) == sorted(
        [*OP_KEYS, "Activation", "LearningRate", "WeightDecay", "TrivialAugment"]
    )
    for key in OP_KEYS:
        assert list(space[key].choices) == [0, 1, 2, 3, 4]
    assert list(space["Activation"].choices) == ["ReLU", "Hardswish", "Mish"]
    learning_rate, weight_decay = space["LearningRate"], space["WeightDecay"]
    assert (learning_rate.lower, learning_rate.upper, learning_rate.log) == (1e-3, 1.0, True)
    assert (weight_decay.lower, weight_decay.upper, weight_decay.log) == (1e-5, 1e-2, True)
    assert set(space["TrivialAugment"].choices) == {True, False}


def test_op_coding_is_jahs_own() -> None:
    assert OP_NAMES == ("skip", "none", "conv3x3", "conv1x1", "avgpool3x3")
    config = {f"Op{i}": code for i, code in zip(range(1, 7), [0, 1, 2, 3, 4, 2], strict=True)}
    assert edge_ops(config) == ("skip", "none", "conv3x3", "conv1x1", "avgpool3x3", "conv3x3")


def test_sampled_configurations_become_plain_python() -> None:
    for config in build_space(seed=3).sample_configuration(20):
        plain = to_plain(config)
        assert all(not isinstance(value, np.generic) for value in plain.values())
        assert validate_config(plain) == plain
        CS.Configuration(build_space(), values=plain).check_valid_configuration()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"Op3": 5}, "Op3 is 5"),
        ({"Op1": "conv"}, "Op1 is 'conv'"),
        ({"Activation": "GELU"}, "Activation is 'GELU'"),
        ({"LearningRate": 2.0}, "LearningRate is 2.0"),
        ({"WeightDecay": float("nan")}, "WeightDecay is nan"),
        ({"TrivialAugment": "yes"}, "TrivialAugment is 'yes'"),
        ({"Depth": 3}, "unknown ['Depth']"),
    ],
)
def test_configurations_outside_the_space_are_user_errors(
    change: dict[str, object], message: str
) -> None:
    config = to_plain(build_space().get_default_configuration())
    config.update(change)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_config(config)


def test_dead_edges_become_none() -> None:
    # Only 1->2 carries a conv, but node 2 never reaches the output: nothing is live.
    assert active_edge_ops(("conv3x3", "none", "none", "none", "none", "none")) == ("none",) * 6
    # 1->2->4 is a live path; the conv on 3->4 has no input path (1->3 and 2->3 are none).
    ops = ("conv3x3", "none", "none", "none", "conv1x1", "conv3x3")
    assert active_edge_ops(ops) == ("conv3x3", "none", "none", "none", "conv1x1", "none")
    assert active_edge_ops(("skip",) * 6) == ("skip",) * 6


def test_dead_cells_are_recognised() -> None:
    assert is_dead_cell(("none",) * 6)
    assert is_dead_cell(("conv3x3", "conv3x3", "none", "conv3x3", "none", "none"))
    assert not is_dead_cell(("none", "none", "avgpool3x3", "none", "none", "none"))
