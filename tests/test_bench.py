"""The benchmark's CPU-safe parts: mask generation, reports, plot, argument checks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, compiler_env

from liteattention.bench import SPARSITIES, BenchRow, interleaved_ms, make_mask, markdown_table, plot, run_bench, summarize
from liteattention.cli import build_parser, main
from liteattention.state import TileGeometry

GEOMETRY = TileGeometry(4096, 4096, 128, 64)


@pytest.mark.parametrize("pattern", ["random", "banded"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_masks_have_the_requested_sparsity(pattern, sparsity):
    mask = make_mask(pattern, sparsity, GEOMETRY, 1, 8, torch.device("cpu"))
    assert mask.shape == (1, 8, GEOMETRY.q_tiles, GEOMETRY.k_tiles) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - sparsity) < 0.02


def test_banded_mask_keeps_the_diagonal_and_is_balanced():
    mask = make_mask("banded", 0.75, GEOMETRY, 1, 1, torch.device("cpu"))[0, 0]
    diag = GEOMETRY.diagonal_tiles()
    assert not mask[torch.arange(GEOMETRY.q_tiles), diag].any()
    kept = (~mask).sum(-1)
    assert kept.min() == kept.max()  # every q-tile does the same work
    with pytest.raises(ValueError, match="pattern must be one of"):
        make_mask("checker", 0.5, GEOMETRY, 1, 1, torch.device("cpu"))


def fake_rows():
    rows = []
    for method, ms in (("ours-dense", 10.0), ("ours-first", 10.5), ("sdpa-cudnn", 9.0), ("sdpa-flash", 14.0), ("flex-dense", 12.0)):
        rows.append(BenchRow("demo", method, "-", 0.0, 0.0, ms, 1.0, 1.0))
    for s in SPARSITIES:
        rows.append(BenchRow("demo", "ours", "random", s, s, 10.0 * (1 - s) + 0.1, 1.0, 1.0))
        rows.append(BenchRow("demo", "flex", "random", s, s, 12.0 * (1 - s) + 0.1, 1.0, 1.0))
    return rows


def test_reports(tmp_path):
    rows = fake_rows()
    (line,) = summarize(rows)
    assert "dense/cuDNN 1.111" in line and "first/dense 1.050" in line and "random@0.50: 0.510 (<= 0.53 ok" in line
    table = markdown_table(rows).splitlines()
    assert len(table) == 3 and table[2].startswith("| demo | 9.00 | 14.00 | 12.00 | 10.00 | 1.11 | 1.05 | 0.51 | 0.11 |")
    plot(rows, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_cli_and_argument_checks():
    args = build_parser().parse_args(["bench", "--shapes", "ltx", "--sparsities", "0,0.5", "--no-flex"])
    assert args.shapes == ["ltx"] and args.sparsities == [0.0, 0.5] and args.no_flex
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            run_bench(["ltx"])


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "bench").glob("*.py")))
def test_bench_scripts_import_and_parse_options(script):
    """The GPU-only scripts in bench/ cannot run here, but they import and print their options:
    an API change that breaks one shows up on the CPU."""
    command = [sys.executable, str(REPO / "bench" / script), "--help"]
    result = subprocess.run(command, env=compiler_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


def test_cli_options_load_without_the_model_stack():
    """Building the command line (every subcommand's options) imports neither diffusers nor the
    plotting stack: ``liteattention bench`` and ``--help`` start fast and work without them."""
    code = (
        "import sys, liteattention.cli as cli; cli.build_parser().parse_args(['demo', '--steps', '3']); "
        "print(sorted(m for m in ('diffusers', 'matplotlib', 'skimage') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shapes", "wan14b-480p,sdxl"], "--shapes: unknown ['sdxl']"),
        (["--patterns", "stripes"], "--patterns: expected names from random,banded"),
        (["--sparsities", "0.5,1"], "--sparsities: each must lie in [0, 1)"),
        (["--rounds", "0"], "--rounds: expected at least 1, got 0"),
    ],
)
def test_cli_bench_bad_options_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2  # argparse's usage error, before any GPU work
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times with CUDA events")
def test_interleaved_timing_gives_one_sample_per_round_and_case():
    x = torch.randn(2048, 2048, device="cuda")
    calls = {"one": 0, "two": 0}

    def case(name, matmuls):
        def call():
            calls[name] += 1
            for _ in range(matmuls):
                x @ x

        return call

    times = interleaved_ms({"one": case("one", 1), "two": case("two", 2)}, rounds=4, sample_ms=1.0)
    assert {name: len(ts) for name, ts in times.items()} == {"one": 4, "two": 4}
    assert all(t > 0 for ts in times.values() for t in ts)
    assert calls["one"] >= 4 + 4 and calls["two"] >= 4 + 4  # warm-up and estimate, then the samples
