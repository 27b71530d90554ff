"""Test setup: run the Triton kernel under the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, hence here.
Set LITEATTENTION_FULL=1 (on a GPU) to add the full-size cases.
"""

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FULL = os.environ.get("LITEATTENTION_FULL") == "1"
REPO = Path(__file__).parents[1]


def compiler_env() -> dict[str, str]:
    """The environment for a subprocess that compiles the real kernels: without TRITON_INTERPRET,
    which would replace their @jit functions with the interpreter's."""
    return {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: the tiny models' reference calls are many small ops, which extra
    threads only slow down (by an order of magnitude when the other core is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
