"""PNG figures of the search: the profile heatmap (layers x pairs) and the Pareto front."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(path, losses: np.ndarray, pairs: Sequence[tuple[int, int]], title: str, groups=None) -> None:
    """log10 KL per (layer, pair); layers as rows. `groups` (lists of layers) are marked in the row labels."""
    plt = _plt()
    data = np.log10(np.maximum(np.asarray(losses), 1e-7))
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(pairs), 1.2 + 0.25 * data.shape[0]))
    im = ax.imshow(data, aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(pairs)), [f"K{k}V{v}" for k, v in pairs], rotation=60, fontsize=7)
    label = {l: g for g, ls in enumerate(groups or []) for l in ls}
    ax.set_yticks(
        range(data.shape[0]),
        [f"{l}" + (f" (g{label[l]})" if l in label else "") for l in range(data.shape[0])],
        fontsize=7,
    )
    ax.set_xlabel("(K bits, V bits)")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 mean KL vs 16-bit (nats), only this layer quantized")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto(path, evaluated, front, references: dict[str, tuple[float, float]], title: str, budget=None) -> None:
    """Loss vs effective bits: every evaluated trial, the front, and reference points (e.g. uniform configs)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter([p.effective_bits for p in evaluated], [p.loss for p in evaluated], s=10, c="0.7", label="trials")
    fb = [p.effective_bits for p in front]
    ax.plot(fb, [p.loss for p in front], "o-", c="C3", ms=4, label="Pareto front")
    for name, (b, l) in references.items():
        ax.scatter([b], [l], marker="s", s=22, c="C0")
        ax.annotate(name, (b, l), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if budget is not None:
        ax.axvline(budget, ls=":", c="0.4", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per K/V element (scales included)")
    ax.set_ylabel("mean KL vs 16-bit (nats)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
