"""Context parallelism on the CPU: diffusers' enable_parallelism (gloo, 2 and 4 processes) on a tiny
Wan transformer with apply_lite_attention, against one process.

Ulysses: every rank's masks are the single-process masks of its heads, and the output is the
single-process output. Ring: masks are per (query shard, key/value shard), the marking rule's running
maximum restarting at each shard; checked exactly against that definition run in one process (layer 0,
whose inputs do not depend on earlier marks), and the merged output against one process: equal where
nothing is skipped yet, within a bound once tiles are skipped.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from liteattention import SkipState, lite_attention
from liteattention.integrations import apply_lite_attention

BLOCK = 16
HEADS = 4
TIMESTEPS = (999.0, 800.0, 600.0)
THRESHOLD = 0.0  # marks tiles on random weights (near-uniform attention)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model_and_inputs():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    ).eval()
    g = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 4, 2, 16, 16, generator=g), "encoder_hidden_states": torch.randn(1, 16, 32, generator=g)}
    return model, inputs


def _run(model, inputs, threshold):
    """Three steps; per step the output and the masks after it."""
    return _run_with(apply_lite_attention(model, threshold, block_m=BLOCK, block_n=BLOCK), model, inputs)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # diffusers 0.42 places each rank on accelerator `rank % device_count()`, which divides by zero on a
    # CPU-only machine, and its context-parallel hook calls a logger method that does not exist
    # (warning_once) for Wan 2.1's 1-D timestep: test-only stand-ins for both.
    torch.accelerator.device_count = lambda: 1
    import diffusers.hooks.context_parallel as context_parallel
    from diffusers import ContextParallelConfig

    context_parallel.logger.warning_once = context_parallel.logger.info
    results = {}
    for mode, threshold in (("ulysses", THRESHOLD), ("ring", THRESHOLD), ("ring-dense", -math.inf)):
        model, inputs = _model_and_inputs()
        degree = {"ulysses_degree": world} if mode == "ulysses" else {"ring_degree": world}
        model.enable_parallelism(config=ContextParallelConfig(**degree))
        results[mode] = _run(model, inputs, threshold)
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single():
    """The same model and inputs in one process, and layer 0's q, k, v at the first step."""
    model, inputs = _model_and_inputs()
    captured = {}

    def capture(run, layer, q, k, v, **kwargs):
        captured.setdefault(layer, (q, k, v))
        return run(layer, q, k, v, **kwargs)

    handle = apply_lite_attention(model, THRESHOLD, block_m=BLOCK, block_n=BLOCK)
    with handle.intercept(capture):
        lite = _run_with(handle, model, inputs)
    handle.remove()
    dense = _run(model, inputs, -math.inf)
    return {"lite": lite, "dense": dense, "qkv": captured[0]}


def _run_with(handle, model, inputs):
    outs, masks = [], []
    for t in TIMESTEPS:
        with torch.no_grad():
            outs.append(model(**inputs, timestep=torch.full((1,), t), return_dict=False)[0])
        masks.append(handle.masks())
    return {"outs": outs, "masks": masks, "stats": handle.stats()}


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_one_process(world: int, single, tmp_path: Path) -> None:
    out = str(tmp_path / "rank")
    sys.path.insert(0, str(Path(__file__).parent))  # the workers import this module by name
    mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(world)]
    lite, dense = single["lite"], single["dense"]

    # Ulysses: each rank holds the whole sequence for HEADS / world heads.
    per_rank = HEADS // world
    for rank, result in enumerate(ranks):
        got = result["ulysses"]
        for step in range(len(TIMESTEPS)):
            torch.testing.assert_close(got["outs"][step], lite["outs"][step], rtol=1e-4, atol=1e-5)
            for layer, mask in got["masks"][step].items():
                heads = slice(rank * per_rank, (rank + 1) * per_rank)
                assert torch.equal(mask, lite["masks"][step][layer][:, heads]), (rank, step, layer)
    for layer, per_step in lite["stats"][0].items():  # equal shares of the tiles: the mean is the whole
        mean = [sum(r["ulysses"]["stats"][0][layer][s] for r in ranks) / world for s in range(len(TIMESTEPS))]
        assert mean == pytest.approx(per_step)

    # Ring, nothing marked: the shards merged by their LSE are dense attention.
    for result in ranks:
        for got, expected in zip(result["ring-dense"]["outs"], dense["outs"], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert all(s == [0.0] * len(TIMESTEPS) for s in result["ring-dense"]["stats"][0].values())

    # Ring with marking: layer 0's masks after the first step are the per-(q shard, kv shard) definition.
    q, k, v = single["qkv"]
    seq = q.shape[1]
    shard = seq // world
    for rank, result in enumerate(ranks):
        got = result["ring"]
        rows = q[:, rank * shard : (rank + 1) * shard]
        expected = []
        for j in range(world):  # key order
            keys = slice(j * shard, (j + 1) * shard)
            state = SkipState.for_inputs(rows, k[:, keys], BLOCK, BLOCK)
            lite_attention(rows, k[:, keys], v[:, keys], state, threshold=THRESHOLD)
            expected.append(state.mask())
        assert torch.equal(got["masks"][0][0], torch.cat(expected, dim=-1)), rank
        assert got["masks"][-1][0].shape == (1, HEADS, shard // BLOCK, seq // BLOCK)
        # The first step skips nothing: the output is exact. Later steps skip different tiles than one
        # process (the running maximum restarts per shard), within the error marking allows.
        torch.testing.assert_close(got["outs"][0], dense["outs"][0], rtol=1e-4, atol=1e-5)
        for step in range(1, len(TIMESTEPS)):
            err = ((got["outs"][step] - dense["outs"][step]).norm() / dense["outs"][step].norm()).item()
            assert err < 2e-2, (rank, step, err)
        assert all(s[0] == 0.0 for s in got["stats"][0].values())
    # Small shards keep fewer tiles markable (each q-tile's first visited tile per shard never is).
    assert any(s[-1] > 0.0 for r in ranks for s in r["ring"]["stats"][0].values())
