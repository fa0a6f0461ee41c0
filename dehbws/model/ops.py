"""The candidate operations on a NAS-Bench-201 cell edge, and the activations they use.

Only the convolutions hold tensors; skip, none and the 3x3 average pool are parameter-free, so a
network's tensor names depend on its conv ops alone (see `dehbws.model.network`).
"""

from __future__ import annotations

import torch
from torch import nn

from dehbws.space import ACTIVATIONS, OP_NAMES

_KERNEL_SIZES: dict[str, int] = {"conv3x3": 3, "conv1x1": 1}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by its JAHS-Bench-201 name (ReLU, Hardswish or Mish)."""
    # Not in place: a node's value feeds several edges, and an in-place activation would change
    # it under the other edges' feet.
    if name == "ReLU":
        return nn.ReLU(inplace=False)
    if name == "Hardswish":
        return nn.Hardswish(inplace=False)
    if name == "Mish":
        return nn.Mish(inplace=False)
    raise ValueError(f"activation is {name!r}, but must be one of {list(ACTIVATIONS)}.")


class ConvOp(nn.Module):
    """Activation -> convolution (no bias) -> BatchNorm, NAS-Bench-201's "ReLUConvBN" block.

    The activation comes first so that a node, a sum of edge outputs, is never activated twice.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int,
        stride: int,
        activation: str,
    ) -> None:
        super().__init__()
        self.activation = make_activation(activation)
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.activation(x)))


class Zero(nn.Module):
    """The "none" op: an edge that contributes nothing to its target node."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # zeros_like rather than x * 0, so that a non-finite input does not leak through.
        return torch.zeros_like(x)


def make_op(name: str, channels: int, *, activation: str) -> nn.Module:
    """One cell-edge op by name (see `dehbws.space.OP_NAMES`); every op keeps the channel count."""
    if name in _KERNEL_SIZES:
        return ConvOp(
            channels,
            channels,
            kernel_size=_KERNEL_SIZES[name],
            stride=1,
            activation=activation,
        )
    if name == "skip":
        return nn.Identity()
    if name == "none":
        return Zero()
    if name == "avgpool3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    raise ValueError(f"op is {name!r}, but must be one of {list(OP_NAMES)}.")
