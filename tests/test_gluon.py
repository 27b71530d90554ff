"""The Gluon (sm_90) kernel off the GPU: it compiles for sm_90 without register spills, and the
pass that turns its verdict words into marks matches a plain computation (under the interpreter
when there is no GPU). On an H200, test_semantics.py runs the kernel itself against the reference."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from conftest import DEVICE
from liteattention.kernels.gluon_forward import GROUP, _apply_verdicts, gluon_forward, gluon_supported
from liteattention.state import TileGeometry

COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from liteattention.kernels import gluon_forward as gf

head_dim, block_n, use_list, mark, even_n, lse = map(int, sys.argv[1:7])
def desc(rows):
    layout = gl.NVMMASharedLayout.get_default_for([rows, head_dim], gl.bfloat16)
    return f"tensordesc<bf16[{rows},{head_dim}],{layout!r}>"
signature = {
    "q_desc": desc(64), "k_desc": desc(block_n), "v_desc": desc(block_n), "Out": "*bf16", "Lse": "*fp32",
    "Verdicts": "*i64", "Entries": "*i32", "Counts": "*i32", "stride_ob": "i32", "stride_os": "i32",
    "stride_oh": "i32", "heads": "i32", "seq_q": "i32", "seq_k": "i32", "k_tiles": "i32", "groups": "i32",
    "qk_scale": "fp32", "threshold": "fp32",
}
constexprs = {
    "STAGES": gf.stages_for(block_n, head_dim), "USE_LIST": bool(use_list), "MARK": bool(mark),
    "WRITE_LSE": bool(lse), "EVEN_N": bool(even_n), "PAIRS": gf.pairs_fit(block_n, head_dim),
}
signature.update({name: "constexpr" for name in constexprs})
source = GluonASTSource(fn=gf._gluon_attention_fwd, signature=signature, constexprs=constexprs)
kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": 168})
open(sys.argv[7], "w").write(kernel.asm["ptx"])
"""


@pytest.mark.parametrize(
    "head_dim, block_n, use_list, mark, even_n, lse",
    [(128, 64, 1, 1, 0, 1), (128, 128, 0, 0, 1, 0)],
    ids=["pairs-marking-partial-lse", "single-dense"],
)
def test_compiles_for_sm90_without_spills(tmp_path: Path, head_dim, block_n, use_list, mark, even_n, lse):
    # A fresh process: the compiler must see the real @gluon.jit functions, not the interpreter's.
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    ptx = tmp_path / "kernel.ptx"
    args = [str(a) for a in (head_dim, block_n, use_list, mark, even_n, lse, ptx)]
    subprocess.run([sys.executable, "-c", COMPILE, *args], env=env, check=True, timeout=600)
    text = ptx.read_text()
    assert "wgmma.mma_async" in text and "setmaxnreg" in text
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        ptxas = shutil.which("ptxas")
        if ptxas is None:
            pytest.skip("no ptxas to count spills")
    report = subprocess.run(
        [str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(tmp_path / "kernel.cubin")],
        capture_output=True, text=True, check=True,
    ).stderr
    assert "0 bytes spill stores, 0 bytes spill loads" in report, report


def test_apply_verdicts_marks_tiles_negligible_for_both_halves():
    geometry = TileGeometry(seq_q=4 * 128, seq_k=150 * 64, block_m=128, block_n=64)
    rows, k_tiles, words = 4, geometry.k_tiles, geometry.words
    groups = triton.cdiv(k_tiles, GROUP.value)
    gen = torch.Generator().manual_seed(1)
    counts = torch.tensor([150, 70, 1, 0], dtype=torch.int32)
    # Each row's visit order is a permutation of its k-tiles; a few entries are must-do (-(kt + 1)).
    entries = torch.stack([torch.randperm(k_tiles, generator=gen) for _ in range(rows)]).to(torch.int32)
    must_do = torch.rand(rows, k_tiles, generator=gen) < 0.1
    entries = torch.where(must_do, -entries - 1, entries)
    verdicts = torch.randint(-(2**62), 2**62, (rows, 2, groups), generator=gen, dtype=torch.int64)
    bits = torch.zeros(rows, words, dtype=torch.int32)
    bits[:, 0] = 1  # an earlier mark stays
    stats = torch.zeros(3, dtype=torch.int64)

    expected = bits.clone()
    newly = 0
    for r in range(rows):
        for pos in range(int(counts[r])):
            word = int(verdicts[r, 0, pos // 64] & verdicts[r, 1, pos // 64])
            kt = int(entries[r, pos])
            if kt >= 0 and (word >> (pos % 64)) & 1:
                expected[r, kt // 32] |= torch.tensor(1 << (kt % 32), dtype=torch.int64).to(torch.int32)
                newly += 1

    args = [t.to(DEVICE) for t in (verdicts, entries, counts, bits, stats)]
    _apply_verdicts[(rows,)](*args, k_tiles, words, groups, GROUP_SIZE=GROUP.value)
    assert newly > 0
    assert torch.equal(args[3].cpu(), expected)
    assert args[4].cpu().tolist() == [0, 0, newly]


def test_gluon_kernel_not_chosen_off_hopper():
    q = torch.zeros(1, 128, 1, 128)
    assert not gluon_supported(q, TileGeometry(128, 128, 128, 64), 128)


@pytest.mark.parametrize("pairs, stages", [(True, 3), (False, 1), (False, 7)])
def test_ring_too_small_or_too_large_is_refused(pairs, stages):
    q = torch.zeros(1, 256, 1, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="stages: expected"):
        gluon_forward(
            q, q, q, TileGeometry(256, 256, 128, 64), scale=1.0, threshold=-10.0, bits=None, work=None,
            stats=torch.zeros(3, dtype=torch.int64), return_lse=False, stages=stages, pairs=pairs,
        )
