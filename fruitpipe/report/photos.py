"""The report's photo sections: example strips per class, the PCA map with its hover, the evaluation's confusions,
and the near-duplicate groups and leaked test images `fruitpipe duplicates` found.

A FULL run holds 67,692 images in 131 classes, so the page shows a sample: at most about MAP_POINTS map points,
spread over the classes by size (each class at least its strip), and every strip drawn from those points. Each
photo is embedded once (see thumbnails.py), which keeps a FULL run's page to a few MB. The map is plain inline
SVG; the template's small script shows a point's photo, path and label on hover, with no library and no network.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fruitpipe.report.thumbnails import Photo, Thumbnails
from fruitpipe.run_folder import Duplicates

MAP_POINTS = 2000
STRIP_PHOTOS = 8
MAP_WIDTH, MAP_HEIGHT, MAP_MARGIN = 880, 560, 16
POINT_RADIUS = 3.5
OTHER_CLASSES_COLOUR = "#bbbbbb"
GROUPS_SHOWN = 12
GROUP_PHOTOS = 8
LEAKS_SHOWN = 12


@dataclass(frozen=True)
class PhotoSample:
    """The run's images the page shows: the map's points (label, path, first two components) and each class's
    strip (positions in the points, spread evenly over the class in path order)."""

    source: str
    total: int
    labels: list[str]
    paths: list[str]
    points: np.ndarray
    strips: dict[str, list[int]]

    def photos(self) -> list[Photo]:
        return [Photo(self.source, path) for path in self.paths]


def sample_run(source: str, labels: Sequence[str], paths: Sequence[str], vectors: np.ndarray,
               map_points: int = MAP_POINTS, strip: int = STRIP_PHOTOS) -> PhotoSample:
    """Choose the shown images: per class, a share of `map_points` in proportion to its size (never fewer than a
    strip), evenly spaced in path order, so frames of one object turning show different views. Deterministic."""
    labels_array, paths_array = np.asarray(labels, dtype=object), np.asarray(paths, dtype=object)
    total = len(labels_array)
    chosen: list[int] = []
    strips: dict[str, list[int]] = {}
    for label in sorted(set(labels_array.tolist())):
        rows = np.flatnonzero(labels_array == label)
        rows = rows[np.argsort(paths_array[rows], kind="stable")]
        quota = min(len(rows), max(strip, round(map_points * len(rows) / total)))
        picked = rows[_evenly(len(rows), quota)]
        strips[label] = [len(chosen) + position for position in _evenly(len(picked), strip)]
        chosen.extend(picked.tolist())
    points = np.asarray(vectors, dtype=np.float64)[chosen, :2] if chosen else np.zeros((0, 2))
    return PhotoSample(source, total, labels_array[chosen].tolist(), paths_array[chosen].tolist(), points, strips)


def _evenly(count: int, wanted: int) -> list[int]:
    """Up to `wanted` positions of `count`, evenly spaced, first and last included."""
    return sorted(set(np.linspace(0, count - 1, min(count, wanted)).round().astype(int).tolist())) if count else []


def strips_html(sample: PhotoSample, class_sizes: Mapping[str, int], thumbnails: Thumbnails) -> str:
    """One row of example photos per class."""
    if not sample.strips:
        return '<p class="note">No images with features.</p>'
    rows = []
    for label, positions in sample.strips.items():
        photos = "".join(thumbnails.tag(Photo(sample.source, sample.paths[p]), f"{label} · {sample.paths[p]}")
                         for p in positions)
        rows.append(f'<div class="strip"><div class="strip-label"><b>{html.escape(label)}</b>'
                    f"<span>{class_sizes.get(label, 0):,} images</span></div>{photos}</div>")
    return (f'<p class="note">{len(sample.strips)} classes, up to {STRIP_PHOTOS} photos each, spread evenly over '
            "the class in path order; hover a photo for its path.</p>" + "".join(rows))


def map_html(sample: PhotoSample, colours: Mapping[str, str], thumbnails: Thumbnails) -> str:
    """The first two principal components as SVG points coloured by class; hovering one shows its photo."""
    if sample.points.shape[0] == 0 or sample.points.shape[1] < 2:
        return '<p class="note">No map: the PCA keeps fewer than two components.</p>'
    low, high = sample.points.min(axis=0), sample.points.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    inner = np.array([MAP_WIDTH, MAP_HEIGHT]) - 2 * MAP_MARGIN
    xy = MAP_MARGIN + (sample.points - low) / span * inner
    xy[:, 1] = MAP_HEIGHT - xy[:, 1]
    # Points of the coloured classes last, so grey points of the many small classes do not hide them.
    order = sorted(range(len(sample.labels)), key=lambda i: (sample.labels[i] in colours, i))
    circles = "".join(
        f'<circle cx="{xy[i, 0]:.1f}" cy="{xy[i, 1]:.1f}" r="{POINT_RADIUS}" '
        f'fill="{colours.get(sample.labels[i], OTHER_CLASSES_COLOUR)}" '
        f'data-photo="{thumbnails.css_class(Photo(sample.source, sample.paths[i]))}" '
        f'data-label="{html.escape(sample.labels[i])}" data-path="{html.escape(sample.paths[i])}"/>'
        for i in order)
    shown = len(sample.labels)
    count = f"all {shown:,} images" if shown == sample.total else f"{shown:,} of {sample.total:,} images"
    legend = "".join(f'<span><i style="background:{colour}"></i>{html.escape(label)}</span>'
                     for label, colour in colours.items())
    others = len(set(sample.labels) - set(colours))
    if others:
        legend += f'<span><i style="background:{OTHER_CLASSES_COLOUR}"></i>{others} other classes</span>'
    return (f'<div class="map"><svg id="pca-map" viewBox="0 0 {MAP_WIDTH} {MAP_HEIGHT}" role="img" '
            f'aria-label="first two principal components, {count}">'
            f'<rect width="{MAP_WIDTH}" height="{MAP_HEIGHT}" class="map-frame"/>{circles}</svg>'
            '<div id="map-tip" class="map-tip" hidden><span class="ph"></span>'
            '<div class="tip-label"></div><div class="tip-path"></div></div></div>'
            f'<p class="note">PC 1 (right) against PC 2 (up), {count}; hover a point to see its photo, label and '
            f'path.</p><div class="legend">{legend}</div>')


def confusion_photos(evaluation: Mapping[str, Any] | None, train_source: str) -> list[Photo]:
    """The photos the confusions section shows: each misclassified test photo and its nearest training photos."""
    photos = []
    for example in (evaluation or {}).get("misclassified_pca_1nn") or []:
        photos.append(Photo(evaluation["test_source"], example["path"]))
        photos.extend(Photo(train_source, neighbour["path"]) for neighbour in example["neighbours"])
    return photos


def confusions_html(evaluation: Mapping[str, Any], train_source: str, thumbnails: Thumbnails) -> str:
    """Each misclassified test photo beside its nearest training photos, those of its true class marked."""
    if "misclassified_pca_1nn" not in evaluation:
        return ('<p class="note">This evaluation predates the photos of its mistakes: run '
                "<code>fruitpipe evaluate</code> again to see them.</p>")
    examples = evaluation["misclassified_pca_1nn"]
    if not examples:
        return '<p class="ok">No misclassified test photos.</p>'
    rows = []
    for example in examples:
        test = _figure(thumbnails.tag(Photo(evaluation["test_source"], example["path"]), example["path"]),
                       f"{example['label']} → {example['predicted']}", "wrong")
        neighbours = "".join(
            _figure(thumbnails.tag(Photo(train_source, n["path"]), n["path"]), f"{n['label']} {n['similarity']:.3f}",
                    "same" if n["label"] == example["label"] else "other")
            for n in example["neighbours"])
        rows.append(f'<div class="confusion">{test}<span class="arrow">nearest training photos</span>'
                    f"{neighbours}</div>")
    return (f'<p class="note">{len(examples)} misclassified test photos (a few of each confused pair, the most '
            "confident first), each beside its nearest training photos with their cosine similarity; a green "
            "caption is the test photo's own class.</p>" + "".join(rows))


def _figure(tag: str, caption: str, kind: str) -> str:
    return f'<figure class="thumb {kind}">{tag}<figcaption>{html.escape(caption)}</figcaption></figure>'


@dataclass(frozen=True)
class DuplicateFindings:
    """What `fruitpipe duplicates` wrote, and the sources its paths are relative to (None: the test run is gone,
    so its photos show the placeholder)."""

    found: Duplicates
    source: str
    test_source: str | None

    def groups(self) -> list[list[dict[str, Any]]]:
        """The groups shown: those holding more than one label first (likely label errors), then the largest;
        members nearest first, at most GROUP_PHOTOS each."""
        members: dict[int, list[dict[str, Any]]] = {}
        for row in self.found.groups.to_pylist():
            members.setdefault(row["group_id"], []).append(row)
        ranked = sorted(members.values(), key=lambda rows: (len({r["label"] for r in rows}) == 1, -len(rows),
                                                            rows[0]["group_id"]))
        return [sorted(rows, key=lambda r: (r["distance"], r["path"])) for rows in ranked[:GROUPS_SHOWN]]

    def leaks(self) -> list[dict[str, Any]]:
        """The leaked test images shown: the closest first."""
        rows = [] if self.found.leaks is None else self.found.leaks.to_pylist()
        return sorted(rows, key=lambda r: (r["distance"], r["test_path"]))[:LEAKS_SHOWN]

    def test_photo(self, path: str) -> Photo:
        return Photo(self.test_source or "", path)

    def photos(self) -> list[Photo]:
        shown = [Photo(self.source, row["path"]) for rows in self.groups() for row in rows[:GROUP_PHOTOS]]
        for leak in self.leaks():
            shown.append(Photo(self.source, leak["train_path"]))
            if self.test_source is not None:
                shown.append(self.test_photo(leak["test_path"]))
        return shown


def duplicate_groups_html(findings: DuplicateFindings, thumbnails: Thumbnails) -> str:
    """The shown near-duplicate groups, one row of photos each, captioned with label and distance."""
    rows_html = []
    for rows in findings.groups():
        labels = sorted({row["label"] for row in rows})
        mixed = f", {html.escape(' / '.join(labels))}" if len(labels) > 1 else ""
        more = f'<span class="arrow">+{len(rows) - GROUP_PHOTOS} more</span>' if len(rows) > GROUP_PHOTOS else ""
        photos = "".join(_figure(thumbnails.tag(Photo(findings.source, row["path"]), row["path"]),
                                 f"{row['label']} {row['distance']:.2g}", "other" if mixed else "same")
                         for row in rows[:GROUP_PHOTOS])
        rows_html.append(f'<div class="confusion"><div class="strip-label"><b>group {rows[0]["group_id"]}</b>'
                         f"<span>{len(rows)} images{mixed}</span></div>{photos}{more}</div>")
    return "".join(rows_html)


def leaks_html(findings: DuplicateFindings, thumbnails: Thumbnails) -> str:
    """The shown leaked test photos, each beside its near-identical training photo."""
    rows = []
    for leak in findings.leaks():
        test = _figure(thumbnails.tag(findings.test_photo(leak["test_path"]), leak["test_path"]),
                       f"test: {leak['test_label']}", "wrong")
        train = _figure(thumbnails.tag(Photo(findings.source, leak["train_path"]), leak["train_path"]),
                        f"{leak['train_label']} {leak['distance']:.2g}",
                        "same" if leak["train_label"] == leak["test_label"] else "other")
        rows.append(f'<div class="confusion">{test}<span class="arrow">nearest training photo</span>{train}</div>')
    return "".join(rows)
