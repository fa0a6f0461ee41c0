"""The JAHS-Bench-201 joint search space: a NAS-Bench-201 cell plus training hyperparameters.

Ops use JAHS-Bench-201's own integer coding (not NAS-Bench-201's string order), so a
configuration can be handed to the JAHS surrogate unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import ConfigSpace as CS
import numpy as np

from dehbws.errors import UserError

# Index = JAHS-Bench-201 integer code of the op.
OP_NAMES: tuple[str, ...] = ("skip", "none", "conv3x3", "conv1x1", "avgpool3x3")
PARAMETRIC_OPS: tuple[str, ...] = ("conv3x3", "conv1x1")

# Op1..Op6 sit on these (from, to) edges of the 4-node cell: node 0 is the input, node 3 output.
EDGES: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
OP_KEYS: tuple[str, ...] = tuple(f"Op{i}" for i in range(1, 7))

ACTIVATIONS: tuple[str, ...] = ("ReLU", "Hardswish", "Mish")
LEARNING_RATE_RANGE: tuple[float, float] = (1e-3, 1.0)
WEIGHT_DECAY_RANGE: tuple[float, float] = (1e-5, 1e-2)


def build_space(seed: int | None = None) -> CS.ConfigurationSpace:
    """The joint space as a ConfigSpace; width, depth and resolution are run settings, not here."""
    space = CS.ConfigurationSpace(seed=seed)
    ops = [
        CS.CategoricalHyperparameter(key, choices=list(range(len(OP_NAMES))), default_value=0)
        for key in OP_KEYS
    ]
    space.add(ops)
    space.add(
        [
            CS.CategoricalHyperparameter("Activation", list(ACTIVATIONS), default_value="ReLU"),
            CS.UniformFloatHyperparameter(
                "LearningRate", *LEARNING_RATE_RANGE, default_value=0.1, log=True
            ),
            CS.UniformFloatHyperparameter(
                "WeightDecay", *WEIGHT_DECAY_RANGE, default_value=5e-4, log=True
            ),
            CS.CategoricalHyperparameter("TrivialAugment", [True, False], default_value=False),
        ]
    )
    return space


def to_plain(config: Mapping[str, Any] | CS.Configuration) -> dict[str, Any]:
    """A configuration as a dict of plain Python values (ConfigSpace hands out numpy scalars)."""
    plain: dict[str, Any] = {}
    for key, value in dict(config).items():
        if isinstance(value, np.generic):
            value = value.item()
        plain[key] = value
    return plain


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Check a plain configuration against the space; returns it with canonical types."""
    expected = set(OP_KEYS) | {"Activation", "LearningRate", "WeightDecay", "TrivialAugment"}
    missing = expected - set(config)
    unknown = set(config) - expected
    if missing or unknown:
        raise UserError(
            f"configuration {dict(config)!r} does not fit the search space: missing "
            f"{sorted(missing)}, unknown {sorted(unknown)}; expected keys {sorted(expected)}."
        )

    checked: dict[str, Any] = {}
    for key in OP_KEYS:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UserError(f"{key} is {value!r}, but must be an integer op code 0..4.")
        if not 0 <= int(value) < len(OP_NAMES):
            raise UserError(f"{key} is {value!r}, but must be an op code 0..4 ({OP_NAMES}).")
        checked[key] = int(value)

    if config["Activation"] not in ACTIVATIONS:
        raise UserError(
            f"Activation is {config['Activation']!r}, but must be one of {list(ACTIVATIONS)}."
        )
    checked["Activation"] = str(config["Activation"])

    for key, (low, high) in (
        ("LearningRate", LEARNING_RATE_RANGE),
        ("WeightDecay", WEIGHT_DECAY_RANGE),
    ):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
            raise UserError(f"{key} is {value!r}, but must be a number in [{low}, {high}].")
        if not (math.isfinite(float(value)) and low <= float(value) <= high):
            raise UserError(f"{key} is {value!r}, but must lie in [{low}, {high}].")
        checked[key] = float(value)

    augment = config["TrivialAugment"]
    if not isinstance(augment, (bool, np.bool_)):
        raise UserError(f"TrivialAugment is {augment!r}, but must be true or false.")
    checked["TrivialAugment"] = bool(augment)
    return checked


def edge_ops(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The op name on each of the six edges, in EDGES order."""
    return tuple(OP_NAMES[int(config[key])] for key in OP_KEYS)


def active_edge_ops(ops: Sequence[str]) -> tuple[str, ...]:
    """The cell's ops with every edge that cannot influence the output replaced by "none".

    An edge counts only if it lies on a path from the input node to the output node made of
    edges other than "none". Dead edges would still be trained by weight decay and averaged into
    the supernet although the network's output never depends on them.
    """
    live = [op != "none" for op in ops]
    node_count = 4

    reachable_from_input = {0}
    for edge_index, (source, target) in enumerate(EDGES):
        if live[edge_index] and source in reachable_from_input:
            reachable_from_input.add(target)

    reaches_output = {node_count - 1}
    for edge_index in reversed(range(len(EDGES))):
        source, target = EDGES[edge_index]
        if live[edge_index] and target in reaches_output:
            reaches_output.add(source)

    return tuple(
        op
        if live[i] and EDGES[i][0] in reachable_from_input and EDGES[i][1] in reaches_output
        else "none"
        for i, op in enumerate(ops)
    )


def is_dead_cell(ops: Sequence[str]) -> bool:
    """True when the cell's output never depends on its input (every path holds a "none")."""
    return all(op == "none" for op in active_edge_ops(ops))
