"""``liteattention info`` and ``--version``: what an install runs with, and which kernel runs where."""

import subprocess
import sys
import warnings

import pytest
import torch
import triton

from liteattention import __version__
from liteattention.cli import main
from liteattention.info import kernel_table, quant_support, report


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"liteattention {__version__}"


def test_info_names_versions_and_a_kernel_per_head_dim_and_tile_shape(capsys):
    main(["info"])
    out = capsys.readouterr().out
    assert out == report() + "\n"
    for line in ("liteattention: ", f"torch: {torch.__version__}", f"triton: {triton.__version__}", "GPU: "):
        assert line in out
    assert "head dim  tiles" in out


def test_kernel_choice_on_hopper_and_elsewhere():
    hopper = {(d, tiles): (kernel, why) for d, tiles, kernel, why in kernel_table(torch.device("cuda"), (9, 0))}
    assert hopper[("128", "128x64 (default)")] == ("gluon", f"sm_90 with Triton {triton.__version__}, 128x64 tiles, head dim padded to 128")
    assert hopper[("48", "128x128")][0] == "gluon"
    assert hopper[("256", "64x64 (default)")] == ("portable", "block_m=64: it takes 128-row q-tiles")
    ampere = kernel_table(torch.device("cuda"), (8, 0))
    assert {kernel for _, _, kernel, _ in ampere} == {"portable"}
    assert all(why == "sm_80: the Gluon kernel is built for sm_90 (Hopper)" for *_, why in ampere)


def test_info_says_where_the_8_bit_path_runs():
    assert "runs on the portable kernel" in quant_support(torch.device("cuda"), (9, 0))
    assert "needs FP8 tensor cores" in quant_support(torch.device("cuda"), (8, 0))
    assert "The 8-bit path (quant='qk_int8_pv_fp8')" in report()


def test_the_portable_kernel_is_forced_by_the_environment(monkeypatch):
    monkeypatch.setenv("LITEATTENTION_GLUON", "0")
    assert {why for *_, why in kernel_table(torch.device("cuda"), (9, 0))} == {"LITEATTENTION_GLUON=0 is set"}


def test_commands_without_the_demo_extra_say_what_to_install(tmp_path):
    """With the operator alone installed (here: matplotlib made unimportable in a fresh process),
    demo says which extra to install, instead of a traceback."""
    code = (
        "import sys; sys.modules['matplotlib'] = None; from liteattention.cli import main; "
        f"main(['demo', '--out', {str(tmp_path)!r}])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "liteattention demo needs matplotlib, which the demo extra installs: pip install 'liteattention[demo]'" in result.stderr


def test_a_triton_that_cannot_build_the_gluon_kernel_is_named_once(monkeypatch):
    """Where only the Triton release keeps a Hopper GPU on the portable kernel, the choice says so
    and the warning names the release and the kernel that runs instead, once per reason."""
    from liteattention import kernels
    from liteattention.state import TileGeometry

    why = "Triton 3.5.1 predates the Gluon API the kernel is written for (3.6 on)"
    monkeypatch.setattr(kernels, "_gluon", lambda: (None, why))
    choice = kernels.choose_kernel(torch.device("cuda"), TileGeometry(4096, 4096, 128, 64), 128, (9, 0))
    assert choice == kernels.KernelChoice("portable", why, triton_bound=True)
    kernels._warn_portable_on_hopper.cache_clear()
    with pytest.warns(UserWarning, match="Triton 3.5.1 predates .* the portable Triton kernel runs instead"):
        kernels._warn_portable_on_hopper(why)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels._warn_portable_on_hopper(why)  # once
