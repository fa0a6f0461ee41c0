"""The NAS-Bench-201 network of JAHS-Bench-201, its weight-sharing supernet and subnets.

Subnets and the supernet name their tensors identically (scheme in `dehbws.model.network`), so a
subnet inherits from the supernet and is merged back into it by name.
"""

from dehbws.model.network import Network
from dehbws.model.supernet import (
    build_subnet,
    build_supernet,
    count_parameters,
    inherit,
    subnet_edge_ops,
    supernet_state,
    used_tensor_names,
)

__all__ = [
    "Network",
    "build_subnet",
    "build_supernet",
    "count_parameters",
    "inherit",
    "subnet_edge_ops",
    "supernet_state",
    "used_tensor_names",
]
