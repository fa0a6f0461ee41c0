"""The weight-sharing supernet and the discrete subnets extracted from it by tensor name.

A subnet is a real network with one op per edge (dead edges "none"), so its optimiser sees only
the tensors it uses; it inherits them from the supernet's state by name and its trained tensors
are merged back by the same names (see `dehbws.model.network` for the naming scheme).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from dehbws.errors import UserError
from dehbws.model.network import Network
from dehbws.settings import NetworkSettings
from dehbws.space import OP_KEYS, OP_NAMES, active_edge_ops, edge_ops, is_dead_cell

# The activation holds no tensors, so one supernet serves every activation.
SUPERNET_ACTIVATION = "ReLU"


def subnet_edge_ops(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The op on each edge of a configuration's cell, with dead edges set to "none"."""
    for key in OP_KEYS:
        code: Any = config.get(key)
        # ConfigSpace hands out numpy integers; bool is an int but no op code.
        valid = isinstance(code, int | np.integer) and not isinstance(code, bool)
        if not (valid and 0 <= int(code) < len(OP_NAMES)):
            raise UserError(
                f"{key} is {code!r}, but must be an integer op code 0..{len(OP_NAMES) - 1} "
                f"({', '.join(f'{i} {name}' for i, name in enumerate(OP_NAMES))})."
            )
    return active_edge_ops(edge_ops(config))


def build_subnet(config: Mapping[str, Any], network: NetworkSettings) -> Network:
    """The discrete network of a configuration (Op1..Op6 as JAHS codes, Activation)."""
    return Network(
        [{op} for op in subnet_edge_ops(config)],
        activation=str(config["Activation"]),
        width=network.width,
        cells_per_stage=network.cells_per_stage,
    )


def build_supernet(network: NetworkSettings, *, seed: int) -> Network:
    """The supernet with all five ops on every edge, initialised deterministically from `seed`."""
    # A private RNG stream: the caller's global torch RNG state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Network(
            [OP_NAMES] * 6,
            activation=SUPERNET_ACTIVATION,
            width=network.width,
            cells_per_stage=network.cells_per_stage,
        )


def supernet_state(network: NetworkSettings, *, seed: int) -> dict[str, torch.Tensor]:
    """The initial supernet's tensors by name (parameters and BatchNorm buffers)."""
    model = build_supernet(network, seed=seed)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def inherit(subnet: nn.Module, supernet_state: Mapping[str, torch.Tensor | np.ndarray]) -> None:
    """Copy every tensor of `subnet` from the supernet state with the same name.

    Values are copied, never shared, so training the subnet leaves `supernet_state` unchanged;
    numpy arrays (as read from a weight shard) are accepted too.
    Raises ValueError naming the missing keys and the shape mismatches, if any.
    """
    targets = subnet.state_dict()
    missing = [name for name in targets if name not in supernet_state]
    mismatched = [
        f"{name}: subnet {tuple(tensor.shape)}, supernet {tuple(supernet_state[name].shape)}"
        for name, tensor in targets.items()
        if name in supernet_state and tuple(supernet_state[name].shape) != tuple(tensor.shape)
    ]
    if missing or mismatched:
        raise ValueError(
            f"the supernet state does not fit this subnet: {len(missing)} missing tensors "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}, {len(mismatched)} shape "
            f"mismatches {mismatched[:10]}{' ...' if len(mismatched) > 10 else ''}. Was the "
            "supernet built with the same width and cells per stage?"
        )

    with torch.no_grad():
        for name, tensor in targets.items():
            tensor.copy_(torch.as_tensor(supernet_state[name]))


def used_tensor_names(config: Mapping[str, Any], network: NetworkSettings) -> list[str]:
    """The supernet tensors a configuration's subnet really uses, in state-dict order.

    Empty for a dead cell: its output never depends on the input, so nothing its subnet learns
    may be averaged into the supernet.
    """
    ops = subnet_edge_ops(config)
    if is_dead_cell(ops):
        return []

    # Built on the meta device: only the names are wanted, not memory or initialisation.
    with torch.device("meta"):
        subnet = build_subnet(config, network)
    return list(subnet.state_dict())


def count_parameters(module: nn.Module) -> int:
    """Number of parameter values (BatchNorm running statistics are buffers, not counted)."""
    return sum(parameter.numel() for parameter in module.parameters())
