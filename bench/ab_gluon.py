"""A/B of Gluon kernel versions on one GPU: the current module against saved copies of it.

Each baseline is a copy of ``gluon_forward.py`` from another commit, e.g.

    git show 9227b09:src/liteattention/kernels/gluon_forward.py > /tmp/gluon_v9.py
    PYTHONPATH=src python bench/ab_gluon.py /tmp/gluon_v9.py [--shapes 1,40,32760,128;1,24,54256,128]

With no baseline it times the current kernel alone, which is how bench/run_h200.sh uses it to show
where a first step's time goes.

For each shape, outputs, marks and statistics of every version are first compared with the current
one's (each with its verdict scratch poisoned first, so that a verdict word a version leaves
unwritten shows in its marks); then every version and case is timed in one interleaved run
(liteattention.bench.interleaved_ms). Cases, as ratios to the version's own dense mode (what a
dense call runs: from Triton 3.9 at head dim 64, the list build, gluon_forward.dense_as_list):
dense again (the noise floor), the dense build itself where a version can be asked for it, the
work list (planned in the call) with marking off, the same tiles as a precomputed ascending list,
the precomputed list with marking on, a first step (zero mask, planner, marking), and random masks
(--sparsities) with marking on; then the planner alone, in ms.
``--clock-log`` records nvidia-smi's SM clock and power samples while the timing runs.

``--ncu-mode dense|list|mark`` instead launches the current kernel twice in that mode and exits, for
``ncu --launch-skip 1 --launch-count 1`` to profile the second launch.
``--kernel-times`` instead prints, for the current kernel, the device time of each kernel a call
launches (torch.profiler): the attention kernel, the pass that applies the verdicts, the planner.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import math
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from liteattention.bench import interleaved_ms, make_mask
from liteattention.kernels import gluon_forward
from liteattention.kernels import WorkList, plan_work
from liteattention.plan import range_words
from liteattention.state import TileGeometry, pack_bits


def load_version(path: Path) -> ModuleType:
    """Import a copy of gluon_forward.py as a sibling module (its relative imports then resolve)."""
    name = f"liteattention.kernels.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Shape:
    """Random bf16 q, k, v of one shape, its 128x64 geometry, and the kernel launch in each mode."""

    def __init__(self, b: int, h: int, s: int, d: int):
        gen = torch.Generator(device="cuda").manual_seed(0)
        self.q, self.k, self.v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        self.g = TileGeometry(s, s, 128, 64)
        self.zero = torch.zeros(self.g.mask_shape(b, h), dtype=torch.int32, device="cuda")
        self.do_words, self.skip_words = range_words(self.g, (), (), self.q.device)
        self.stats = torch.zeros(3, dtype=torch.int64, device="cuda")

    def plan(self, bits: torch.Tensor) -> WorkList:
        return plan_work(bits, self.do_words, self.skip_words, self.g, self.stats)

    def call(self, module: ModuleType, bits=None, threshold=-math.inf, work=None, use_list=True, **options) -> torch.Tensor:
        """Dense mode (use_list=False); else the given work list, or one planned from bits (zero when
        None), marking into bits when they are given and threshold > -inf. ``options`` go to
        gluon_forward (dense_list=False: the dense build even where dense calls take the list's)."""
        if use_list and work is None:
            work = self.plan(bits if bits is not None else self.zero)
        return module.gluon_forward(
            self.q, self.k, self.v, self.g, scale=self.q.shape[-1] ** -0.5, threshold=threshold,
            bits=bits if use_list else None, work=work if use_list else None, stats=self.stats, return_lse=False,
            **options,
        )[0]


def poison_verdict_scratch(shape: Shape) -> None:
    """Free a block of the verdict scratch's size holding all-negligible words, which the caching
    allocator hands to the next call's scratch (torch.empty): a version that leaves a group's word
    unwritten then marks that group's tiles, instead of reusing the words of the version before."""
    batch, _, heads, _ = shape.q.shape
    torch.full(gluon_forward.verdicts_shape(batch, heads, shape.g), -1, dtype=torch.int32, device="cuda")


def check(shape: Shape, versions: dict[str, ModuleType], masks: dict[float, torch.Tensor]) -> None:
    reference = None
    for name, module in versions.items():
        bits = shape.zero.clone()
        shape.stats.zero_()
        outs = {"dense": shape.call(module, use_list=False).float(), "list": shape.call(module).float()}
        poison_verdict_scratch(shape)
        outs["mark"] = shape.call(module, bits, -1.0).float()
        marks = (bits.clone(), shape.stats.clone())
        outs["s0.5"] = shape.call(module, masks[0.5].clone()).float()
        if reference is None:
            reference = outs, marks
        errors = "  ".join(
            f"{key} {((val - reference[0][key]).nan_to_num().norm() / reference[0][key].nan_to_num().norm()).item():.1e}"
            for key, val in outs.items()
        )
        same = torch.equal(marks[0], reference[1][0]) and torch.equal(marks[1], reference[1][1])
        print(f"  {name:>12}: {errors}  marks {'same' if same else 'DIFFER'} {marks[1].tolist()}", flush=True)


def time_versions(shape: Shape, versions: dict[str, ModuleType], masks: dict[float, torch.Tensor], rounds: int) -> None:
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (shape.q, shape.k, shape.v))
    planned = shape.plan(shape.zero.clone())
    ascending = WorkList(torch.arange(shape.g.k_tiles, dtype=torch.int32, device="cuda").expand_as(planned.entries).contiguous(), planned.counts)
    bits = shape.zero.clone()
    cases = {"cudnn": lambda: F.scaled_dot_product_attention(qt, kt, vt)}
    for name, m in versions.items():
        cases[f"{name}/dense"] = lambda m=m: shape.call(m, use_list=False)
        cases[f"{name}/dense again"] = lambda m=m: shape.call(m, use_list=False)
        if "dense_list" in inspect.signature(m.gluon_forward).parameters:
            cases[f"{name}/dense build"] = lambda m=m: shape.call(m, use_list=False, dense_list=False)
        cases[f"{name}/list"] = lambda m=m: shape.call(m)
        cases[f"{name}/ascending list"] = lambda m=m: shape.call(m, work=ascending)
        cases[f"{name}/list + marking"] = lambda m=m: shape.call(m, bits.zero_(), -10.0, work=planned)
        cases[f"{name}/first step"] = lambda m=m: shape.call(m, bits.zero_(), -10.0)
        for sparsity, mask in masks.items():
            cases[f"{name}/s={sparsity}"] = lambda m=m, mask=mask: shape.call(m, bits.copy_(mask), -10.0)
    cases["planner"] = lambda: shape.plan(shape.zero)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        times = {key: statistics.median(ts) for key, ts in interleaved_ms(cases, rounds).items()}
    print(f"  cuDNN {times['cudnn']:.3f} ms, planner alone {times['planner']:.3f} ms")
    for name in versions:
        dense = times[f"{name}/dense"]
        ratios = "  ".join(
            f"{case} {times[f'{name}/{case}'] / dense:.3f}"
            for case in ("dense again", "dense build", "list", "ascending list", "list + marking", "first step", *(f"s={sp}" for sp in masks))
            if f"{name}/{case}" in times
        )
        print(f"  {name:>12}: dense {dense:.3f} ms ({dense / times['cudnn']:.3f}x cuDNN)  {ratios}", flush=True)


def kernel_times(shape: Shape, spec: str, calls: int = 10) -> None:
    """Mean device time per call of each kernel that a list call, a list call with marking and a
    first step launch (torch.profiler), to tell the attention kernel's time from its passes'."""
    from torch.profiler import ProfilerActivity, profile

    planned = shape.plan(shape.zero.clone())
    bits = shape.zero.clone()
    cases = {
        "list": lambda: shape.call(gluon_forward),  # planned in the call, as time_versions' "list"
        "list + marking": lambda: shape.call(gluon_forward, bits.zero_(), -10.0, work=planned),
        "first step": lambda: shape.call(gluon_forward, bits.zero_(), -10.0),
    }
    print(f"shape {spec}, Triton {triton.__version__}: device ms per call", flush=True)
    for name, case in cases.items():
        case()  # compiles
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                case()
            torch.cuda.synchronize()
        kernels = sorted(
            ((e.key, e.device_time_total / 1000 / calls) for e in prof.key_averages() if e.device_time_total > 0),
            key=lambda kernel: -kernel[1],
        )
        print(f"  {name:>14}: " + ", ".join(f"{key[:32]} {ms:.3f}" for key, ms in kernels[:3]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("baselines", nargs="*", type=Path, help="copies of gluon_forward.py to compare against")
    parser.add_argument("--shapes", default="1,40,32760,128;1,24,54256,128", help="B,H,S,D;...")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sparsities", default="0.5,0.9", help="random masks timed with marking on (0.5 is also cross-checked)")
    parser.add_argument("--ncu-mode", choices=("dense", "list", "mark"), default=None)
    parser.add_argument("--clock-log", type=Path, default=None, help="file for nvidia-smi's clock and power samples")
    parser.add_argument("--kernel-times", action="store_true", help="each launched kernel's device time, then exit")
    args = parser.parse_args()
    if args.kernel_times:
        for spec in args.shapes.split(";"):
            kernel_times(Shape(*map(int, spec.split(","))), spec)
        return
    if args.ncu_mode:
        shape = Shape(*map(int, args.shapes.split(";")[0].split(",")))
        work = shape.plan(shape.zero)
        for _ in range(2):
            if args.ncu_mode == "dense":
                shape.call(gluon_forward, use_list=False)
            elif args.ncu_mode == "list":
                shape.call(gluon_forward, work=work)
            else:
                shape.call(gluon_forward, shape.zero.clone(), -10.0, work=work)
        torch.cuda.synchronize()
        return
    versions = {"current": gluon_forward} | {path.stem: load_version(path) for path in args.baselines}
    with contextlib.ExitStack() as stack:
        if args.clock_log:
            query = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active"
            log = stack.enter_context(args.clock_log.open("w"))
            smi = stack.enter_context(subprocess.Popen(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv", "-lms", "200"], stdout=log, stderr=subprocess.STDOUT,
            ))
            stack.callback(smi.terminate)  # runs first: the Popen exit then waits for it
        for spec in args.shapes.split(";"):
            run_shape(spec, versions, args)


def run_shape(spec: str, versions: dict[str, ModuleType], args: argparse.Namespace) -> None:
    shape = Shape(*map(int, spec.split(",")))
    print(f"shape {spec} ({shape.g.k_tiles} k-tiles)", flush=True)
    sparsities = sorted({0.5, *map(float, args.sparsities.split(","))})
    masks = {sp: pack_bits(make_mask("random", sp, shape.g, shape.q.shape[0], shape.q.shape[2], shape.q.device)) for sp in sparsities}
    check(shape, versions, masks)
    time_versions(shape, versions, masks, args.rounds)


if __name__ == "__main__":
    main()
