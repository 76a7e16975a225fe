"""Looking inside a trained MoE: per-layer routing statistics grouped by task, modality
or label, and routing alignment between groups (stats.py: the math; collect.py: running
a model with the "routing" collection; report.py: tables, heatmaps, summary).
`python -m experiments.analyze --workdir=DIR` runs all three."""
from moe_jax.analysis.collect import GROUP_BY, collect, layer_records
from moe_jax.analysis.stats import GroupStats, RoutingStats, js_divergence

__all__ = ["GROUP_BY", "GroupStats", "RoutingStats", "collect", "js_divergence",
           "layer_records"]
