"""DeepSpeed's JIT-compiled ops (CPU Adam for optimizer offload from GPUs, the shared-memory collective of CPU
ranks), compiled once into the shared extensions folder.

DeepSpeed JIT-compiles CPU Adam (1-2 minutes) through torch.utils.cpp_extension.load into
`$TORCH_EXTENSIONS_DIR/cpu_adam`, guarded by torch's FileBaton: a `lock` file created when a build starts and removed
when it ends. Every rank of a node asks for the op at the same moment; the first builds and the others poll until
`lock` is gone. A build killed in between (preemption, Ctrl-C, a time limit) leaves `lock` behind, and every later
start then waits on it forever, silently. hpcds builds under an fcntl lock of its own next to the build folder: the
kernel releases it when its holder dies, however it dies, so a process holding it knows that no hpcds build is
running and that a baton `lock` it finds is stale. Ranks that wait for the lock then load the finished op.
"""

from __future__ import annotations

import fcntl
import sys
from pathlib import Path

BATON = "lock"  # torch.utils.cpp_extension's FileBaton file in the build folder


def load_cpu_adam():
    """DeepSpeed's CPU Adam op module and whether this call compiled it (False: prebuilt, or built before)."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    return load_op(CPUAdamBuilder())


def load_op(builder):
    """`builder.load()` for a DeepSpeed op builder, one process per extensions folder at a time, a stale baton
    removed. Returns (op module, compiled here)."""
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(builder.name, False):  # compiled into the DeepSpeed install: nothing to build
        return builder.load(verbose=False), False
    from torch.utils.cpp_extension import _get_build_directory

    # The same folder torch builds in: $TORCH_EXTENSIONS_DIR/<name>, or torch's default root (it creates it).
    build_dir = Path(_get_build_directory(builder.name, verbose=False))
    with open(build_dir.parent / f"{builder.name}.hpcds-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # the others of this node wait here while one builds
        try:
            baton = build_dir / BATON
            if baton.exists():
                print(
                    f"removing {baton}, left by a build of DeepSpeed's {builder.name} op that was killed",
                    file=sys.stderr,
                    flush=True,
                )
                baton.unlink(missing_ok=True)
            compiled = not any(build_dir.glob(f"{builder.name}*.so"))
            return builder.load(verbose=False), compiled
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
