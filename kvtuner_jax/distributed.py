"""Multi-host start-up and host-side helpers (DESIGN.md "Sharding": `jax.distributed.initialize()`).

Every process runs the same program (SPMD). A process knows the whole batch's host-side state (prompts, page
tables, sampled tokens) but transfers to the devices only the rows its devices own (`jax.make_array_from_callback`
calls back only for addressable shards), and values the host must read (logits, sampled tokens) are replicated by
the compiled step, so each process reads its local copy: the outputs are gathered on process 0 and on every other.

Configuration, in order of precedence: explicit arguments (the `--coordinator_address`, `--num_processes`,
`--process_id` flags of `kvtuner_jax.sharding.define_mesh_flags`), then environment variables: `JAX_COORDINATOR_ADDRESS`
and `JAX_LOCAL_DEVICE_IDS` (which JAX itself reads), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (read here, same
naming), then cluster auto-detection (SLURM, Open MPI, Cloud TPU) inside `jax.distributed.initialize`.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from kvtuner_jax.errors import KVTunerError


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v in (None, ""):
        return None
    try:
        return int(v)
    except ValueError:
        raise KVTunerError(f"environment variable {name}={v!r} is not an integer") from None


def is_initialized() -> bool:
    return jax.distributed.is_initialized()


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
) -> bool:
    """Calls `jax.distributed.initialize` when a multi-process run is asked for; returns whether it did.

    A run is multi-process when a coordinator address is given (argument or JAX_COORDINATOR_ADDRESS) or
    num_processes > 1. With num_processes == 1 and no coordinator nothing happens (single-host runs need no
    coordinator). Must run before any other JAX call; calling it again after a successful start is a no-op.
    On CPU, cross-process collectives use gloo (JAX's default `jax_cpu_collectives_implementation`).
    """
    if is_initialized():
        return False
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if coordinator_address is None and (num_processes is None or num_processes <= 1):
        return False
    if num_processes is not None and num_processes < 1:
        raise KVTunerError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise KVTunerError(f"--process_id={process_id} is outside [0, --num_processes={num_processes})")
    if coordinator_address is None:
        raise KVTunerError(
            f"--num_processes={num_processes} needs --coordinator_address (host:port of process 0) "
            "or JAX_COORDINATOR_ADDRESS"
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    return True


def is_main_process() -> bool:
    return jax.process_index() == 0


def to_host(x) -> np.ndarray:
    """A jax.Array (sharded, possibly over several processes) -> the whole value as numpy on this process.

    Fully replicated or fully addressable arrays are read locally; otherwise the shards are all-gathered
    across processes (every process must call this, as with any collective).
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
