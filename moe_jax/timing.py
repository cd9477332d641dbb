"""Wall-clock timing of (jitted) calls: one compiling warm-up each, then the median of repeated calls.

`round_robin_seconds` times several calls interleaved in rounds, so that load which changes during
the run (a shared CPU) moves all of them alike and their ratios stay meaningful; `median_seconds`
is the one-call case. `median_of_known` is the median of per-round measurements that may be None
(a decode time lost in noise). `machine` and `versions` name what a timing ran on.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax
import jax
import jaxlib

import moe_jax


def round_robin_seconds(calls: Mapping[str, tuple[Callable[..., Any], tuple]],
                        repeats: int | Mapping[str, int]) -> dict[str, float]:
    """{name: median wall seconds of fn(*args)} for `calls` = {name: (fn, args)}, each warmed up
    (compiled) once, then timed in interleaved rounds; `repeats` is one count for all or one per name."""
    counts = {name: repeats if isinstance(repeats, int) else repeats[name] for name in calls}
    if any(n < 1 for n in counts.values()):
        raise ValueError(f"round_robin_seconds: every repeat count must be >= 1, got {counts}")
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(max(counts.values(), default=0)):
        for name, (fn, args) in calls.items():
            if r < counts[name]:
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def median_seconds(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
    """Median wall seconds of fn(*args) over `repeats` calls after one compiling warm-up."""
    return round_robin_seconds({"call": (fn, args)}, repeats)["call"]


def median_of_known(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None (None when there are none)."""
    known = [float(v) for v in values if v is not None]
    return statistics.median(known) if known else None


def versions() -> dict[str, str]:
    """The versions a measurement depends on."""
    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "moe_jax": moe_jax.__version__}


def machine() -> dict[str, Any]:
    """The machine a measurement ran on: platform, CPU count, jax backend and device."""
    devices = jax.devices()
    return {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
            "backend": jax.default_backend(), "device_kind": devices[0].device_kind, "device_count": len(devices)}
