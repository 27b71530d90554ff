"""Test setup: run the Triton kernel under the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, hence here.
Set LITEATTENTION_FULL=1 (on a GPU) to add the full-size cases.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FULL = os.environ.get("LITEATTENTION_FULL") == "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
