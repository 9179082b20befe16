"""The report's figures as PNG bytes, drawn with matplotlib's object API on the Agg canvas, and the class colours
the PCA map shares with them.

No pyplot: nothing global changes (backend, open figures), so building a report inside a notebook or a
long-running driver leaves its plotting state alone.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

from fruitpipe.extras import needs_extras

with needs_extras("drawing the report"):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

LEGEND_CLASSES = 20
PHASE_ORDER = ("model_export", "list", "extract", "pca_fit", "pca_transform", "write_outputs")
DPI = 100


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def variance_figure(ratios: Sequence[float], target: float | None = None) -> bytes:
    """Explained variance per kept component (bars) and cumulative (line), with k and the kept share marked."""
    ratios = np.asarray(ratios, dtype=float)
    k = len(ratios)
    components = np.arange(1, k + 1)
    cumulative = np.cumsum(ratios)
    figure = Figure(figsize=(9, 4))
    axes = figure.add_subplot()
    axes.bar(components, ratios * 100, color="#4c72b0", label="per component")
    axes.set_xlabel("principal component")
    axes.set_ylabel("explained variance per component (%)")
    axes.set_xlim(0.3, k + 0.7)
    twin = axes.twinx()
    twin.plot(components, cumulative * 100, color="#dd8452", marker="o", markersize=3, label="cumulative")
    twin.set_ylabel("cumulative explained variance (%)")
    twin.set_ylim(0, 100)
    twin.axvline(k, color="#c44e52", linestyle="--", linewidth=1)
    twin.annotate(f"k = {k}: {cumulative[-1]:.1%} kept", xy=(k, cumulative[-1] * 100), xytext=(-8, -18),
                  textcoords="offset points", ha="right", color="#c44e52")
    if target is not None:
        twin.axhline(target * 100, color="#55a868", linestyle=":", linewidth=1)
        twin.annotate(f"target {target:.0%}", xy=(1, target * 100), xytext=(4, 4), textcoords="offset points",
                      color="#55a868")
    handles = axes.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    axes.legend(handles, [h.get_label() for h in handles], loc="center right")
    axes.set_title("PCA explained variance")
    return _png(figure)


def class_colours(labels: Sequence[str]) -> dict[str, str]:
    """Hex colours of the LEGEND_CLASSES largest classes (by rows in `labels`), in name order; others get none."""
    names, counts = np.unique(np.asarray(labels, dtype=object), return_counts=True)
    coloured = sorted(str(name) for name in names[np.argsort(-counts, kind="stable")][:LEGEND_CLASSES])
    return {name: to_hex(colour) for name, colour in zip(coloured, _palette(len(coloured)))}


def _palette(count: int) -> list:
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    return [colormaps["tab20"](i) for i in range(count)]


def class_counts_figure(ok: Mapping[str, int], failed: Mapping[str, int]) -> bytes:
    """Images per class (ok and failed stacked), one bar per class, tall enough to read 131 names."""
    names = sorted(set(ok) | set(failed))
    ok_counts = np.array([ok.get(name, 0) for name in names])
    failed_counts = np.array([failed.get(name, 0) for name in names])
    height = max(2.5, 0.16 * len(names) + 1.2)
    figure = Figure(figsize=(9, height))
    axes = figure.add_subplot()
    rows = np.arange(len(names))
    axes.barh(rows, ok_counts, color="#4c72b0", label="ok")
    if failed_counts.any():
        axes.barh(rows, failed_counts, left=ok_counts, color="#c44e52", label="failed")
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axes.set_yticks(rows, names, fontsize=7 if len(names) > 40 else 9)
    axes.set_ylim(len(names) - 0.5, -0.5)
    axes.set_xlabel("images")
    axes.set_title(f"Images per class ({len(names)} classes)")
    return _png(figure)


def ordered_phases(seconds: Mapping[str, float]) -> list[tuple[str, float]]:
    """(phase, seconds) in pipeline order, without the total."""
    order = {name: position for position, name in enumerate(PHASE_ORDER)}
    return sorted(((name, value) for name, value in seconds.items() if name != "total"),
                  key=lambda item: (order.get(item[0], len(order)), item[0]))


def phase_figure(seconds: Mapping[str, float]) -> bytes:
    """Wall-clock seconds per pipeline phase (the total is drawn separately as a reference line)."""
    phases = ordered_phases(seconds)
    figure = Figure(figsize=(9, 0.4 * len(phases) + 1.2))
    axes = figure.add_subplot()
    rows = np.arange(len(phases))
    axes.barh(rows, [value for _, value in phases], color="#55a868")
    axes.set_yticks(rows, [name.replace("_", " ") for name, _ in phases])
    axes.set_ylim(len(phases) - 0.5, -0.5)
    for row, (_, value) in zip(rows, phases):
        axes.annotate(f"{value:.1f} s", xy=(value, row), xytext=(3, 0), textcoords="offset points", va="center")
    axes.set_xlabel("seconds")
    if "total" in seconds:
        axes.set_title(f"Time per phase (total {seconds['total']:.1f} s)")
    return _png(figure)
