"""faceaudit_jax: audit face models with explanations, at throughput.

Subpackages: data (synthetic faces, subsets, readers), models (Flax), explain
(pure attribution functions), summary (data-set level reductions), metrics,
mitigation, viz, experiments (one module per paper reproduction).
"""

__version__ = "0.1.0"
