"""Pictures: prediction overlays, baseline/InstUnique rows, query responses, curves.

The command-line front end is ``demo/demo.py``; ``tools/plot_curves.py`` draws curves.
"""
from .comparison import (
    caption_height,
    comparison_row,
    compose_row,
    draw_ground_truth,
    draw_outputs,
    equivariance_row,
    scale_image,
    stack_rows,
    warp_outputs,
)
from .curves import curve_keys, curves_figure, load_metrics, plot_curves
from .query_response import QueryResponse, heat_overlay, query_response, render_query_response

__all__ = [
    "QueryResponse",
    "caption_height",
    "comparison_row",
    "compose_row",
    "curve_keys",
    "draw_ground_truth",
    "draw_outputs",
    "equivariance_row",
    "heat_overlay",
    "load_metrics",
    "curves_figure",
    "plot_curves",
    "query_response",
    "render_query_response",
    "scale_image",
    "stack_rows",
    "warp_outputs",
]
