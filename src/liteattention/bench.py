"""Side-by-side attention benchmark on one GPU: LiteAttention vs cuDNN / flash SDPA vs FlexAttention.

Every method runs in one process on the same inputs. Skip masks are injected into the state
directly (random tiles, or a local band as in video attention), and FlexAttention gets a
BlockMask that keeps exactly the tiles LiteAttention computes. All cases of a shape are timed in
interleaved rounds, in a fresh random order each round (a GPU under sustained load slows its
clock, which would otherwise favour whatever runs first); times are medians over the rounds, L2
cleared before each sample. TFLOP/s are given for the dense-equivalent work
(4 * B * H * Sq * Sk * D) and for the work actually done.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .attention import lite_attention
from .plan import build_plan
from .state import SkipState, TileGeometry


@dataclass(frozen=True)
class BenchShape:
    name: str
    batch: int
    heads: int
    grid: tuple[int, int, int]  # latent (frames, height, width): one video token each
    head_dim: int
    text_tokens: int = 0  # appended after the video tokens and kept as must-do (HunyuanVideo-style)

    @property
    def seq(self) -> int:
        """Video tokens."""
        frames, height, width = self.grid
        return frames * height * width

    @property
    def tokens(self) -> int:
        return self.seq + self.text_tokens


SHAPES = {
    s.name: s
    for s in (
        BenchShape("wan14b-480p", 1, 40, (21, 30, 52), 128),
        BenchShape("wan1.3b-480p", 1, 12, (21, 30, 52), 128),
        BenchShape("wan-720p", 1, 40, (21, 45, 80), 128),
        BenchShape("ltx", 1, 32, (16, 32, 32), 64),
        BenchShape("hunyuan", 1, 24, (24, 45, 50), 128, text_tokens=256),
    )
}
SPARSITIES = (0.0, 0.25, 0.5, 0.75, 0.9)
ROUNDS = 15  # interleaved timing rounds per shape
PATTERNS = ("random", "banded")


@dataclass
class BenchRow:
    shape: str
    method: str
    pattern: str
    target_sparsity: float
    sparsity: float  # of the tiles the method computes (must-do tiles included)
    ms: float
    tflops_dense: float
    tflops_done: float


def make_mask(pattern: str, sparsity: float, geometry: TileGeometry, batch: int, heads: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A skip mask (B, H, Qt, Kt) with about ``sparsity`` of its tiles set.

    random: each tile independently. banded: each q-tile keeps a band of k-tiles centred on its
    diagonal, clipped at the sequence ends, as in local spatio-temporal attention.
    """
    g = geometry
    shape = (batch, heads, g.q_tiles, g.k_tiles)
    if pattern == "random":
        gen = torch.Generator(device=device).manual_seed(seed)
        return torch.rand(shape, generator=gen, device=device) < sparsity
    if pattern == "banded":
        diag = g.diagonal_tiles(device)[:, None]
        cols = torch.arange(g.k_tiles, device=device)[None, :]
        # Centre the band so that it fits inside [0, Kt) and keeps (1 - sparsity) of each row.
        width = max(1, round((1 - sparsity) * g.k_tiles))
        start = torch.clamp(diag - width // 2, 0, g.k_tiles - width)
        keep = (cols >= start) & (cols < start + width)
        return (~keep).expand(shape).contiguous()
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")


def _flex_block_mask(computed: torch.Tensor, geometry: TileGeometry):
    """A FlexAttention BlockMask keeping exactly the ``computed`` tiles, all as full blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    counts = computed.sum(-1, dtype=torch.int32)
    # Ascending indices of the kept tiles first (a stable sort of "not kept").
    indices = torch.sort((~computed).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    empty_counts = torch.zeros_like(counts)
    return BlockMask.from_kv_blocks(
        empty_counts, torch.zeros_like(indices), counts, indices,
        BLOCK_SIZE=(geometry.block_m, geometry.block_n), seq_lengths=(geometry.seq_q, geometry.seq_k),
    )


def interleaved_ms(cases: dict[str, Callable[[], object]], rounds: int, sample_ms: float = 20.0, seed: int = 0) -> dict[str, list[float]]:
    """Milliseconds per call of each case, one sample per round, the cases in a fresh random
    order every round.

    Timing the cases one after another for a while each lets the GPU's clock (it drops as the
    card reaches its power limit under load) favour whichever case runs first; interleaving gives every
    case the same mix of clock states, so ratios between cases hold. A sample is as many back to
    back calls as fill about ``sample_ms``, timed with CUDA events after clearing the L2 cache
    (so a sample starts cold, as a layer's attention does in a model).
    """
    import random

    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    calls = {}
    for name, fn in cases.items():  # warm-up (compilation, autotuning) and a per-call estimate
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        end.synchronize()
        calls[name] = max(1, round(sample_ms / max(start.elapsed_time(end) / 3, 1e-3)))
    order = list(cases)
    shuffle = random.Random(seed).shuffle
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        shuffle(order)
        events = []
        for name in order:
            flush.zero_()
            # Keep the GPU busy while the host queues the sample's first call: the sample then
            # times GPU work, not the Python overhead of a call (which differs between cases).
            torch.cuda._sleep(1_000_000)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls[name]):
                cases[name]()
            end.record()
            events.append((name, start, end))
        torch.cuda.synchronize()
        for name, start, end in events:
            times[name].append(start.elapsed_time(end) / calls[name])
    return times


def bench_shape(
    shape: BenchShape,
    sparsities: Sequence[float] = SPARSITIES,
    patterns: Sequence[str] = PATTERNS,
    flex: bool = True,
    threshold: float = -10.0,
    rounds: int = ROUNDS,
    log: Callable[[str], None] = print,
) -> list[BenchRow]:
    """Time every method on one shape; returns one row per (method, pattern, sparsity).

    All cases are built (and the two sparse implementations checked against each other) first,
    then timed in interleaved rounds (:func:`interleaved_ms`); a row's time is the median."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device("cuda")
    b, h, s, d = shape.batch, shape.heads, shape.tokens, shape.head_dim
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, S, D) for SDPA / Flex
    must_do = (shape.seq, shape.tokens) if shape.text_tokens else None
    dense_flops = 4.0 * b * h * s * s * d
    # (method, pattern, target sparsity, measured sparsity) -> the call to time
    cases: dict[tuple[str, str, float, float], Callable[[], object]] = {}

    def with_backend(backend, fn):
        def call():
            with sdpa_kernel(backend):
                return fn()

        return call

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt)

    cases[("ours-dense", "-", 0.0, 0.0)] = lambda: lite_attention(q, k, v, None, must_do=must_do)
    state = SkipState.for_inputs(q, k)
    geometry = state.geometry

    def first_step():
        state.bits.zero_()  # every timed call is a first step: nothing marked yet
        lite_attention(q, k, v, state, threshold=threshold, must_do=must_do)

    cases[("ours-first", "-", 0.0, 0.0)] = first_step
    cases[("sdpa-cudnn", "-", 0.0, 0.0)] = with_backend(SDPBackend.CUDNN_ATTENTION, sdpa)
    cases[("sdpa-flash", "-", 0.0, 0.0)] = with_backend(SDPBackend.FLASH_ATTENTION, sdpa)
    flex_attention = None
    if flex:
        from torch.nn.attention.flex_attention import flex_attention as flex_eager

        flex_attention = torch.compile(flex_eager, dynamic=False)
        cases[("flex-dense", "-", 0.0, 0.0)] = lambda: flex_attention(qt, kt, vt)

    # Flex's kernel tiles must divide the BlockMask's blocks, which are LiteAttention's tiles.
    flex_tiles = {"BLOCK_M": geometry.block_m, "BLOCK_N": geometry.block_n}
    for pattern in patterns:
        for target in sparsities:
            mask = make_mask(pattern, target, geometry, b, h, device)
            state.set_mask(mask)
            saved = state.bits.clone()
            computed = build_plan(geometry, b, h, device, mask, (must_do,) if must_do else (), ()).computed
            sparsity = 1.0 - computed.float().mean().item()

            def sparse_step(saved=saved):
                state.bits.copy_(saved)
                return lite_attention(q, k, v, state, threshold=threshold, must_do=must_do)

            cases[("ours", pattern, target, sparsity)] = sparse_step
            if flex_attention is not None:
                block_mask = _flex_block_mask(computed, geometry)

                def flex_step(block_mask=block_mask):
                    return flex_attention(qt, kt, vt, block_mask=block_mask, kernel_options=flex_tiles)

                # The two sparse implementations must compute the same function before they are compared.
                out_flex, out_ours = flex_step(), sparse_step()
                err = ((out_flex.transpose(1, 2).float() - out_ours.float()).norm() / out_flex.float().norm()).item()
                if err > 2e-2:
                    raise RuntimeError(f"{shape.name} {pattern} s={target}: LiteAttention and FlexAttention disagree (rel err {err:.3g})")
                cases[("flex", pattern, target, sparsity)] = flex_step

    times = interleaved_ms(cases, rounds)
    rows: list[BenchRow] = []
    for (method, pattern, target, sparsity), samples in times.items():
        ms = statistics.median(samples)
        done = dense_flops * (1 - sparsity)
        rows.append(BenchRow(shape.name, method, pattern, target, sparsity, ms, dense_flops / ms / 1e9, done / ms / 1e9))
        spread = (max(samples) - min(samples)) / ms
        log(f"{shape.name:>13} {method:>12} {pattern:>7} s={sparsity:5.3f} {ms:9.3f} ms {dense_flops / ms / 1e9:7.1f} TFLOP/s dense-eq  (spread {spread:.1%})")
    return rows


def summarize(rows: list[BenchRow]) -> list[str]:
    """The figures the performance goals are stated in, one line per shape."""
    lines = []
    for shape in dict.fromkeys(r.shape for r in rows):
        by = {(r.method, r.pattern, r.target_sparsity): r.ms for r in rows if r.shape == shape}
        dense = by[("ours-dense", "-", 0.0)]
        parts = [f"{shape}: dense/cuDNN {dense / by[('sdpa-cudnn', '-', 0.0)]:.3f}", f"first/dense {by[('ours-first', '-', 0.0)] / dense:.3f}"]
        for r in rows:
            if r.shape == shape and r.method == "ours":
                bound = (1 - r.sparsity) + 0.03
                flex_ms = by.get(("flex", r.pattern, r.target_sparsity))
                flex_part = f", flex/ours {flex_ms / r.ms:.2f}" if flex_ms else ""
                parts.append(f"{r.pattern}@{r.sparsity:.2f}: {r.ms / dense:.3f} (<= {bound:.2f}{' ok' if r.ms / dense <= bound else ' MISS'}{flex_part})")
        lines.append("; ".join(parts))
    return lines


def markdown_table(rows: list[BenchRow], pattern: str = "random") -> str:
    """One line per shape: times in ms, and each ratio the performance goals are stated in."""
    lines = [
        "| shape | cuDNN | flash | Flex | ours dense | dense / cuDNN | first step / dense "
        "| s=0.5 / dense | s=0.9 / dense | Flex / ours at s=0.5 | Flex / ours at s=0.9 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in dict.fromkeys(r.shape for r in rows):
        by = {(r.method, r.pattern, r.target_sparsity): r.ms for r in rows if r.shape == shape}
        dense = by[("ours-dense", "-", 0.0)]
        cells = [shape] + [f"{by[(m, '-', 0.0)]:.2f}" for m in ("sdpa-cudnn", "sdpa-flash", "flex-dense", "ours-dense")]
        cells += [f"{dense / by[('sdpa-cudnn', '-', 0.0)]:.2f}", f"{by[('ours-first', '-', 0.0)] / dense:.2f}"]
        cells += [f"{by[('ours', pattern, s)] / dense:.2f}" for s in (0.5, 0.9)]
        cells += [f"{by[('flex', pattern, s)] / by[('ours', pattern, s)]:.2f}" for s in (0.5, 0.9)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[BenchRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r.shape for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.2 * len(shapes), 7), squeeze=False)
    for col, shape in enumerate(shapes):
        mine = [r for r in rows if r.shape == shape]
        for row, metric, label in ((0, "ms", "time (ms)"), (1, "tflops_dense", "dense-equivalent TFLOP/s")):
            ax = axes[row][col]
            for method in ("ours", "flex"):
                for pattern, style in (("random", "-o"), ("banded", "--s")):
                    pts = sorted((r.sparsity, getattr(r, metric)) for r in mine if r.method == method and r.pattern == pattern)
                    if pts:
                        ax.plot(*zip(*pts), style, label=f"{method} {pattern}")
            for r in mine:
                if r.pattern == "-":
                    ax.axhline(getattr(r, metric), linestyle=":", linewidth=1, color={"ours-dense": "C0", "ours-first": "C5", "sdpa-cudnn": "C3", "sdpa-flash": "C4", "flex-dense": "C1"}[r.method], label=r.method)
            ax.set_xlabel("fraction of tiles skipped")
            ax.set_ylabel(label)
            ax.set_title(shape, fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_bench_args(shapes: Sequence[str], sparsities: Sequence[float], patterns: Sequence[str], rounds: int = 1) -> None:
    """Raise a ValueError naming the option whose value the benchmark cannot run."""
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        raise ValueError(f"--shapes: unknown {unknown or 'empty list'}; choose from {','.join(SHAPES)}")
    for p in patterns:
        if p not in PATTERNS:
            raise ValueError(f"--patterns: expected names from {','.join(PATTERNS)}, got {p!r}")
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise ValueError(f"--sparsities: each must lie in [0, 1), got {s}")
    if rounds < 1:
        raise ValueError(f"--rounds: expected at least 1, got {rounds}")


def run_bench(
    shapes: Sequence[str],
    sparsities: Sequence[float] = SPARSITIES,
    patterns: Sequence[str] = PATTERNS,
    out: Path | None = None,
    flex: bool = True,
    rounds: int = ROUNDS,
) -> list[BenchRow]:
    """Benchmark the named shapes; write bench.json and bench.png into ``out`` if given."""
    check_bench_args(shapes, sparsities, patterns, rounds)
    if not torch.cuda.is_available():
        raise RuntimeError("the benchmark needs a CUDA GPU")
    rows: list[BenchRow] = []
    meta = {"rounds": rounds, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": __import__("triton").__version__}
    for name in shapes:
        rows += bench_shape(SHAPES[name], sparsities, patterns, flex, rounds=rounds)
        torch.cuda.empty_cache()
        summary = summarize(rows)
        if out is not None:  # written after every shape, so a cut-short run keeps what it measured
            out.mkdir(parents=True, exist_ok=True)
            (out / "bench.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": [asdict(r) for r in rows]}, indent=1))
            plot(rows, out / "bench.png")
            if flex and {0.5, 0.9} <= set(sparsities) and "random" in patterns:
                (out / "bench.md").write_text(markdown_table(rows) + "\n")
    print("\n".join(summarize(rows)))
    return rows

