"""Helper for tests that lower kernels for a platform this host lacks (an H100 or a TPU on the CPU-only CI box)."""

from __future__ import annotations

import jax


def abstract_mesh(device_kind: str, platform: str) -> jax.sharding.AbstractMesh:
    """A one-device abstract mesh naming the target chip ("NVIDIA H100" / "gpu", "TPU v5 lite" / "tpu"): lowering
    reads the target from it under `jax.sharding.use_abstract_mesh`."""
    dev = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform=platform)
    return jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=dev)
