"""Per-call work planning: which tiles each q-tile computes, in which order, and which may be marked.

The reference walks a TilePlan tile by tile; the Triton backend builds the same plan on the GPU
(kernels/worklist.py: plan_work) from the packed mask and the tile flags made here.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch

from .state import TileGeometry, pack_bits

Range = tuple[int, int]
RangesLike = Union[None, Range, Sequence[Range]]


def _is_index(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def normalize_ranges(ranges: RangesLike, seq_k: int, name: str) -> tuple[Range, ...]:
    """Validate key-index ranges [start, end) given as one pair or a sequence of pairs."""
    if ranges is None:
        return ()
    if not isinstance(ranges, Sequence) or isinstance(ranges, (str, bytes)):
        raise TypeError(f"{name} must be a (start, end) pair or a sequence of them, got {type(ranges).__name__}")
    if len(ranges) == 2 and all(_is_index(x) for x in ranges):  # one bare pair, tuple or list
        ranges = [ranges]
    result = []
    for i, r in enumerate(ranges):
        if not (isinstance(r, Sequence) and len(r) == 2 and all(_is_index(x) for x in r)):
            hint = "; write one range as (start, end), several as [(start, end), ...]" if _is_index(r) else ""
            raise TypeError(f"{name}[{i}] must be a (start, end) pair of ints, got {r!r}{hint}")
        start, end = int(r[0]), int(r[1])
        if not 0 <= start < end <= seq_k:
            raise ValueError(f"{name}[{i}] = ({start}, {end}) must satisfy 0 <= start < end <= {seq_k} (the key length)")
        result.append((start, end))
    return tuple(result)


def _tile_bounds(geometry: TileGeometry, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.arange(geometry.k_tiles, device=device) * geometry.block_n
    return starts, torch.clamp(starts + geometry.block_n, max=geometry.seq_k)


def must_do_tiles(ranges: tuple[Range, ...], geometry: TileGeometry, device: torch.device) -> torch.Tensor:
    """Bool (Kt,): k-tiles that overlap any must-do range (always computed, never marked)."""
    starts, ends = _tile_bounds(geometry, device)
    flags = torch.zeros(geometry.k_tiles, dtype=torch.bool, device=device)
    for start, end in ranges:
        flags |= (starts < end) & (ends > start)
    return flags


def must_skip_tiles(ranges: tuple[Range, ...], geometry: TileGeometry, device: torch.device) -> torch.Tensor:
    """Bool (Kt,): k-tiles lying wholly inside one must-skip range (never computed)."""
    starts, ends = _tile_bounds(geometry, device)
    flags = torch.zeros(geometry.k_tiles, dtype=torch.bool, device=device)
    for start, end in ranges:
        flags |= (starts >= start) & (ends <= end)
    return flags


def visit_order(geometry: TileGeometry, device: torch.device) -> torch.Tensor:
    """(Qt, Kt) int64: for each q-tile, its diagonal k-tile first, then the others ascending."""
    pos = torch.arange(geometry.k_tiles, device=device)
    diag = geometry.diagonal_tiles(device).unsqueeze(1)
    return torch.where(pos == 0, diag, torch.where(pos <= diag, pos - 1, pos))


def anchor_tiles(order: torch.Tensor, must_skip: torch.Tensor) -> torch.Tensor:
    """Bool (Qt, Kt): each q-tile's anchor, the first k-tile of its visit order that is not
    must-skip. It is computed even where the mask marks it (a mask made under other must-skip
    ranges can mark every tile a call leaves), so no row is left without keys; being the first
    tile visited, it is never marked."""
    first = (~must_skip[order]).int().argmax(1, keepdim=True)  # argmax: the first True
    anchors = torch.zeros(order.shape, dtype=torch.bool, device=order.device)
    return anchors.scatter_(1, order.gather(1, first), True)


@dataclass
class TilePlan:
    """What one call computes.

    computed: bool (B, H, Qt, Kt), or None when every tile is computed (dense, nothing skipped).
    markable: bool (Kt,): tiles that may be marked (all but must-do tiles).
    order: (Qt, Kt) visit order of k-tiles per q-tile.
    """

    geometry: TileGeometry
    computed: torch.Tensor | None
    markable: torch.Tensor
    order: torch.Tensor

    def computed_count(self, batch: int, heads: int) -> torch.Tensor:
        if self.computed is None:
            g = self.geometry
            return torch.tensor(batch * heads * g.q_tiles * g.k_tiles, device=self.markable.device)
        return self.computed.sum()


@functools.lru_cache(maxsize=64)
def range_flags(geometry: TileGeometry, must_do: tuple[Range, ...], must_skip: tuple[Range, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(must-do, must-skip) tile flags, bool (Kt,) on the host, validated; cached because a model
    calls every layer with the same ranges at every step."""
    cpu = torch.device("cpu")
    do = must_do_tiles(must_do, geometry, cpu)
    skip = must_skip_tiles(must_skip, geometry, cpu)
    if bool((do & skip).any()):
        raise ValueError("must_do and must_skip ranges cover the same key tile; they must be disjoint")
    if bool(skip.all()):
        raise ValueError("must_skip covers every key tile: no key would be attended to")
    return do, skip


def build_plan(
    geometry: TileGeometry,
    batch: int,
    heads: int,
    device: torch.device,
    mask: torch.Tensor | None,
    must_do: tuple[Range, ...],
    must_skip: tuple[Range, ...],
) -> TilePlan:
    """Combine the skip mask (bool (B, H, Qt, Kt) or None) with the must-do / must-skip ranges."""
    do, skip = (flags.to(device) for flags in range_flags(geometry, must_do, must_skip))
    order = visit_order(geometry, device)
    computed = None
    if mask is not None or must_skip:
        computed = torch.ones(batch, heads, geometry.q_tiles, geometry.k_tiles, dtype=torch.bool, device=device)
        if mask is not None:
            computed &= ~mask
        computed &= ~skip
        computed |= do | anchor_tiles(order, skip)
    return TilePlan(geometry, computed, ~do, order)


@functools.lru_cache(maxsize=64)
def range_words(
    geometry: TileGeometry, must_do: tuple[Range, ...], must_skip: tuple[Range, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tile flags of :func:`range_flags`, bit-packed like the mask and on ``device``."""
    return tuple(pack_bits(flags).to(device) for flags in range_flags(geometry, must_do, must_skip))
