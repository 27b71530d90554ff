"""The Gluon kernel's step loop in SASS, on any machine (no GPU): instruction counts per 128-key
step, the longest chain of dependent FMNMX (how the row max is folded), and their difference
against copies of the kernel from other commits, down to the order.

    PYTHONPATH=src python bench/gluon_sass.py --head-dim 128 --mode mark [--partial] [--show]
    git show <commit>:src/liteattention/kernels/gluon_forward.py > /tmp/gluon_old.py
    PYTHONPATH=src python bench/gluon_sass.py /tmp/gluon_old.py --head-dim 64
    PYTHONPATH=src python bench/gluon_sass.py --all --save loops-3.6.json     # under one Triton
    PYTHONPATH=src python bench/gluon_sass.py --all --against loops-3.6.json  # under another

The kernel is compiled for sm_90 (``compile_for_sm90``, which a copy must have: v14 on) and
disassembled with the nvdisasm that Triton ships. The step loop is the smallest loop that issues
wgmma (``HGMMA``) and exponentials (``MUFU.EX2``): one per consumer warpgroup, the same code; the
shorter is shown. Against a copy it also says whether the step loops are the same instruction for
instruction (registers aside) and, if not, where each puts its wgmma: with the same counts, ptxas
may still schedule the wgmma elsewhere, which has moved dense mode by 2-10% at head dim 64
(docs/performance.md, v14 and v15). ``--save`` and ``--against`` do the same across Triton
releases: one run saves the step loops of every build (``--all``) or of one, register-blind, and
a run under another Triton compares its own against them. Fewer instructions is a prediction, not a result: a variant
still has to be timed (bench/ab_gluon.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).parent))
from ab_gluon import load_version  # noqa: E402

from liteattention.kernels import gluon_forward  # noqa: E402

NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
LABEL = re.compile(r"\s*(\.L_x_\d+):")
BACK_BRANCH = re.compile(r"BRA `\((\.L_x_\d+)\)")


def disassemble(module, args: argparse.Namespace) -> str:
    if not hasattr(module, "compile_for_sm90"):
        raise SystemExit(f"{module.__file__}: no compile_for_sm90 (copies from v14 on have it)")
    kernel = module.compile_for_sm90(
        args.head_dim, args.block_n, use_list=args.mode != "dense", mark=args.mode == "mark",
        partial_n=args.partial, lse=args.lse,
    )
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        return subprocess.run([str(NVDISASM), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout


def wgmma_loops(sass: str) -> list[tuple[int, int, list[str]]]:
    """Every loop (a backward branch and its target) whose body holds HGMMA and MUFU.EX2: its first
    and last address and its instructions."""
    instructions: list[tuple[int, str]] = []
    address_of: dict[str, int] = {}
    pending: list[str] = []
    for line in sass.splitlines():
        if label := LABEL.match(line):
            pending.append(label.group(1))
        elif instruction := INSTRUCTION.match(line):
            address = int(instruction.group(1), 16)
            address_of.update((name, address) for name in pending)
            pending.clear()
            instructions.append((address, instruction.group(2)))
    spans = []
    for address, text in instructions:
        branch = BACK_BRANCH.search(text)
        if branch and address_of.get(branch.group(1), address) < address:
            start = address_of[branch.group(1)]
            body = [t for a, t in instructions if start <= a <= address]
            if any("HGMMA" in t for t in body) and any("MUFU.EX2" in t for t in body):
                spans.append((start, address, body))
    return spans


def step_loops(sass: str) -> list[list[str]]:
    """The instructions of each innermost loop with HGMMA and MUFU.EX2, shortest first."""
    spans = wgmma_loops(sass)
    innermost = [
        body for start, end, body in spans
        if not any(start <= s and e <= end and (s, e) != (start, end) for s, e, _ in spans)
    ]
    if not innermost:
        raise RuntimeError("no loop with HGMMA and MUFU.EX2 in the SASS")
    return sorted(innermost, key=len)


def register_blind(loop: list[str]) -> list[str]:
    """The loop with register, predicate and label names and the offsets of kernel parameters in
    the constant bank blanked, to compare two builds' code (the parameters move when an argument
    changes size, e.g. a descriptor of another rank)."""
    return [re.sub(r"\bU?R\d+\b|\bU?P\d\b|\.L_x_\d+|(?<=c\[0x0\]\[)0x[0-9a-f]+(?=\])", "_", text) for text in loop]


def wgmma_positions(loop: list[str]) -> list[int]:
    """Where the loop's HGMMA stand, as indices into its instructions."""
    return [i for i, text in enumerate(loop) if opcode(text) == "HGMMA"]


def longest_chain(loop: list[str], op: str) -> int:
    """The most ``op`` instructions in one pass over the loop that each read what the previous one
    wrote: a reduction folded one value after another is as long as its values, a tree as deep
    as its levels (the row max: FMNMX)."""
    depth: dict[str, int] = {}  # of the chain ending in each register's last write
    longest = 0
    for text in loop:
        operands = re.sub(r"^@!?U?P\w+\s+", "", text).replace(",", " ").split()[1:]
        if not operands:
            continue
        sources = (re.sub(r"^[-|]+|\.reuse$|\|$", "", name) for name in operands[1:])
        depth[operands[0]] = 1 + max(depth.get(name, 0) for name in sources) if opcode(text) == op else 0
        longest = max(longest, depth[operands[0]])
    return longest


def opcode(text: str) -> str:
    """The operation without its predicate and modifiers: '@!P1 FMNMX.FTZ R2, ...' -> 'FMNMX'."""
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


BUILD_OPTIONS = ("head_dim", "block_n", "mode", "partial", "lse")


def builds(args: argparse.Namespace) -> list[argparse.Namespace]:
    """The builds to compare: the one the options name, or with ``--all`` each step loop the kernel
    has: every head dim, tile width and mode (12 builds). A partial last tile and the LSE change
    only the first and last steps and the epilogue, which stand outside the step loop."""
    if not args.all:
        return [args]
    choices = itertools.product((64, 128), (64, 128), ("dense", "list", "mark"), (False,), (False,))
    return [argparse.Namespace(**dict(zip(BUILD_OPTIONS, values))) for values in choices]


def build_name(build: argparse.Namespace) -> str:
    return "-".join(f"{name}={getattr(build, name)}" for name in BUILD_OPTIONS)


def compare_releases(args: argparse.Namespace) -> None:
    """Save this Triton's step loops (``--save``) or compare them with another's (``--against``)."""
    loops = {build_name(b): sorted(map(register_blind, step_loops(disassemble(gluon_forward, b)))) for b in builds(args)}
    if args.save:
        args.save.write_text(json.dumps({"triton": triton.__version__, "loops": loops}))
        print(f"saved the step loops of {len(loops)} build(s) under Triton {triton.__version__} to {args.save}")
        return
    saved = json.loads(args.against.read_text())
    same = 0
    for name, mine in loops.items():
        theirs = saved["loops"].get(name)
        if theirs is None:
            print(f"{name}: not in {args.against}")
        elif theirs == mine:
            same += 1
        else:
            where = [[i for i, t in enumerate(loop) if opcode(t) == "HGMMA"] for loop in (theirs[0], mine[0])]
            sizes = [len(theirs[0]), len(mine[0])]
            print(f"{name}: the step loops differ: {sizes[0]} -> {sizes[1]} instructions, HGMMA at {where[0]} -> {where[1]}")
    print(
        f"Triton {saved['triton']} -> {triton.__version__}: {same} of {len(loops)} build(s) have the same step loops, "
        "instruction for instruction (registers aside)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("baselines", nargs="*", type=Path, help="copies of gluon_forward.py to compare against")
    parser.add_argument("--head-dim", type=int, choices=(64, 128), default=128)
    parser.add_argument("--block-n", type=int, choices=(64, 128), default=64)
    parser.add_argument("--mode", choices=("dense", "list", "mark"), default="mark")
    parser.add_argument("--partial", action="store_true", help="seq_k not a multiple of block_n (masks the ends)")
    parser.add_argument("--lse", action="store_true", help="the variant that also writes the LSE")
    parser.add_argument("--show", action="store_true", help="print the current kernel's step loop")
    parser.add_argument("--all", action="store_true", help="with --save or --against: every build, not the one named")
    releases = parser.add_mutually_exclusive_group()
    releases.add_argument("--save", type=Path, help="write this Triton's step loops to a JSON file")
    releases.add_argument("--against", type=Path, help="compare the step loops with a file --save wrote under another Triton")
    args = parser.parse_args()
    if args.save or args.against:
        if args.baselines:
            parser.error("--save and --against compare across Triton releases, not against copies")
        compare_releases(args)
        return
    versions = {"current": gluon_forward} | {path.stem: load_version(path) for path in args.baselines}
    counts, loops = {}, {}
    for name, module in versions.items():
        loops[name] = step_loops(disassemble(module, args))
        loop = loops[name][0]
        counts[name] = Counter(opcode(t) for t in loop)
        if name == "current" and args.show:
            print("\n".join(loop))
        top = ", ".join(f"{op} {n}" for op, n in counts[name].most_common(12))
        chain = longest_chain(loop, "FMNMX")
        print(f"{name:>12}: step loop {len(loop)} instructions; {top}; longest FMNMX chain {chain}")
    for name, count in list(counts.items())[1:]:
        changed = sorted(op for op in count.keys() | counts["current"].keys() if count[op] != counts["current"][op])
        difference = ", ".join(f"{op} {count[op]} -> {counts['current'][op]}" for op in changed)
        print(f"{name:>12} -> current: {difference or 'the same counts'}")
        if sorted(map(register_blind, loops[name])) == sorted(map(register_blind, loops["current"])):
            print(f"{name:>12} -> current: the same step loops, instruction for instruction (registers aside)")
        else:
            where = {n: wgmma_positions(loops[n][0]) for n in (name, "current")}
            print(f"{name:>12} -> current: the step loops differ; HGMMA at {where[name]} -> {where['current']}")


if __name__ == "__main__":
    main()
