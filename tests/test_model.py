"""The network skeleton's size, the weight-sharing names, inheritance and dead cells."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dehbws.errors import UserError
from dehbws.model import (
    Network,
    build_subnet,
    build_supernet,
    count_parameters,
    inherit,
    subnet_edge_ops,
    supernet_state,
    used_tensor_names,
)
from dehbws.settings import NetworkSettings
from dehbws.space import OP_KEYS, OP_NAMES

SMALL = NetworkSettings(width=4, cells_per_stage=1, resolution=0.25)
TWO_CELLS = NetworkSettings(width=2, cells_per_stage=2, resolution=0.25)
SKIP, NONE, CONV3, CONV1, POOL = range(5)


def make_config(ops: tuple[int, ...], activation: str = "ReLU") -> dict[str, Any]:
    config: dict[str, Any] = dict(zip(OP_KEYS, ops, strict=True))
    config.update(Activation=activation, LearningRate=0.1, WeightDecay=5e-4, TrivialAugment=False)
    return config


ALL_CONV3 = make_config((CONV3,) * 6)
ALL_CONV1 = make_config((CONV1,) * 6, "Hardswish")
MIXED = make_config((CONV3, CONV1, SKIP, POOL, NONE, CONV3), "Mish")
# Node 1 is unreachable (Op1 none), so Op4 (1->2) and Op5 (1->3) are dead edges.
PARTLY_DEAD = make_config((NONE, CONV3, CONV1, CONV3, CONV1, CONV3))
# Every edge into the output node (Op3, Op5, Op6) is none.
DEAD_CELL = make_config((CONV3, CONV3, NONE, CONV1, NONE, NONE))
CONFIGS = [ALL_CONV3, ALL_CONV1, MIXED, PARTLY_DEAD, DEAD_CELL]


def test_parameter_counts_match_the_jahs_network() -> None:
    largest = build_subnet(ALL_CONV3, NetworkSettings(width=16, cells_per_stage=5))
    all_skip = build_subnet(make_config((SKIP,) * 6), SMALL)

    assert count_parameters(largest) == 1_531_258
    assert count_parameters(all_skip) == 4_822


@pytest.mark.parametrize("config", CONFIGS, ids=["conv3", "conv1", "mixed", "partly", "dead"])
@pytest.mark.parametrize("settings", [SMALL, TWO_CELLS], ids=["N1W4", "N2W2"])
def test_every_subnet_tensor_is_a_supernet_tensor_of_the_same_shape(
    config: dict[str, Any], settings: NetworkSettings
) -> None:
    supernet = build_supernet(settings, seed=0).state_dict()
    subnet = build_subnet(config, settings).state_dict()

    assert subnet, "a subnet always has a stem and a head"
    for name, tensor in subnet.items():
        assert name in supernet, name
        assert supernet[name].shape == tensor.shape, name


def test_names_follow_the_documented_scheme() -> None:
    names = set(build_subnet(ALL_CONV3, TWO_CELLS).state_dict())

    # Cell 3 is the second cell of stage 1; edge 4 carries Op5.
    assert "cells.3.edges.4.conv3x3.conv.weight" in names
    assert "cells.3.edges.4.conv3x3.bn.running_var" in names
    assert "reductions.1.shortcut_conv.weight" in names
    assert {"stem.conv.weight", "head.classifier.weight", "head.bn.bias"} <= names


def test_conv3x3_and_conv1x1_on_one_edge_have_different_tensors() -> None:
    conv3 = {n for n in build_subnet(ALL_CONV3, SMALL).state_dict() if n.startswith("cells.")}
    conv1 = {n for n in build_subnet(ALL_CONV1, SMALL).state_dict() if n.startswith("cells.")}
    supernet = build_supernet(SMALL, seed=0).state_dict()

    assert conv3 and conv1 and not conv3 & conv1
    assert supernet["cells.0.edges.0.conv3x3.conv.weight"].shape == (4, 4, 3, 3)
    assert supernet["cells.0.edges.0.conv1x1.conv.weight"].shape == (4, 4, 1, 1)


def test_supernet_holds_every_conv_on_every_edge_and_is_activation_agnostic() -> None:
    supernet = build_supernet(TWO_CELLS, seed=0)
    names = set(supernet.state_dict())
    with_mish = Network([OP_NAMES] * 6, activation="Mish", width=2, cells_per_stage=2)

    for cell in range(3 * TWO_CELLS.cells_per_stage):
        for edge in range(6):
            for op in ("conv3x3", "conv1x1"):
                assert f"cells.{cell}.edges.{edge}.{op}.conv.weight" in names
    assert names == set(with_mish.state_dict())
    assert supernet(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_supernet_init_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)

    first = supernet_state(SMALL, seed=7)
    second = supernet_state(SMALL, seed=7)
    other = supernet_state(SMALL, seed=8)

    assert torch.equal(torch.rand(3), expected_draw)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["stem.conv.weight"], other["stem.conv.weight"])


@pytest.mark.parametrize("config", CONFIGS, ids=["conv3", "conv1", "mixed", "partly", "dead"])
def test_inherit_copies_supernet_values_by_name(config: dict[str, Any]) -> None:
    state = supernet_state(TWO_CELLS, seed=3)
    torch.manual_seed(1)
    first = build_subnet(config, TWO_CELLS)
    torch.manual_seed(2)
    second = build_subnet(config, TWO_CELLS)
    images = torch.randn(4, 1, 8, 8)

    inherit(first, state)
    inherit(second, state)

    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    first.eval()
    second.eval()
    with torch.no_grad():
        assert torch.equal(first(images), second(images))


def test_inherit_copies_rather_than_shares() -> None:
    state = supernet_state(SMALL, seed=0)
    before = state["stem.conv.weight"].clone()
    subnet = build_subnet(MIXED, SMALL)
    inherit(subnet, state)

    with torch.no_grad():
        for parameter in subnet.parameters():
            parameter.add_(1.0)

    assert torch.equal(state["stem.conv.weight"], before)


def test_inherit_names_missing_tensors_and_shape_mismatches() -> None:
    subnet = build_subnet(ALL_CONV3, SMALL)
    state = supernet_state(SMALL, seed=0)
    del state["cells.0.edges.5.conv3x3.bn.weight"]
    narrower = supernet_state(NetworkSettings(width=2, cells_per_stage=1), seed=0)

    with pytest.raises(ValueError, match=r"cells\.0\.edges\.5\.conv3x3\.bn\.weight"):
        inherit(subnet, state)
    with pytest.raises(ValueError, match=r"stem\.conv\.weight: subnet \(4, 1, 3, 3\)"):
        inherit(subnet, narrower)


def test_dead_edges_hold_no_tensors() -> None:
    names = list(build_subnet(PARTLY_DEAD, SMALL).state_dict())

    expected_ops = ("none", "conv3x3", "conv1x1", "none", "none", "conv3x3")
    assert subnet_edge_ops(PARTLY_DEAD) == expected_ops
    assert not [n for n in names if ".edges.0." in n or ".edges.3." in n or ".edges.4." in n]
    assert [n for n in names if ".edges.1.conv3x3." in n]


def test_dead_cell_is_a_valid_network_whose_output_ignores_the_input() -> None:
    subnet = build_subnet(DEAD_CELL, SMALL)
    subnet.eval()

    assert not [name for name in subnet.state_dict() if name.startswith("cells.")]
    with torch.no_grad():
        first = subnet(torch.randn(2, 1, 8, 8))
        second = subnet(torch.randn(2, 1, 8, 8))
    assert first.shape == (2, 10)
    assert torch.equal(first, second)


def test_used_tensor_names() -> None:
    assert used_tensor_names(DEAD_CELL, SMALL) == []
    for config in (ALL_CONV3, MIXED, PARTLY_DEAD):
        assert used_tensor_names(config, TWO_CELLS) == list(
            build_subnet(config, TWO_CELLS).state_dict()
        )


def test_bad_configurations_are_refused_with_the_valid_choices() -> None:
    with pytest.raises(UserError, match=r"Op2 is -1, but must be an integer op code 0\.\.4"):
        build_subnet(make_config((CONV3, -1, CONV3, CONV3, CONV3, CONV3)), SMALL)
    with pytest.raises(ValueError, match="'ReLU', 'Hardswish', 'Mish'"):
        build_subnet(make_config((CONV3,) * 6, "Tanh"), SMALL)
    with pytest.raises(ValueError, match="conv5x5"):
        Network([{"conv5x5"}] * 6, activation="ReLU", width=2, cells_per_stage=1)


def test_inherit_accepts_numpy_arrays_as_read_from_a_shard() -> None:
    state = {name: tensor.numpy() for name, tensor in supernet_state(SMALL, seed=0).items()}
    subnet = build_subnet(MIXED, SMALL)

    inherit(subnet, state)

    for name, tensor in subnet.state_dict().items():
        assert torch.equal(tensor, torch.from_numpy(state[name])), name
