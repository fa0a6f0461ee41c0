"""The NAS-Bench-201 network skeleton as JAHS-Bench-201 uses it, for subnets and the supernet.

One class builds both: every cell edge holds a *set* of ops. A subnet has one op per edge, the
supernet all five, and the tensor names are the same wherever a tensor exists, which is what lets
subnets inherit from and be merged back into the supernet by name.

State-dict names (the weight-sharing contract; changing them breaks stored supernets):

- ``stem.conv.weight``, ``stem.bn.{weight,bias,running_mean,running_var,num_batches_tracked}``
- ``cells.{k}.edges.{e}.{op}.conv.weight`` and ``cells.{k}.edges.{e}.{op}.bn.*``: ``k`` is the
  cell's index over the whole network (0 .. 3N-1; stage ``k // N``), ``e`` the edge index 0..5
  (edge ``e`` carries ``Op{e+1}``, see `dehbws.space.EDGES`), ``op`` is ``conv3x3`` or ``conv1x1``
  (the other ops hold no tensors).
- ``reductions.{r}.branch_a.*``, ``reductions.{r}.branch_b.*`` (each ``conv.weight`` + ``bn.*``)
  and ``reductions.{r}.shortcut_conv.weight``: ``r`` = 0 between stages 0 and 1, 1 between 1 and 2.
- ``head.bn.*``, ``head.classifier.weight``, ``head.classifier.bias``.

Example: ``cells.7.edges.4.conv1x1.bn.running_var`` is the BatchNorm variance of the 1x1
convolution on edge Op5 of the third cell of the second stage when N = 5.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import nn

from dehbws.model.ops import ConvOp, make_activation, make_op
from dehbws.space import EDGES, OP_NAMES

STAGE_COUNT = 3
NODE_COUNT = 4


class Cell(nn.Module):
    """A 4-node NAS-Bench-201 cell: node 0 is the input, every later node sums its in-edges."""

    def __init__(
        self, edge_ops: Sequence[Sequence[str]], channels: int, *, activation: str
    ) -> None:
        super().__init__()
        self.edges = nn.ModuleList(
            nn.ModuleDict({name: make_op(name, channels, activation=activation) for name in ops})
            for ops in edge_ops
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for target in range(1, NODE_COUNT):
            total: torch.Tensor | None = None
            for (source, edge_target), edge in zip(EDGES, self.edges, strict=True):
                if edge_target != target:
                    continue
                for name, op in edge.items():  # type: ignore[operator]
                    # "none" adds zero; skipping it saves the work (and dead cells stay cheap).
                    if name == "none":
                        continue
                    out = op(nodes[source])
                    total = out if total is None else total + out
            nodes.append(torch.zeros_like(x) if total is None else total)
        return nodes[-1]


class ReductionBlock(nn.Module):
    """The residual block between stages: halves the resolution and doubles the channels."""

    def __init__(self, in_channels: int, out_channels: int, *, activation: str) -> None:
        super().__init__()
        self.branch_a = ConvOp(
            in_channels, out_channels, kernel_size=3, stride=2, activation=activation
        )
        self.branch_b = ConvOp(
            out_channels, out_channels, kernel_size=3, stride=1, activation=activation
        )
        self.shortcut_pool = nn.AvgPool2d(2, stride=2)
        self.shortcut_conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No activation after the sum: the next op starts with one.
        return self.shortcut_conv(self.shortcut_pool(x)) + self.branch_b(self.branch_a(x))


class Stem(nn.Module):
    """Conv 3x3 then BatchNorm, without activation."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class Head(nn.Module):
    """BatchNorm -> activation -> global average pool -> linear classifier."""

    def __init__(self, channels: int, num_classes: int, *, activation: str) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.activation = make_activation(activation)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.activation(self.bn(x)).mean(dim=(2, 3))  # [batch, channels]
        return self.classifier(features)


class Network(nn.Module):
    """Stem, three stages of N cells (W, 2W, 4W channels) with reduction blocks between, head.

    `edge_ops` gives the set of op names on each of the six edges (in `dehbws.space.EDGES`
    order); all cells share this genotype but have their own weights. With several ops on an
    edge the edge outputs their sum, which only the supernet (and its tests) uses.
    """

    def __init__(
        self,
        edge_ops: Sequence[Collection[str]],
        *,
        activation: str,
        width: int,
        cells_per_stage: int,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.edge_ops = _canonical_edge_ops(edge_ops)
        for name, value in (
            ("width", width),
            ("cells_per_stage", cells_per_stage),
            ("in_channels", in_channels),
            ("num_classes", num_classes),
        ):
            if value < 1:
                raise ValueError(f"{name} is {value!r}, but must be an integer >= 1.")

        self.activation_name = activation
        self.width = width
        self.cells_per_stage = cells_per_stage
        stage_channels = [width * 2**stage for stage in range(STAGE_COUNT)]

        # Modules are created in a fixed order so that a seeded build is reproducible.
        self.stem = Stem(in_channels, width)
        self.cells = nn.ModuleList(
            Cell(self.edge_ops, channels, activation=activation)
            for channels in stage_channels
            for _ in range(cells_per_stage)
        )
        self.reductions = nn.ModuleList(
            ReductionBlock(low, high, activation=activation)
            for low, high in zip(stage_channels[:-1], stage_channels[1:], strict=True)
        )
        self.head = Head(stage_channels[-1], num_classes, activation=activation)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [batch, num_classes] for images [batch, in_channels, side, side]."""
        x = self.stem(images)
        for index, cell in enumerate(self.cells):
            stage, position = divmod(index, self.cells_per_stage)
            if stage > 0 and position == 0:
                x = self.reductions[stage - 1](x)
            x = cell(x)
        return self.head(x)


def _canonical_edge_ops(edge_ops: Sequence[Collection[str]]) -> tuple[tuple[str, ...], ...]:
    """Check the per-edge op sets and order each in `OP_NAMES` order (not set order, which
    depends on string hashing and would make seeded initialisation irreproducible)."""
    if isinstance(edge_ops, str) or len(edge_ops) != len(EDGES):
        raise ValueError(
            f"edge_ops is {edge_ops!r}, but must give a collection of op names for each of the "
            f"{len(EDGES)} edges."
        )

    canonical = []
    for index, ops in enumerate(edge_ops):
        names = {ops} if isinstance(ops, str) else set(ops)
        unknown = names - set(OP_NAMES)
        if not names or unknown:
            raise ValueError(
                f"edge {index} (Op{index + 1}) has ops {sorted(names)}, but must have at least "
                f"one, each one of {list(OP_NAMES)}."
            )
        canonical.append(tuple(name for name in OP_NAMES if name in names))
    return tuple(canonical)
