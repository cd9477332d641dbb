"""Reading arrays back to the host when they may span processes (`jax.distributed` runs).

On one process `jax.device_get` reads any array. Across processes an array sharded over devices
that other processes own cannot be read locally; `process_allgather` gathers it (a collective:
every process must make the same call, as every process runs the same launcher code).
"""

from __future__ import annotations

from typing import Any

import jax


def gathered(x: Any) -> Any:
    """`x`, with an array sharded across processes replaced by its gathered global value."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(x, tiled=True)
    return x


def device_get(tree: Any) -> Any:
    """`jax.device_get` that also works on arrays sharded across processes."""
    return jax.device_get(jax.tree.map(gathered, tree))
