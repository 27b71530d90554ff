"""SkipState: the persistent, bit-packed skip mask of one attention layer and its bookkeeping."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

from .schedule import check_int

WORD_BITS = 32
ALLOWED_BLOCKS = (16, 32, 64, 128)
HISTORY_SIZE = 1024  # calls a state keeps statistics of: far more than a generation's steps


def default_block_sizes(head_dim: int) -> tuple[int, int]:
    """Tile shape (block_m, block_n) used when the caller does not choose one.

    128x64 keeps the tensor cores busy at head dims up to 128 on Hopper; at 256 the accumulator
    of a 128-row tile would not fit in registers, so q-tiles shrink to 64 rows.
    """
    return (64, 64) if head_dim > 128 else (128, 64)


def check_block_sizes(block_m: int | None, block_n: int | None) -> None:
    """Raise unless each size is one of ALLOWED_BLOCKS or None (the default for the head dim)."""
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and (isinstance(value, bool) or value not in ALLOWED_BLOCKS):
            raise ValueError(f"{name} must be one of {ALLOWED_BLOCKS}, got {value!r}")


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (..., n) into int32 words (..., ceil(n / 32)); bit j%32 of word j//32."""
    n = mask.shape[-1]
    words = math.ceil(n / WORD_BITS)
    padded = torch.zeros(*mask.shape[:-1], words * WORD_BITS, dtype=torch.int64, device=mask.device)
    padded[..., :n] = mask.to(torch.int64)
    shifts = torch.arange(WORD_BITS, device=mask.device, dtype=torch.int64)
    packed = (padded.view(*mask.shape[:-1], words, WORD_BITS) << shifts).sum(-1)
    # Wrap to the signed int32 range: bit 31 becomes the sign bit.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 words (..., w) to a bool tensor (..., n)."""
    shifts = torch.arange(WORD_BITS, device=words.device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :n].bool()


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a torch.device; a ValueError naming the argument for an unknown device, or
    for CUDA where there is none (the mask could not be allocated there)."""
    if not isinstance(device, (torch.device, str)):
        raise TypeError(f"device must be a torch.device or a string such as 'cpu' or 'cuda:0', got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must name a torch device such as 'cpu', 'cuda' or 'cuda:0', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested, but CUDA is not available")
    return device


@dataclass(frozen=True)
class TileGeometry:
    """How the (Sq x Sk) attention matrix is cut into tiles; the last tile of each axis may be partial.
    Ceilings are integer divisions: exact at any size, and symbolic under torch.compile's dynamic shapes."""

    seq_q: int
    seq_k: int
    block_m: int
    block_n: int

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            check_int(name, getattr(self, name), 1)
        for name in ("seq_q", "seq_k"):  # symbolic under torch.compile: checked where the inputs are
            value = getattr(self, name)
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{name}: expected a sequence length >= 1, got {value}")

    # Field by field, both ways: dynamo cannot compare the generated tuples, nor take `!=` as
    # `not ==`, once the lengths are symbolic (a compiled model meeting a second frame count).
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TileGeometry):
            return NotImplemented
        return (
            self.seq_q == other.seq_q and self.seq_k == other.seq_k
            and self.block_m == other.block_m and self.block_n == other.block_n
        )

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    @property
    def q_tiles(self) -> int:
        return -(-self.seq_q // self.block_m)

    @property
    def k_tiles(self) -> int:
        return -(-self.seq_k // self.block_n)

    @property
    def words(self) -> int:
        """int32 words per (batch, head, q-tile) row of the packed mask."""
        return -(-self.k_tiles // WORD_BITS)

    def mask_shape(self, batch: int, heads: int) -> tuple[int, int, int, int]:
        """Shape of the packed mask: int32 (B, H, Qt, ceil(Kt / 32))."""
        return (batch, heads, self.q_tiles, self.words)

    def diagonal_tiles(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The k-tile each q-tile visits first: the one holding key position
        floor(first_row * Sk / Sq), i.e. the attention-matrix diagonal scaled to Sq != Sk."""
        first_rows = torch.arange(self.q_tiles, device=device, dtype=torch.int64) * self.block_m
        return torch.div(first_rows * self.seq_k, self.seq_q, rounding_mode="floor") // self.block_n


@dataclass(frozen=True)
class CallStats:
    """What one attention call did; ``step`` is the denoising step it belonged to."""

    step: int
    threshold: float
    total_tiles: int
    computed_tiles: int
    newly_marked: int
    marked_after: int

    @property
    def sparsity(self) -> float:
        """Skipped tiles / all tiles of the call (B * H * Qt * Kt)."""
        return 1.0 - self.computed_tiles / self.total_tiles

    @property
    def marked_fraction(self) -> float:
        """Fraction of tiles marked in the mask after the call (what the next call may skip)."""
        return self.marked_after / self.total_tiles


class SkipState:
    """Persistent skip mask of one attention layer (one CFG branch), bit-packed.

    The mask has one bit per (batch, head, q-tile, k-tile): set = the tile was found negligible in
    an earlier call and is skipped from then on. Bits are only ever set, until :meth:`reset`.
    Storage: int32 words of shape (B, H, Qt, ceil(Kt / 32)).
    """

    def __init__(
        self,
        batch: int,
        heads: int,
        seq_q: int,
        seq_k: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        block_m: int | None = None,
        block_n: int | None = None,
        history_size: int = HISTORY_SIZE,
    ) -> None:
        batch, heads, seq_q, seq_k, head_dim = (
            check_int(name, value, 1)
            for name, value in (("batch", batch), ("heads", heads), ("seq_q", seq_q), ("seq_k", seq_k), ("head_dim", head_dim))
        )
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
        check_block_sizes(block_m, block_n)
        self.history_size = check_int("history_size", history_size, 1)
        default_m, default_n = default_block_sizes(head_dim)
        block_m = default_m if block_m is None else block_m
        block_n = default_n if block_n is None else block_n
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.dtype = dtype
        self.geometry = TileGeometry(seq_q, seq_k, block_m, block_n)
        g = self.geometry
        self.bits = torch.zeros(g.mask_shape(batch, heads), dtype=torch.int32, device=check_device(device))
        # The device as tensors on it report it ('cuda' -> 'cuda:<current>'), so that the state
        # compares equal to the inputs it was built for.
        self.device = self.bits.device
        self.step = 0
        # Statistics of the last ``history_size`` calls: a ring, so that a long-lived state does
        # not grow. The newest ones stay device tensors until read, so a call never waits on the
        # GPU just to count tiles.
        self._history: deque[CallStats] = deque(maxlen=self.history_size)
        self._pending: deque[tuple[int, float, torch.Tensor]] = deque(maxlen=self.history_size)

    @classmethod
    def for_inputs(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        block_m: int | None = None,
        block_n: int | None = None,
        *,
        history_size: int = HISTORY_SIZE,
    ) -> "SkipState":
        """A fresh state shaped for q (B, Sq, H, D) and k (B, Sk, H, D)."""
        for name, t in (("q", q), ("k", k)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a tensor of shape (batch, seq, heads, head_dim), got {shape}")
        b, sq, h, d = q.shape
        return cls(
            b, h, sq, k.shape[1], d, dtype=q.dtype, device=q.device, block_m=block_m, block_n=block_n,
            history_size=history_size,
        )

    @classmethod
    def from_bits(
        cls, bits: torch.Tensor, seq_q: int, seq_k: int, head_dim: int, dtype: torch.dtype, block_m: int, block_n: int
    ) -> "SkipState":
        """A state whose mask is ``bits`` itself (int32 (B, H, Qt, ceil(Kt / 32)), not copied): calls
        through it mark ``bits`` in place. For callers that keep the mask tensor themselves (the
        registered torch op, the diffusers integration); ``bits`` must fit the geometry."""
        batch, heads = bits.shape[:2]
        state = cls(batch, heads, seq_q, seq_k, head_dim, dtype=dtype, device="meta", block_m=block_m, block_n=block_n)
        expected = state.geometry.mask_shape(batch, heads)
        if bits.dtype != torch.int32 or tuple(bits.shape) != expected:
            raise ValueError(f"bits must be an int32 tensor of shape {expected}, got {bits.dtype} {tuple(bits.shape)}")
        state.bits, state.device = bits, bits.device
        return state

    @property
    def total_tiles(self) -> int:
        return self.batch * self.heads * self.geometry.q_tiles * self.geometry.k_tiles

    @property
    def history(self) -> list[CallStats]:
        """Statistics of the calls since the last reset, oldest first, at most the last
        ``history_size`` of them (reading them waits for the GPU work that produced them)."""
        self._collect()
        return list(self._history)

    @property
    def last_stats(self) -> CallStats | None:
        self._collect()
        return self._history[-1] if self._history else None

    def _collect(self) -> None:
        """Move the pending statistics into the history, with one device sync."""
        if self._pending:
            values = torch.stack([p[2].to(torch.int64) for p in self._pending]).tolist()
            for (step, threshold, _), (computed, before, newly) in zip(self._pending, values):
                self._history.append(CallStats(step, threshold, self.total_tiles, computed, newly, before + newly))
            self._pending.clear()

    @property
    def nbytes(self) -> int:
        """Bytes of persistent storage (the packed mask)."""
        return self.bits.numel() * self.bits.element_size()

    def mismatch(self, q: torch.Tensor, k: torch.Tensor) -> str | None:
        """Why this state cannot serve inputs q, k, or None if it can."""
        b, sq, h, d = q.shape
        expected = {
            "batch": (self.batch, b), "heads": (self.heads, h), "head_dim": (self.head_dim, d),
            "seq_q": (self.geometry.seq_q, sq), "seq_k": (self.geometry.seq_k, k.shape[1]),
            "dtype": (self.dtype, q.dtype), "device": (self.device, q.device),
        }
        wrong = [f"{name} {have} (inputs have {got})" for name, (have, got) in expected.items() if have != got]
        return None if not wrong else "state was built for " + ", ".join(wrong)

    def mask(self) -> torch.Tensor:
        """The skip mask as bool (B, H, Qt, Kt): True = skipped by the next call."""
        return unpack_bits(self.bits, self.geometry.k_tiles)

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (for benchmarks, warm starts and tests); shape (B, H, Qt, Kt) bool."""
        g = self.geometry
        expected = (self.batch, self.heads, g.q_tiles, g.k_tiles)
        if mask.dtype != torch.bool or tuple(mask.shape) != expected:
            raise ValueError(f"mask must be a bool tensor of shape {expected}, got {mask.dtype} {tuple(mask.shape)}")
        self.bits.copy_(pack_bits(mask.to(self.device)))

    def record(self, threshold: float, counts: torch.Tensor, step: int | None = None) -> None:
        """Log one call and advance the call counter; ``counts`` holds (tiles computed, tiles
        marked before the call, tiles newly marked) and may still be in flight on the GPU.
        ``step`` is the denoising step the caller assigned to the call (default: the counter)."""
        self._pending.append((self.step if step is None else step, threshold, counts))
        self.step += 1

    def reset(self) -> None:
        """Forget all marks and statistics: the next call starts a new video."""
        self.bits.zero_()
        self.step = 0
        self._history.clear()
        self._pending.clear()

    def __repr__(self) -> str:
        g = self.geometry
        return (
            f"SkipState(batch={self.batch}, heads={self.heads}, seq_q={g.seq_q}, seq_k={g.seq_k}, "
            f"head_dim={self.head_dim}, tiles={g.block_m}x{g.block_n}, step={self.step}, bytes={self.nbytes})"
        )
