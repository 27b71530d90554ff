"""Step time of a compiled diffusers Wan transformer, with and without LiteAttention.

Random weights, real shapes (``liteattention.models.wan``): by default Wan2.1-1.3B at 480p, 81 frames
(30 layers, 12 heads of 128, ffn 8960, latents (1, 16, 21, 60, 104) -> 32,760 video tokens, 512 text
tokens of 4096). For each variant (dense: diffusers' default attention; lite: apply_lite_attention),
the transformer is compiled (``--compile whole|blocks|none``, ``--mode default|reduce-overhead|max-autotune-no-cudagraphs``)
and run as a pipeline runs it: one call per denoising step under ``cache_context("cond", step_index=i)``.
The first ``--compile-steps`` calls (compilation and the recompile after the masks are allocated) are
timed apart; then ``--steps`` steps are timed one by one (CUDA events), with the sparsity LiteAttention
reached at each. The same random latents feed every step (steady-state timing, not a sampler): the
masks keep growing as they would, from the attention pattern of those inputs. Each variant runs
``--rounds`` times, fresh each time, in ABBA order (dense, lite, lite, dense, ...), so that a clock
that drifts over the run weighs on both alike; a variant's median is over all its timed steps.

    PYTHONPATH=src python bench/compile_step.py --out results/compile-step           # on the GPU
    PYTHONPATH=src python bench/compile_step.py --model tiny --resolution tiny --device cpu --dtype float32 --out /tmp/cs

Prints a table and writes ``compile_step.json`` into ``--out``; the JSON also records the recompiles
and graph breaks dynamo counted per variant.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from liteattention.models.wan import LATENT_SIZES, WAN_MODELS, build_wan, latent_size, wan_architecture, wan_inputs


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(WAN_MODELS), default="wan2.1-1.3b")
    p.add_argument("--resolution", choices=list(LATENT_SIZES), default="480p")
    p.add_argument("--variants", default="dense,lite", help="comma-separated: dense, lite")
    p.add_argument("--threshold", type=float, default=-8.0, help="LiteAttention threshold after the warm-up steps")
    p.add_argument("--warmup-steps", type=int, default=2, help="dense steps (threshold -inf) before marking starts")
    p.add_argument("--compile", choices=("whole", "blocks", "none"), default="whole")
    p.add_argument("--mode", default="default", help="torch.compile mode (default, reduce-overhead, ...)")
    p.add_argument("--compile-steps", type=int, default=3, help="calls before timing (compilation, recompiles)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--rounds", type=int, default=2, help="runs of each variant, in ABBA order")
    p.add_argument("--block-m", type=int, default=None)
    p.add_argument("--block-n", type=int, default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for compile_step.json")
    args = p.parse_args()
    if args.mode == "reduce-overhead" and args.compile == "blocks":
        # Measured on an H100 (docs/perf/compile-step-h100.log): the repeated blocks share one
        # captured graph, whose replay for block i + 1 overwrites block i's output, with or without
        # LiteAttention.
        p.error("--mode reduce-overhead needs --compile whole: repeated blocks share one CUDA graph")
    return args


def build(args: argparse.Namespace):
    architecture, size = wan_architecture(args.model), latent_size(args.resolution)
    dtype = getattr(torch, args.dtype)
    model = build_wan(architecture, args.device, dtype, seed=args.seed)
    return model, wan_inputs(architecture, size, args.device, dtype, seed=args.seed)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_variant(name: str, args: argparse.Namespace) -> dict:
    from torch._dynamo.utils import counters

    from liteattention.integrations import apply_lite_attention

    torch._dynamo.reset()
    counters.clear()
    model, inputs = build(args)
    handle = None
    if name == "lite":
        schedule = [-math.inf] * args.warmup_steps + [args.threshold]
        handle = apply_lite_attention(model, schedule, block_m=args.block_m, block_n=args.block_n)
    compiled = model
    if args.compile == "whole":
        compiled = torch.compile(model, fullgraph=True, mode=args.mode)
    elif args.compile == "blocks":
        model.compile_repeated_blocks(fullgraph=True, mode=args.mode)
    timestep = torch.tensor([999.0], device=args.device)
    cuda = args.device.startswith("cuda")

    def step(i: int) -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        if args.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the last one's outputs may be reused
        with torch.no_grad(), model.cache_context("cond", step_index=i):
            compiled(**inputs, timestep=timestep - i, return_dict=False)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        return time.perf_counter() - t0

    compile_times = [step(i) for i in range(args.compile_steps)]
    times = [step(args.compile_steps + i) for i in range(args.steps)]
    sync(args.device)
    result = {
        "compile_steps_s": compile_times,
        "step_s": times,
        "unique_graphs": counters["stats"]["unique_graphs"],
        "recompiles": sum(counters["recompiles"].values()),
        "graph_breaks": dict(counters["graph_break"]),
    }
    if handle is not None:
        stats = handle.stats()[0]
        per_step = [
            statistics.fmean(s[i] for s in stats.values() if i < len(s) and not math.isnan(s[i]))
            for i in range(args.compile_steps + args.steps)
        ]
        result["sparsity_per_step"] = per_step
        result["sparsity_timed_steps"] = per_step[args.compile_steps :]
        handle.remove()
    return result


def merge(name: str, runs: list[dict]) -> dict:
    """One variant over its runs: the median of all timed steps; the first run's first calls (later
    runs find inductor's cache warm); the most graphs, recompiles and breaks any run saw."""
    first = runs[0]
    result = {
        "variant": name,
        "compile_steps_s": first["compile_steps_s"],
        "median_step_s": statistics.median(t for r in runs for t in r["step_s"]),
        "unique_graphs": max(r["unique_graphs"] for r in runs),
        "recompiles": max(r["recompiles"] for r in runs),
        "graph_breaks": {k: v for r in runs for k, v in r["graph_breaks"].items()},
        "runs": runs,
    }
    if "sparsity_timed_steps" in first:
        result["sparsity_timed_steps"] = first["sparsity_timed_steps"]
    return result


def main() -> None:
    args = parse_args()
    names = args.variants.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(run_variant(name, args))
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()  # the run's model is gone with its frame
    results = [merge(name, runs[name]) for name in names]
    dense = next((r for r in results if r["variant"] == "dense"), None)
    print(f"{args.model} {args.resolution}, compile={args.compile}, mode={args.mode}, device={torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}")
    print("| variant | first calls (s) | median step (s) | vs dense | sparsity (timed steps) | graphs | recompiles | breaks |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = r["median_step_s"] / dense["median_step_s"] if dense else math.nan
        sparsity = r.get("sparsity_timed_steps")
        sparsity = "-" if sparsity is None else f"{sparsity[0]:.2f} -> {sparsity[-1]:.2f}"
        first = " ".join(f"{t:.2f}" for t in r["compile_steps_s"])
        print(f"| {r['variant']} | {first} | {r['median_step_s']:.4f} | {ratio:.3f} | {sparsity} | "
              f"{r['unique_graphs']} | {r['recompiles']} | {len(r['graph_breaks'])} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"args": vars(args), "torch": torch.__version__, "results": results}
    if args.device.startswith("cuda"):
        payload["device"] = torch.cuda.get_device_name()
    (out / "compile_step.json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {out / 'compile_step.json'}")


if __name__ == "__main__":
    main()
