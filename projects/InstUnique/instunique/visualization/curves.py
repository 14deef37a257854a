"""Training curves from detectron2's ``metrics.json`` (one JSON record per line).

Training lines hold ``iteration``, ``total_loss`` and every ``loss_*`` term; evaluation
lines hold ``segm/AP`` and friends, and ``uniqueness/*`` where the query-uniqueness
evaluator ran (TEST.UNIQUENESS.ENABLED). Several runs (e.g. the baseline and InstUnique) can
share a figure: one panel per metric, one line per run. Drawing goes through matplotlib's
Agg canvas directly, so no GUI backend and no global pyplot state are touched.
"""
import json
import logging
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["curve_keys", "load_metrics", "plot_curves"]

logger = logging.getLogger(__name__)

# Auxiliary (deep-supervision) terms end in _<decoder layer>, e.g. loss_dice_3.
_AUX = re.compile(r"_\d+$")
EVAL_KEYS = ("segm/AP", "bbox/AP", "panoptic_seg/PQ")
# The query-uniqueness evaluator's rates (instunique.evaluation), in this order.
UNIQUENESS_KEYS = (
    "uniqueness/external_fire", "uniqueness/external_max_prob", "uniqueness/duplicate_rate",
    "uniqueness/merged_rate", "uniqueness/split_rate",
)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_metrics(path: str) -> List[Dict]:
    """Records of one run, sorted by iteration; a later record of the same iteration
    (after a resume) wins per key. A torn last line of a running job is skipped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` holds no record with an "iteration".
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics file not found: {path}")
    merged: Dict[int, Dict] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning(f"{path}:{n}: not a JSON record, skipped")
                continue
            if isinstance(record, dict) and isinstance(record.get("iteration"), int):
                merged.setdefault(record["iteration"], {}).update(record)
    if not merged:
        raise ValueError(
            f"{path} holds no metrics record with an 'iteration' (not a metrics.json?)"
        )
    return [merged[i] for i in sorted(merged)]


def curve_keys(runs: Sequence[Sequence[Dict]], include_aux: bool = False) -> List[str]:
    """Metrics worth a panel: total_loss, the loss_* terms, then evaluation APs and the
    query-uniqueness rates."""
    present = set()
    for records in runs:
        for r in records:
            present.update(k for k, v in r.items() if _is_number(v))
    losses = sorted(
        k for k in present if k.startswith("loss_") and (include_aux or not _AUX.search(k))
    )
    head = ["total_loss"] if "total_loss" in present else []
    return head + losses + [k for k in EVAL_KEYS + UNIQUENESS_KEYS if k in present]


def curves_figure(
    runs: Mapping[str, Sequence[Dict]],
    keys: Optional[Sequence[str]] = None,
    columns: int = 4,
    panel_size: float = 3.2,
    dpi: int = 100,
    log_scale: bool = False,
) -> Figure:
    """The grid of panels of :func:`plot_curves` as a matplotlib Figure: one panel per
    metric key, one line per run, each run in one colour in every panel."""
    if not runs:
        raise ValueError("plot_curves needs at least one run")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    keys = list(keys) if keys is not None else curve_keys(list(runs.values()))
    if not keys:
        raise ValueError(
            "no metric to plot: the runs hold no total_loss, loss_*, AP or uniqueness values"
        )
    rows = -(-len(keys) // columns)
    cols = min(len(keys), columns)
    fig = Figure(figsize=(cols * panel_size, rows * panel_size), dpi=dpi)
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = []
        for run, (label, records) in enumerate(runs.items()):
            pts = [(r["iteration"], r[key]) for r in records if _is_number(r.get(key))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            values.extend(ys)
            # One colour per run in every panel, also where another run has no such key.
            # An AP is evaluated at a few iterations only: mark the points.
            ax.plot(xs, ys, label=label, marker="o" if len(pts) < 20 else None, linewidth=1.2,
                    color=f"C{run % 10}")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if not values:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        if log_scale and "loss" in key and min(values) > 0:
            ax.set_yscale("log")
        if len(runs) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_curves(
    runs: Mapping[str, Sequence[Dict]],
    output: str,
    keys: Optional[Sequence[str]] = None,
    columns: int = 4,
    panel_size: float = 3.2,
    dpi: int = 100,
    log_scale: bool = False,
) -> str:
    """Save a grid of panels, one per metric key, one line per run, to a PNG ``output``.

    Args:
        runs: run label -> records (see :func:`load_metrics`).
        keys: metrics to draw; default :func:`curve_keys`.
        columns: panels per row.
        panel_size: inches per panel side; the picture is
            (rows * panel_size * dpi, min(n, columns) * panel_size * dpi) pixels.
        log_scale: logarithmic y axis for the loss panels.
    Returns:
        ``output``.
    """
    fig = curves_figure(runs, keys, columns, panel_size, dpi, log_scale)
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(output, format="png", dpi=dpi)
    return output
