"""Pruning dominated (K bits, V bits) pairs: keep, per layer (or group), the Pareto set of (cost, loss)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pareto_mask(costs: Sequence[float], losses: Sequence[float]) -> np.ndarray:
    """Bool mask [C] of the candidates not dominated by another.

    Candidate b dominates a when cost_b <= cost_a and loss_b <= loss_a with one of them strict ("more bits and no
    less loss" is dominated). Exact ties in both are kept once: the first in the given order survives, so the result
    is deterministic.
    """
    c = np.asarray(costs, np.float64)
    l = np.asarray(losses, np.float64)
    n = len(c)
    keep = np.ones(n, bool)
    for a in range(n):
        for b in range(n):
            if a == b:
                continue
            no_worse = c[b] <= c[a] and l[b] <= l[a]
            strictly = c[b] < c[a] or l[b] < l[a]
            if no_worse and (strictly or b < a):
                keep[a] = False
                break
    return keep


def prune_layers(losses: np.ndarray, costs: Sequence[float]) -> np.ndarray:
    """Per-layer Pareto sets. losses [L, C], costs [C] -> bool keep mask [L, C]."""
    losses = np.asarray(losses, np.float64)
    return np.stack([pareto_mask(costs, row) for row in losses])
