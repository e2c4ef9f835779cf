"""KVTuner's offline search: per-layer sensitivity profile, pruning, layer clustering, NSGA-II over group choices.

Modules: space (schemes, pairs, bit accounting), profile (calibration data, 16-bit reference pass, profile, whole-
manifest evaluation), prune, cluster, optimize (search space, Optuna NSGA-II), plots, pipeline (the whole run);
`python -m kvtuner_jax.search` is the CLI.
"""

from kvtuner_jax.search.cluster import cluster_layers, kmeans
from kvtuner_jax.search.optimize import SearchSpace, build_space, run_search
from kvtuner_jax.search.profile import Calibration, Profile, make_windows, profile_layers, split_halves
from kvtuner_jax.search.prune import pareto_mask, prune_layers
from kvtuner_jax.search.space import PAIRS, Scheme, effective_bits, make_scheme, nominal_bits

__all__ = [
    "PAIRS",
    "Calibration",
    "Profile",
    "Scheme",
    "SearchSpace",
    "build_space",
    "cluster_layers",
    "effective_bits",
    "kmeans",
    "make_scheme",
    "make_windows",
    "nominal_bits",
    "pareto_mask",
    "profile_layers",
    "prune_layers",
    "run_search",
    "split_halves",
]
