"""``liteattention info``: the versions this install runs with, the GPU, and which attention
kernel each head dim and tile shape gets, and why."""

from __future__ import annotations

import platform
from importlib import metadata

import torch

from .quantize import QUANT_MODES
from .state import TileGeometry, default_block_sizes

HEAD_DIMS = (32, 48, 64, 80, 96, 128, 192, 256)
TILE_SHAPES = ((128, 64), (128, 128), (64, 64))


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    return {
        "liteattention": _version("liteattention"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "CUDA (torch build)": torch.version.cuda or "none (a CPU build)",
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
    }


def kernel_table(device: torch.device, capability: tuple[int, int] | None) -> list[tuple[str, str, str, str]]:
    """(head dim, tiles, kernel, why) for each head dim and tile shape, on ``device`` (or a CUDA
    device of ``capability``)."""
    from .kernels import choose_kernel, kernel_head_dim

    rows = []
    for head_dim in HEAD_DIMS:
        default = default_block_sizes(head_dim)
        for block_m, block_n in dict.fromkeys((default, *TILE_SHAPES)):
            tiles = f"{block_m}x{block_n}" + (" (default)" if (block_m, block_n) == default else "")
            choice = choose_kernel(device, TileGeometry(4096, 4096, block_m, block_n), kernel_head_dim(head_dim), capability)
            rows.append((str(head_dim), tiles, choice.kernel, choice.reason))
    return rows


def report() -> str:
    lines = [f"{name:>19}: {value}" for name, value in versions().items()]
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        major, minor = torch.cuda.get_device_capability(device)
        lines.append(f"{'GPU':>19}: {torch.cuda.get_device_name(device)} (sm_{major}{minor})")
        capability, where = None, f"on {device}"
    else:
        lines.append(f"{'GPU':>19}: none; CPU tensors run the reference backend (the Triton kernel only under TRITON_INTERPRET=1)")
        device, capability, where = torch.device("cuda"), (9, 0), "on a Hopper GPU (sm_90), had this machine one"
    if _version("triton") == "not installed":
        lines.append("\nNo Triton: CUDA tensors cannot run the kernels (backend='reference' still works).")
        return "\n".join(lines)
    lines.append(f"\nThe kernel each call gets {where} (bf16/fp16 inputs):")
    rows = [("head dim", "tiles", "kernel", "why"), *kernel_table(device, capability)]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3] for row in rows]
    lines.append(f"\nThe 8-bit path (quant={QUANT_MODES[0]!r}) {where}: {quant_support(device, capability)}")
    return "\n".join(lines)


def quant_support(device: torch.device, capability: tuple[int, int] | None) -> str:
    from .kernels import choose_kernel

    try:
        return choose_kernel(device, TileGeometry(4096, 4096, 128, 64), 128, capability, quant=QUANT_MODES[0]).reason
    except ValueError as error:
        return str(error)


def main() -> None:
    print(report())
