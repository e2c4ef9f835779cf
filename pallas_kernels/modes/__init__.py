"""Storage modes of the KV cache (registered by name in kvtuner_jax.modes; each module imported on first use).

Module level of each mode stays jax-free (jax is imported inside array-level methods), so manifest validation and
byte arithmetic never import jax.
"""
