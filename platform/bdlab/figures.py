"""The one Pareto plot of a cell, drawn for the end-of-sweep summary, `bdlab report` and the
notebooks alike: every complete trial, the validation Pareto front, and marked points (the default
configuration, the backdoored model, the defender's and the oracle's choices), on the axes the
spec's objectives name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bdlab.spec.reader import DEFAULT_OBJECTIVES


@dataclass(frozen=True)
class Mark:
    """One highlighted point: the values of the plotted metrics and how to draw it."""

    values: Mapping[str, float | None]
    label: str
    marker: str = "*"
    color: str = "tab:blue"
    size: int = 140


def front_axes(objectives: Mapping[str, str] | None) -> tuple[str, str]:
    """(x, y) metrics of the plot: the first objective up the y axis, the second along x. A single
    objective is drawn against ASR (or ACC when it is ASR): the trade-off every defense has."""
    names = list(objectives or DEFAULT_OBJECTIVES)
    if len(names) >= 2:
        return names[1], names[0]
    return ("acc" if names[0] == "asr" else "asr"), names[0]


def _coords(points: Sequence[Mapping[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pairs = [(p.get(x), p.get(y)) for p in points]
    pairs = [(float(a), float(b)) for a, b in pairs if a is not None and b is not None]
    return [a for a, _ in pairs], [b for _, b in pairs]


def axis_label(metric: str, objectives: Mapping[str, str] | None) -> str:
    direction = dict(objectives or DEFAULT_OBJECTIVES).get(metric)
    better = {"max": ", higher is better", "min": ", lower is better"}.get(direction or "", "")
    return f"{metric.upper() if len(metric) <= 4 else metric} (report half{better})"


def front_figure(
    points: Sequence[Mapping[str, Any]],
    front: Sequence[Mapping[str, Any]],
    objectives: Mapping[str, str] | None = None,
    marks: Sequence[Mark] = (),
    title: str | None = None,
    labels: Sequence[str] | None = None,
) -> tuple[Any, Any]:
    """A matplotlib (figure, axes): `points` and `front` are mappings metric -> report-half value
    (the front chosen on the validation half, by whoever calls this); `labels`, one per point,
    are written beside them. Callers add to the axes (a fitted curve) before saving."""
    import matplotlib.pyplot as plt

    x, y = front_axes(objectives)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    xs, ys = _coords(points, x, y)
    ax.scatter(xs, ys, c="0.6", s=18, label="trials")
    if labels is not None:
        for p, text in zip(points, labels, strict=True):
            if p.get(x) is not None and p.get(y) is not None:
                ax.annotate(text, (float(p[x]), float(p[y])), fontsize=6)
    fx, fy = _coords(front, x, y)
    if fx:
        ax.scatter(fx, fy, c="tab:red", s=30, label="Pareto front (chosen on the validation half)")
    for m in marks:
        mx, my = _coords([m.values], x, y)
        if mx:
            ax.scatter(mx, my, marker=m.marker, s=m.size, c=m.color, label=m.label, alpha=0.85)
    ax.set_xlabel(axis_label(x, objectives))
    ax.set_ylabel(axis_label(y, objectives))
    if x in ("acc", "asr"):
        ax.set_xlim(-0.03, 1.03)
    if title:
        ax.set_title(title, fontsize=7)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return fig, ax
