"""The Gluon (sm_90) kernel off the GPU: it compiles for sm_90 without register spills in its
loops, and the pass that turns its verdict words into marks matches a plain computation (under
the interpreter when there is no GPU). On an H200, test_semantics.py runs the kernel itself
against the reference."""

import functools
import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import triton

from conftest import DEVICE, REPO, compiler_env
from liteattention import kernels
from liteattention.kernels import WorkList, choose_kernel
from liteattention.kernels import gluon_forward as gf
from liteattention.kernels.gluon_forward import GROUP, VERDICT_WARPS, _apply_verdicts, gluon_forward
from liteattention.kernels.triton_compat import sm90_ptxas
from liteattention.state import TileGeometry, pack_bits

COMPILE = """
import sys
from liteattention.kernels.gluon_forward import compile_for_sm90

head_dim, block_n, use_list, mark, above_max, even_n, lse = map(int, sys.argv[1:8])
kernel = compile_for_sm90(
    head_dim, block_n, use_list=bool(use_list), mark=bool(mark), partial_n=not even_n, lse=bool(lse),
    above_max=bool(above_max),
)
open(sys.argv[8], "w").write(kernel.asm["ptx"])
"""


@pytest.mark.parametrize(
    "head_dim, block_n, use_list, mark, above_max, even_n, lse",
    [
        (128, 64, 1, 1, 0, 0, 1), (128, 64, 1, 1, 1, 1, 0), (128, 128, 1, 1, 0, 0, 0), (128, 128, 1, 1, 0, 1, 0),
        (64, 128, 0, 0, 0, 1, 0), (64, 128, 1, 0, 0, 1, 0), (64, 64, 1, 1, 0, 0, 0), (64, 64, 1, 0, 0, 0, 0),
    ],
    ids=[
        "pairs-marking-partial-lse", "pairs-marking-above-max", "single-marking-partial", "single-marking-even",
        "single-dense-d64", "single-list-d64", "pairs-marking-d64", "pairs-list-d64",
    ],
)
def test_compiles_for_sm90_without_spills_in_its_loops(
    monkeypatch, tmp_path: Path, head_dim, block_n, use_list, mark, above_max, even_n, lse,
):
    """No register spills in dense mode or the work list; with marking, ptxas spills a few
    registers around the last step in one build (under 64 bytes, once per q-tile), never in a
    loop that issues wgmma inside the loop over q-tiles (the step loop of each consumer and,
    where the steps are nested per group of tiles, the loop over groups around it)."""
    ptx = tmp_path / "kernel.ptx"
    args = [str(a) for a in (head_dim, block_n, use_list, mark, above_max, even_n, lse, ptx)]
    subprocess.run([sys.executable, "-c", COMPILE, *args], env=compiler_env(), check=True, timeout=600)
    text = ptx.read_text()
    assert "wgmma.mma_async" in text and "setmaxnreg" in text
    # The consumers' ping-pong (head dim 64 only): each waits on its own named barrier, arrives on the other's.
    turns = ("bar.sync 10, 256", "bar.arrive 11, 256", "bar.sync 11, 256", "bar.arrive 10, 256")
    assert [turn in text for turn in turns] == [gf.pingpong(head_dim)] * 4
    # The producer's hand-over of a q-tile: every lane stores the claim, the warp's own barrier
    # orders those stores, then one lane arrives on q_ready (its release covers only its own store).
    lines = text.splitlines()
    claim_syncs = [i for i, line in enumerate(lines) if f"bar.sync {gf.NamedBarrier.CLAIM:d}, 32;" in line]
    assert len(claim_syncs) == 2, claim_syncs  # in the loop over q-tiles, and the final stop
    for i in claim_syncs:
        before = [line for line in lines[:i] if "st.shared" in line or "mbarrier" in line][-1]
        after = next(line for line in lines[i + 1 :] if "st.shared" in line or "mbarrier" in line)
        assert "st.shared" in before and "mbarrier.arrive" in after, (before, after)
    # A consumer hands buffers back with one barrier over its warpgroup, then one thread's arrive:
    # ours up to Triton 3.7, the arrive's own from 3.8 on; never both (a second bar.sync per step).
    syncs_before_arrive, since_last_op = [], 0
    for line in lines:
        if re.search(r"\bbar\.sync\s+\d+, 128;", line):
            since_last_op += 1
        elif "mbarrier.arrive" in line:
            syncs_before_arrive.append(since_last_op)
            since_last_op = 0
        elif re.search(r"\b(wgmma|ld|st|ex2|bar\.arrive|mbarrier)\.", line):
            since_last_op = 0
    assert max(syncs_before_arrive) == 1 and syncs_before_arrive.count(1) >= 2, syncs_before_arrive
    ptxas = sm90_ptxas()
    cubin = tmp_path / "kernel.cubin"
    report = subprocess.run(
        [str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)], capture_output=True, text=True, check=True,
    ).stderr
    if not mark:
        assert "0 bytes spill stores, 0 bytes spill loads" in report, report
    tools = sass_tools(monkeypatch)
    sass = subprocess.run([str(tools.NVDISASM), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    # Loops end in a conditional branch back; an unconditional one comes from the out-of-line retry
    # of an mbarrier wait, which jumps back over the whole partition.
    loops = [loop for loop in tools.wgmma_loops(sass) if loop[2][-1].startswith("@")]
    # Per consumer warpgroup the loop over q-tiles, the step loop inside it, and where nested the
    # loop over groups of tiles between them.
    nested = gf._nested_steps(bool(use_list), bool(mark), gf.pingpong(head_dim))
    assert len(loops) == (6 if nested else 4), [(hex(start), len(body)) for start, _, body in loops]
    inner = [(start, end, body) for start, end, body in loops if any(s < start and end <= e for s, e, _ in loops)]
    assert len(inner) == (4 if nested else 2)
    steps = [(start, body) for start, end, body in inner if not any(start < s and e <= end for s, e, _ in inner)]
    local = {
        hex(start): [text for text in body if tools.opcode(text) in ("LDL", "STL")] for start, _, body in inner
    }
    assert not any(local[hex(start)] for start, _ in steps), local
    # Triton 3.9's ptxas (13.4) keeps one register of one marking build (head dim 128, LSE) in
    # local memory across the loop over groups, loaded and stored once per 32 tiles.
    allowed = 2 if kernels.TRITON_VERSION >= (3, 9) and mark and lse else 0
    assert all(len(texts) <= allowed for texts in local.values()), local


def sass_tools(monkeypatch):
    """bench/gluon_sass.py as a module (disassembler path, loop finder, opcode parser); skips
    where this Triton ships no nvdisasm."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gluon_sass

    if not gluon_sass.NVDISASM.exists():
        pytest.skip("no nvdisasm in this Triton")
    return gluon_sass


def gluon_sass(monkeypatch, *args: str) -> str:
    """The report of bench/gluon_sass.py with these arguments, compiled without the interpreter."""
    sass_tools(monkeypatch)
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "gluon_sass.py"), *args],
        env=compiler_env(), capture_output=True, text=True, check=True, timeout=600,
    ).stdout


def step_loop_opcodes(monkeypatch, head_dim: int, mode: str) -> Counter:
    """Opcode counts of the Gluon kernel's step loop, as bench/gluon_sass.py finds it."""
    loop = gluon_sass(monkeypatch, "--head-dim", str(head_dim), "--mode", mode, "--show").splitlines()
    opcode = sass_tools(monkeypatch).opcode
    return Counter(opcode(line) for line in loop if line and not line.startswith(" "))  # the summary lines are indented


@pytest.mark.parametrize("head_dim, hgmma", [(64, 4 + 8), (128, 8 + 8)])
def test_sass_step_loop_issues_one_wgmma_pair_per_128_keys(monkeypatch, head_dim, hgmma):
    """bench/gluon_sass.py finds the step loop, and it holds one QK^T and one PV wgmma for two
    64-key tiles (k-steps of 16: head_dim / 16 and 128 / 16 HGMMA) and one softmax update: 66
    exponentials per thread (64 rows x 128 keys over 128 threads, and the rescale of its 2 rows).
    Marking adds no shuffles: the 8 are the max and the sum over a row's 4 threads, for 2 rows."""
    count = step_loop_opcodes(monkeypatch, head_dim, "mark")
    assert (count["HGMMA"], count["MUFU"], count["SHFL"]) == (hgmma, 66, 8), count


def test_sass_p_reaches_the_pv_wgmma_without_swapping_halves_at_head_dim_128(monkeypatch):
    """At head dim 128, P's 64 values per thread become 32 packed bf16 pairs (F2FP) in the order
    the PV wgmma reads them: no PRMT swaps the halves back (the scalar conversion needs 32)."""
    count = step_loop_opcodes(monkeypatch, 128, "dense")
    assert (count["F2FP"], count["PRMT"]) == (32, 0), count


@pytest.mark.parametrize("head_dim", [64, 128])
def test_sass_marking_step_loop_stores_verdicts_only_where_it_is_one_loop(monkeypatch, head_dim):
    """With marking, a group's verdict word is reduced and stored after the inner loop over its
    steps, so the step loop holds no redux and no store; marking adds the verdicts only (two
    compares per tile and row, the select and shift of its bit, and register moves): 11
    instructions over the list loop's at head dim 128, 13 at 64. From Triton 3.9 at head dim 64
    the steps run in one loop that stores the word in every step (_nested_steps): one redux, one
    store and its address more, and the 32 PRMT that swap P's halves in a single loop."""
    mark = step_loop_opcodes(monkeypatch, head_dim, "mark")
    listed = step_loop_opcodes(monkeypatch, head_dim, "list")
    one_loop = head_dim == 64 and kernels.TRITON_VERSION >= (3, 9)
    stores, prmt, extra = (1, 32, 16) if one_loop else (0, 0, 13)
    assert (mark["REDUX"], mark["STG"], mark["FSETP"], mark["PRMT"]) == (stores, stores, 4, prmt), mark
    assert sum(mark.values()) - prmt - sum(listed.values()) <= extra, (sum(mark.values()), sum(listed.values()))


@pytest.mark.parametrize("head_dim, mode, chain", [(64, "list", 7), (64, "dense", 33), (128, "list", 33)])
def test_sass_row_max_is_a_tree_only_in_the_list_loop_at_head_dim_64(monkeypatch, head_dim, mode, chain):
    """The list build with ping-pong folds the row max as a tree: its longest chain of dependent
    FMNMX is 7 (four halvings, the thread's two adjacent columns, and the quad's two shuffle
    steps). The other builds keep gl.max's chain (31 FMNMX, 33 with the shuffle steps), the form
    each measured faster with on Triton 3.6 (docs/performance.md, v19; 3.7 the same). From 3.8 on
    Triton folds every row max as a tree (chain 7) by itself."""
    if kernels.TRITON_VERSION >= (3, 8):
        chain = 7
    report = gluon_sass(monkeypatch, "--head-dim", str(head_dim), "--mode", mode)
    assert f"longest FMNMX chain {chain}" in report, report


def test_sass_comparison_finds_a_copy_of_the_kernel_the_same(monkeypatch, tmp_path: Path):
    """Against a copy of the current kernel, bench/gluon_sass.py finds the same counts and the same
    step loops instruction for instruction: what tells a change that leaves a loop alone."""
    copy = tmp_path / "gluon_copy.py"
    shutil.copy(gf.__file__, copy)
    report = gluon_sass(monkeypatch, str(copy), "--head-dim", "64", "--mode", "dense")
    assert "gluon_copy -> current: the same counts" in report, report
    assert "gluon_copy -> current: the same step loops, instruction for instruction" in report, report


def test_apply_verdicts_marks_tiles_negligible_for_every_warp():
    geometry = TileGeometry(seq_q=4 * 128, seq_k=150 * 64, block_m=128, block_n=64)
    rows, k_tiles, words = 4, geometry.k_tiles, geometry.words
    groups = triton.cdiv(k_tiles, GROUP.value)
    gen = torch.Generator().manual_seed(1)
    counts = torch.tensor([150, 70, 1, 0], dtype=torch.int32)
    # Each row's visit order is a permutation of its k-tiles; a few entries are must-do (-(kt + 1)).
    entries = torch.stack([torch.randperm(k_tiles, generator=gen) for _ in range(rows)]).to(torch.int32)
    must_do = torch.rand(rows, k_tiles, generator=gen) < 0.1
    entries = torch.where(must_do, -entries - 1, entries)
    # Each warp's word: bits shared by all warps (half the tiles) plus its own random bits, so some
    # tiles are negligible for every warp and many for only some.
    shared = torch.randint(-(2**31), 2**31, (rows, groups, 1), generator=gen, dtype=torch.int32)
    own = torch.randint(-(2**31), 2**31, (rows, groups, VERDICT_WARPS.value), generator=gen, dtype=torch.int32)
    verdicts = shared | own
    bits = torch.zeros(rows, words, dtype=torch.int32)
    bits[:, 0] = 1  # an earlier mark stays
    stats = torch.zeros(3, dtype=torch.int64)

    expected = bits.clone()
    newly = 0
    for r in range(rows):
        for pos in range(int(counts[r])):
            word = -1
            for warp in range(VERDICT_WARPS.value):
                word &= int(verdicts[r, pos // GROUP.value, warp])
            kt = int(entries[r, pos])
            if kt >= 0 and (word >> (pos % GROUP.value)) & 1:
                expected[r, kt // 32] |= torch.tensor(1 << (kt % 32), dtype=torch.int64).to(torch.int32)
                newly += 1

    args = [t.to(DEVICE) for t in (verdicts, entries, counts, bits, stats)]
    _apply_verdicts[(rows,)](*args, k_tiles, words, groups, GROUP_SIZE=GROUP.value, WARPS=VERDICT_WARPS.value)
    assert newly > 0
    assert torch.equal(args[3].cpu(), expected)
    assert args[4].cpu().tolist() == [0, 0, newly]


def test_gluon_kernel_not_chosen_for_cpu_tensors():
    choice = choose_kernel(torch.device("cpu"), TileGeometry(128, 128, 128, 64), 128)
    assert choice == kernels.KernelChoice("portable", "cpu tensors: the Gluon kernel runs on CUDA GPUs only")


@pytest.mark.parametrize(
    "block_m, block_n, head_dim, reason",
    [
        (64, 64, 128, "block_m=64: it takes 128-row q-tiles"),
        (128, 32, 128, "block_n=32: it takes 64- or 128-key k-tiles"),
        (128, 64, 256, "head dim padded to 256: it takes head dims 33 to 128 (padded to 64 or 128)"),
        (128, 64, 32, "head dim padded to 32: it takes head dims 33 to 128 (padded to 64 or 128)"),
        (128, 128, 64, None),
    ],
)
def test_gluon_kernel_names_the_tile_shapes_it_does_not_take(block_m, block_n, head_dim, reason):
    assert gf.unsupported_shape(TileGeometry(256, 256, block_m, block_n), head_dim) == reason


def test_forcing_the_gluon_kernel_where_it_cannot_run_says_why():
    q = torch.zeros(1, 128, 1, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="kernel='gluon' cannot run this call: cpu tensors"):
        kernels.forward(q, q, q, TileGeometry(128, 128, 128, 64), scale=1.0, threshold=-10.0, bits=None, kernel="gluon")


def test_ring_depths_fit_shared_memory():
    # A 128-key step of K and V takes 64 KiB at head dim 128 (3 fit next to Q's 32 KiB), 32 KiB
    # at head dim 64 (6 fit, the cap); the default is 3 wherever 3 fit.
    assert (gf.stages_for(128, 128), gf.stages_for(128, 64), gf.stages_for(64, 128)) == (3, 6, 6)
    assert gf.default_stages(128, 128) == gf.default_stages(128, 64) == 3
    assert (gf.step_tiles(64), gf.step_tiles(128)) == (2, 1)
    # A second Q buffer (32 KiB at head dim 128, 16 KiB at 64) fits next to a ring of 3 at head dim 64 only.
    assert (gf.q_buffers(128, 64, 3), gf.q_buffers(128, 128, 3), gf.q_buffers(128, 128, 2)) == (2, 1, 2)


@pytest.mark.parametrize(
    "block_n, pairs, stages, match",
    [(64, True, 1, "stages: expected"), (64, True, 4, "stages: expected"), (64, False, 0, "stages: expected"),
     (64, False, 7, "stages: expected"), (128, True, None, "pairs: two tiles per step need 64-key tiles")],
)
def test_bad_launch_options_are_refused(block_n, pairs, stages, match):
    q = torch.zeros(1, 256, 1, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        gluon_forward(
            q, q, q, TileGeometry(256, 256, 128, block_n), scale=1.0, threshold=-10.0, bits=None, work=None,
            stats=torch.zeros(3, dtype=torch.int64), return_lse=False, stages=stages, pairs=pairs,
        )


@pytest.mark.parametrize(
    "head_dim, seq_k, block_n, expected",
    [
        (64, 1000, 64, {"STAGES": 3, "Q_BUFS": 2, "STEP_TILES": 2, "MASK_ENDS": True, "PINGPONG": True}),
        (128, 1024, 128, {"STAGES": 3, "Q_BUFS": 1, "STEP_TILES": 1, "MASK_ENDS": False, "PINGPONG": False}),
        (128, 1000, 128, {"STAGES": 3, "Q_BUFS": 1, "STEP_TILES": 1, "MASK_ENDS": True, "PINGPONG": False}),
    ],
)
def test_launch_options(monkeypatch, head_dim, seq_k, block_n, expected):
    """gluon_forward's compile-time options per tile shape and head dim, recorded off the GPU by a
    stand-in kernel. compile_for_sm90 (the compile tests above) derives its own from the same
    helper, so those tests compile what runs."""
    launches = record_launches(monkeypatch)
    q = torch.zeros(1, 256, 2, head_dim, dtype=torch.bfloat16, device=DEVICE)
    k = torch.zeros(1, seq_k, 2, head_dim, dtype=torch.bfloat16, device=DEVICE)
    gluon_forward(
        q, k, k, TileGeometry(256, seq_k, 128, block_n), scale=1.0, threshold=-10.0, bits=None, work=None,
        stats=torch.zeros(3, dtype=torch.int64, device=DEVICE), return_lse=False,
    )
    ((grid, options),) = launches
    assert grid == (4,)  # 2 heads x 2 q-tiles, fewer than the SMs: one program each
    assert options == {
        **expected, "USE_LIST": gf.dense_as_list(head_dim), "MARK": False, "ABOVE_MAX": False, "WRITE_LSE": False, **gf.LAUNCH_OPTIONS,
    }
    assert gf.LAUNCH_OPTIONS == {"num_warps": 4, "maxnreg": 168, "enable_fp_fusion": True}


@pytest.mark.parametrize("as_list", [False, True])
def test_dense_call_as_a_list_visits_every_tile_once(monkeypatch, as_list):
    """With dense_list (by default where dense_as_list holds: head dim 64 from Triton 3.9), a dense
    call runs the list build over every k-tile once, marks nothing, and leaves the caller's
    statistics alone."""
    arguments = []
    launches = record_launches(monkeypatch, arguments)
    q = torch.zeros(1, 256, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    k = torch.zeros(1, 1000, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    stats = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    geometry = TileGeometry(256, 1000, 128, 64)
    gluon_forward(
        q, k, k, geometry, scale=1.0, threshold=-10.0, bits=None, work=None,
        stats=stats, return_lse=False, dense_list=as_list,
    )
    ((_, options),), (args,) = launches, arguments
    assert (options["USE_LIST"], options["MARK"]) == (as_list, False)
    if as_list:
        entries, counts = args[6], args[7]  # 16 k-tiles of 64 keys (the last one partial) per row
        assert counts.tolist() == [[[16, 16]] * 2]
        assert torch.equal(entries.sort(dim=-1).values.cpu(), torch.arange(16, dtype=torch.int32).expand(1, 2, 2, 16))
    assert stats.tolist() == [0, 0, 0]
    # A mask to mark into is not a dense call: without its work list it is still refused.
    with pytest.raises(ValueError, match="marking needs a work list"):
        gluon_forward(
            q, k, k, geometry, scale=1.0, threshold=-10.0,
            bits=torch.zeros(geometry.mask_shape(1, 2), dtype=torch.int32, device=DEVICE), work=None, stats=stats,
            return_lse=False, dense_list=as_list,
        )


def test_dense_calls_take_the_list_build_at_head_dim_64_from_triton_3_9():
    assert (gf.dense_as_list(64), gf.dense_as_list(128)) == (kernels.TRITON_VERSION >= (3, 9), False)


@pytest.mark.parametrize("programs, grid", [(None, 132), (3, 3), (1000, 320)])
def test_persistent_grid_has_a_program_per_sm_at_most_one_per_q_tile(monkeypatch, programs, grid):
    launches = record_launches(monkeypatch)
    q = torch.zeros(1, 1024, 40, 64, dtype=torch.bfloat16, device=DEVICE)  # 40 heads x 8 q-tiles = 320 q-tiles
    gluon_forward(
        q, q, q, TileGeometry(1024, 1024, 128, 64), scale=1.0, threshold=-10.0, bits=None, work=None,
        stats=torch.zeros(3, dtype=torch.int64, device=DEVICE), return_lse=False, programs=programs,
    )
    assert [launch[0] for launch in launches] == [(grid,)]


def test_persistent_grid_of_no_programs_is_refused():
    q = torch.zeros(1, 256, 1, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="programs: expected at least 1; got 0"):
        gluon_forward(
            q, q, q, TileGeometry(256, 256, 128, 64), scale=1.0, threshold=-10.0, bits=None, work=None,
            stats=torch.zeros(3, dtype=torch.int64, device=DEVICE), return_lse=False, programs=0,
        )


def record_launches(monkeypatch, arguments: list | None = None) -> list[tuple[tuple[int], dict]]:
    """The grid and options of each launch of the attention kernel, which a stand-in records (and
    the pass that applies verdicts is skipped), on a device of 132 SMs; each launch's positional
    arguments go into ``arguments`` when it is given. The planner still runs (a dense call at head
    dim 64 plans its list from Triton 3.9), so callers put their tensors on DEVICE."""
    launches, skipped = [], []

    class Recorder:
        def __init__(self, into: list, args_into: list | None = None):
            self.into, self.args_into = into, args_into

        def __getitem__(self, grid):
            def launch(*args, **options):
                self.into.append((grid, options))
                if self.args_into is not None:
                    self.args_into.append(args)

            return launch

    monkeypatch.setattr(gf, "_sm_count", lambda device: 132)
    monkeypatch.setattr(gf, "_gluon_attention_fwd", Recorder(launches, arguments))
    monkeypatch.setattr(gf, "_apply_verdicts", Recorder(skipped))
    return launches


@pytest.mark.parametrize("threshold, above_max", [(-1.0, False), (0.0, False), (2.0, True), (-math.inf, False)])
def test_positive_threshold_selects_marking_above_the_running_max(monkeypatch, threshold, above_max):
    """Only a threshold > 0 can mark a tile whose max is above the running max before it, and only
    then does a step of two tiles reduce the first tile's max on its own (the kernel's ABOVE_MAX)."""
    launches = record_launches(monkeypatch)
    geometry = TileGeometry(256, 256, 128, 64)
    q = torch.zeros(1, 256, 2, 128, dtype=torch.bfloat16, device=DEVICE)
    rows = 2 * geometry.q_tiles
    bits = torch.zeros(geometry.mask_shape(1, 2), dtype=torch.int32, device=DEVICE)
    work = WorkList(
        torch.zeros(rows, geometry.k_tiles, dtype=torch.int32, device=DEVICE),
        torch.zeros(rows, dtype=torch.int32, device=DEVICE),
    )
    gluon_forward(
        q, q, q, geometry, scale=1.0, threshold=threshold, bits=bits, work=work,
        stats=torch.zeros(3, dtype=torch.int64, device=DEVICE), return_lse=False,
    )
    ((_, options),) = launches
    assert options["MARK"] == (threshold != -math.inf) and options["ABOVE_MAX"] == above_max


ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel runs on sm_90 only")
@pytest.mark.parametrize("block_n, head_dim", [(64, 128), (128, 128), (64, 64), (128, 64)])
@pytest.mark.parametrize(
    "seq_q, seq_k, must_do, must_skip, marked, threshold",
    [
        (1000, 1000, (), (), 0.0, -1.0),  # partial last q-tile and k-tile
        (300, 2100, ((0, 77),), (), 0.5, -1.0),  # Sq != Sk, must-do keys inside the first tile
        (640, 4096, ((4000, 4096),), ((0, 256),), 0.97, -1.0),  # near-full mask: 1 to 6 tiles per row
        (257, 330, (), (), 0.3, -1.0),  # the last q-tile's diagonal tile is the partial last k-tile: visited first
        (256, 8133, (), (), 0.02, -1.0),  # 128 k-tiles of 64 keys, 2% pre-marked: several verdict groups, odd and even counts
        # A positive threshold marks tiles up to 3 above the running max, but not a strong tile 7
        # above a weak diagonal tile visited just before it (in the same step with 64-key tiles).
        (4096, 4096, (), (), 0.0, 3.0),
    ],
)
@pytest.mark.parametrize("programs", [None, 3], ids=["program-per-sm", "3-programs"])
def test_gluon_matches_portable_kernel(programs, block_n, head_dim, seq_q, seq_k, must_do, must_skip, marked, threshold):
    """Output, LSE, marks and statistics of the Gluon kernel equal the portable kernel's (which the
    semantics tests hold to the reference) on the cases those tests reach only at small tiles; with
    3 persistent programs, each takes several q-tiles in turn (the K/V ring, the Q buffers and the
    ping-pong turns run on from one to the next)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, heads = 2, 3
    q = 2 * torch.randn(batch, seq_q, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(batch, seq_k, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    # Weak keys in the second half: every row finds their tiles far below a strong tile's maximum
    # (gap about -7 against a threshold of -1), so they are marked with a wide margin whenever a
    # strong tile was visited first.
    k[:, seq_k // 2 :] *= 0.05
    geometry = TileGeometry(seq_q, seq_k, 128, block_n)
    mask = torch.rand(batch, heads, geometry.q_tiles, geometry.k_tiles, device="cuda", generator=gen) < marked
    tuning = {} if programs is None else {"programs": programs}
    results = []
    for kernel, options in (("portable", {}), ("gluon", tuning)):
        bits = pack_bits(mask)
        out, lse, stats = kernels.forward(
            q, k, v, geometry, scale=head_dim**-0.5, threshold=threshold, bits=bits, must_do=must_do,
            must_skip=must_skip, return_lse=True, kernel=kernel, **options,
        )
        results.append((out.float(), lse, bits, stats))
    assert_same_results(*results)


def assert_same_results(portable, gluon):
    """The two kernels' (output, LSE, marks, statistics) from the same marked tiles with marking
    on: the same marks and statistics, which include new marks, and the same LSE and output in
    the rows with a computed key (NaN in both elsewhere)."""
    (out_t, lse_t, bits_t, stats_t), (out_g, lse_g, bits_g, stats_g) = portable, gluon
    assert torch.equal(bits_g, bits_t) and torch.equal(stats_g, stats_t)
    assert stats_t[2] > 0  # the case does mark (checked with the portable kernel on the CPU)
    computed = torch.isfinite(lse_t)  # rows with no computed key are NaN in both
    assert torch.equal(computed, torch.isfinite(lse_g))
    torch.testing.assert_close(lse_g[computed], lse_t[computed], atol=2e-3, rtol=0)
    rows = computed.transpose(1, 2)  # (B, Sq, H), like the output's leading dims
    torch.testing.assert_close(out_g[rows], out_t[rows], atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel runs on sm_90 only")
@pytest.mark.parametrize("block_n, head_dim", [(64, 128), (128, 128), (64, 64)])
def test_persistent_programs_change_no_bit_of_dense_mode(block_n, head_dim):
    """Dense mode (no list, no state) with one program taking every q-tile, or three taking them
    in turn, gives the very output and LSE of a program per q-tile: a q-tile's arithmetic does not
    depend on which program runs it or what it ran before."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(2, 1000, 3, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    geometry = TileGeometry(1000, 1000, 128, block_n)
    results = [
        gluon_forward(
            q, k, v, geometry, scale=head_dim**-0.5, threshold=-math.inf, bits=None, work=None,
            stats=torch.zeros(3, dtype=torch.int64, device="cuda"), return_lse=True, programs=programs,
        )
        for programs in (None, 1, 3)
    ]
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])
    assert torch.isfinite(results[0][0]).all()


@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel runs on sm_90 only")
@pytest.mark.parametrize("programs", [None, 3], ids=["program-per-sm", "3-programs"])
def test_q_tiles_with_nothing_to_compute_pass_their_turn(programs):
    """Every other q-tile's work list is emptied (count 0, which plan_work never lists, since the
    anchor tile is always computed, but the kernels take): the producer hands it over without a
    Q copy, and its rows come out as the portable kernel's (no computed key: NaN), while the
    q-tiles around it compute and mark as usual. Wired by hand: the front door cannot make it."""
    from liteattention.kernels import plan_work
    from liteattention.kernels.triton_forward import triton_forward
    from liteattention.plan import range_words

    gen = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(2, 1000, 3, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    k[:, 500:] *= 0.05
    geometry = TileGeometry(1000, 1000, 128, 64)
    results = []
    for forward in (triton_forward, functools.partial(gluon_forward, programs=programs)):
        bits = torch.zeros(geometry.mask_shape(2, 3), dtype=torch.int32, device="cuda")
        stats = torch.zeros(3, dtype=torch.int64, device="cuda")
        work = plan_work(bits, *range_words(geometry, (), (), q.device), geometry, stats)
        work.counts[:, :, ::2] = 0
        out, lse = forward(
            q, k, v, geometry, scale=0.125, threshold=-1.0, bits=bits, work=work, stats=stats, return_lse=True,
        )
        results.append((out.float(), lse, bits, stats))
    assert_same_results(*results)
    assert torch.isnan(results[1][0][:, :128]).all()  # q-tile 0 of every head computed nothing
    torch.testing.assert_close(results[1][0], results[0][0], atol=2e-2, rtol=2e-2, equal_nan=True)

