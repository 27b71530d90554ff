"""The differences between the Triton releases the kernels support (3.6 to 3.9), in one place.

Gluon, Triton's lower-level dialect that the sm_90 kernel is written in, is experimental: names
move between releases. Everything a kernel needs that differs by release is resolved here once,
at import, so the kernels themselves read the same on every release.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from .common import TRITON_VERSION

# A barrier over the threads of one partition: `thread_barrier` in 3.6, `barrier` from 3.7 on.
thread_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier

# Whether mbarrier.arrive first syncs the partition that calls it (then one thread arrives): from
# 3.8 on it does (triton-lang/triton#10168); up to 3.7 one thread arrives at once.
ARRIVE_SYNCS_PARTITION = gl.constexpr(TRITON_VERSION >= (3, 8))


@gluon.jit
def arrive_when_all_past(bar):
    """Arrive once on ``bar`` after every thread of the calling partition got here (so that all of
    their reads of the buffers it guards are done). The barrier is ours only up to 3.7: on 3.8 and
    later the arrive brings its own, and a second one would cost a bar.sync per step."""
    if not ARRIVE_SYNCS_PARTITION:
        thread_barrier()
    mbarrier.arrive(bar, count=1)

# A TMA copy from global to shared memory: `async_copy_global_to_shared` up to 3.7, `async_load`
# from 3.8 on (3.9 keeps the old name only to raise).
tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared


def sm90_ptxas() -> str:
    """The ptxas that Triton builds sm_90 code with: its older bundled one up to 3.8, the newer one
    it names ptxas-blackwell from 3.9 on (which alone reads the PTX version 3.9 writes)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).path
