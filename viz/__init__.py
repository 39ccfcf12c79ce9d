"""steerlab.viz: plotly figures for steerlab's result objects, and their export.

Each figure function takes a result object and returns a
``plotly.graph_objects.Figure`` with a title, axis labels and hover text.
:func:`save_html` always works (plotly.js embedded, offline); :func:`save_png`
needs kaleido and a Chrome/Chromium browser; :func:`report` writes several
figures, text and tables into one self-contained HTML file.
"""

from steerlab.viz.alignment import das_training_curve, iia_heatmap, subspace_projection
from steerlab.viz.attribution import (
    attribution_comparison,
    attribution_heatmap,
    direction_effects_lines,
    direction_tokens,
    head_logit_heatmap,
    integrated_gradients_bars,
    logit_lens_heatmap,
    subspace_attribution_heatmap,
)
from steerlab.viz.export import Pre, Section, find_browser, report, save, save_html, save_png
from steerlab.viz.graph import run_graph
from steerlab.viz.patching import patching_heatmap
from steerlab.viz.reft import reft_training_curve, token_effects
from steerlab.viz.steering import steer_auroc, steer_sweep, steer_table

__all__ = [
    "iia_heatmap",
    "das_training_curve",
    "subspace_projection",
    "patching_heatmap",
    "reft_training_curve",
    "token_effects",
    "steer_table",
    "steer_sweep",
    "steer_auroc",
    "run_graph",
    "attribution_heatmap",
    "attribution_comparison",
    "subspace_attribution_heatmap",
    "integrated_gradients_bars",
    "logit_lens_heatmap",
    "head_logit_heatmap",
    "direction_tokens",
    "direction_effects_lines",
    "save",
    "save_html",
    "save_png",
    "report",
    "Section",
    "Pre",
    "find_browser",
]
