"""One self-contained HTML page about a finished run: what went in, what came out, how long, how good.

Everything is read through fruitpipe.storage (so a run folder on S3 works like a local one) and the page is
written back next to the run as `report/index.html`, figures inlined as PNG data URIs and photos as small WebP
thumbnails (photos.py, thumbnails.py): one file to open, copy or attach, with no server and no network; its one
small inline script shows a photo when the pointer is on the PCA map.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from string import Template
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from fruitpipe import sinks
from fruitpipe.errors import FruitpipeError
from fruitpipe.evaluate import METHOD_TITLES, METHODS
from fruitpipe.report import figures, photos
from fruitpipe.report.thumbnails import Thumbnails, read_thumbnails
from fruitpipe.run_folder import ERRORS, METADATA, PCA, RunFolder

ERROR_ROWS = 200
# PCA rows the report reads at most: the map shows about photos.MAP_POINTS of them, so a larger run is sampled
# (whole shards spread over the run: 200,000 rows of PCA-50 are 40 MB) rather than read whole on the driver.
PCA_ROWS_READ = 200_000
LEAKING_CLASSES_SHOWN = 10


@dataclass(frozen=True)
class RunDocuments:
    """What the report reads from a run folder (the large datasets only as the few columns it draws)."""

    manifest: dict
    model_info: dict
    pca_model: dict
    config_text: str
    metadata: pa.Table
    errors: pa.Table
    pca: pa.Table
    evaluation: dict | None
    duplicates: photos.DuplicateFindings | None


def load_documents(run_dir: str) -> RunDocuments:
    """Read a finished run's documents and the report's columns of its datasets."""
    folder = RunFolder.finished(run_dir)
    folder.result()  # one clear line, rather than a missing file, when the manifest or model_info is gone
    manifest = folder.manifest()
    found = folder.duplicates()
    return RunDocuments(
        manifest=manifest,
        model_info=folder.model_info(),
        pca_model=folder.pca_description(),
        config_text=folder.config_text(),
        metadata=folder.table(METADATA, columns=["label", "status"]),
        errors=folder.table(ERRORS),
        pca=folder.table(PCA, columns=["path", "label", "pca"], at_most=PCA_ROWS_READ),
        evaluation=folder.evaluation(),
        duplicates=None if found is None else photos.DuplicateFindings(
            found, manifest["source"], _source_of(found.summary.get("test_run"))),
    )


def _source_of(run_dir: str | None) -> str | None:
    """The source of another run (the one `duplicates --test` compared), or None where it cannot be read."""
    if run_dir is None:
        return None
    try:
        return RunFolder.finished(run_dir).manifest()["source"]
    except (FruitpipeError, OSError, KeyError):
        return None


def build_report(run_dir: str) -> str:
    """Write RUN_DIR/report/index.html and return where it is (a path or URI)."""
    documents = load_documents(run_dir)
    return RunFolder(run_dir).write_report(render(documents, run_dir))


def render(documents: RunDocuments, run_dir: str) -> str:
    """The whole page as a string."""
    manifest = documents.manifest
    template = Template(resources.files("fruitpipe.report").joinpath("template.html").read_text(encoding="utf-8"))
    created = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(manifest["created_unix"]))
    pca = documents.pca
    labels = pca.column("label").to_pylist()
    sample = replace(photos.sample_run(manifest["source"], labels, pca.column("path").to_pylist(),
                                                   sinks.vectors_matrix(pca, "pca")), total=manifest["images_ok"])
    thumbnails = read_thumbnails(sample.photos() + photos.confusion_photos(documents.evaluation, manifest["source"])
                                 + (documents.duplicates.photos() if documents.duplicates else []))
    class_sizes = _status_counts(documents.metadata, "ok")
    return template.substitute(
        photo_style=thumbnails.style(),
        title=html.escape(f"fruitpipe run: {manifest['model']}, {manifest['images_ok']} images"),
        subtitle=html.escape(f"{run_dir} · source {manifest['source']} ({manifest['split']}) · finished {created}"),
        summary=_summary(documents),
        pca=_pca_section(documents, sample, thumbnails),
        photos=photos.strips_html(sample, class_sizes, thumbnails),
        classes=_classes_section(documents.metadata),
        errors=_errors_section(documents.errors),
        timing=_timing_section(documents.model_info),
        evaluation=_evaluation_section(documents.evaluation, manifest["source"], thumbnails),
        duplicates_nav='<a href="#duplicates">duplicates</a>' if documents.duplicates else "",
        duplicates=_duplicates_section(documents.duplicates, thumbnails) if documents.duplicates else "",
        config=_config_section(documents),
    )


def _image(png: bytes, alt: str) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return f'<img class="figure" alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(header)
    head = "".join(f'<th{" class=num" if n else ""}>{html.escape(str(h))}</th>' for h, n in zip(header, numeric))
    body = "".join("<tr>" + "".join(f'<td{" class=num" if n else ""}>{html.escape(_text(v))}</td>'
                                    for v, n in zip(row, numeric)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _text(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _cards(items: Sequence[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><b>{html.escape(value)}</b><span>{html.escape(label)}</span></div>'
        for value, label in items) + "</div>"


def _summary(documents: RunDocuments) -> str:
    manifest, info = documents.manifest, documents.model_info
    seconds = info["seconds"]
    classes = len(set(documents.metadata.column("label").to_pylist()))
    cards = _cards([
        (f"{manifest['images_listed']:,}", "images listed"),
        (f"{manifest['images_ok']:,}", "with features"),
        (f"{manifest['images_failed']:,}", "failed"),
        (f"{classes:,}", "classes"),
        (f"{info['feature_dim']} → {info['pca_k']}", "feature dim → PCA k"),
        (f"{info['variance_kept']:.1%}", "variance kept"),
        (f"{seconds.get('total', 0.0):.1f} s", "total time"),
        (f"{info['images_per_second']:.1f}", "images/s end to end"),
        (f"{manifest['shards']} ({manifest['shards_resumed']} resumed)", "shards"),
    ])
    outputs = _table(["output", "format", "parts", "rows"],
                     [(name, value["format"], value.get("parts"), value.get("rows"))  # index/, duplicates/: no parts
                      for name, value in manifest["outputs"].items()], [False, False, True, True])
    return cards + "<h3>Outputs</h3>" + outputs


def _pca_section(documents: RunDocuments, sample: photos.PhotoSample, thumbnails: Thumbnails) -> str:
    ratios = documents.pca_model["explained_variance_ratio"]
    target = (yaml.safe_load(documents.config_text) or {}).get("pca_variance")
    parts = [_image(figures.variance_figure(ratios, target), "PCA explained variance per component and cumulative")]
    parts.append(f'<p class="note">{len(ratios)} components kept of {documents.pca_model["input_dim"]} '
                 f"({documents.pca_model['variance_kept']:.1%} of the total variance, fitted on "
                 f"{documents.pca_model['n_samples']:,} images); variance.csv has the numbers.</p>")
    parts.append("<h3>Map of the first two components</h3>")
    parts.append(photos.map_html(sample, figures.class_colours(documents.pca.column("label").to_pylist()), thumbnails))
    return "".join(parts)


def _status_counts(metadata: pa.Table, status: str) -> dict[str, int]:
    labels = np.asarray(metadata.column("label").to_pylist(), dtype=object)
    chosen = labels[np.asarray(metadata.column("status").to_pylist(), dtype=object) == status]
    names, counts = np.unique(chosen, return_counts=True) if chosen.size else ([], [])
    return {str(name): int(count) for name, count in zip(names, counts)}


def _classes_section(metadata: pa.Table) -> str:
    ok, failed = _status_counts(metadata, "ok"), _status_counts(metadata, "failed")
    if not ok and not failed:
        return '<p class="note">No images.</p>'
    return _image(figures.class_counts_figure(ok, failed), "images per class")


def _errors_section(errors: pa.Table) -> str:
    if errors.num_rows == 0:
        return '<p class="ok">No errors: every listed image has features.</p>'
    frame = errors.to_pandas()
    grouped = (frame.groupby(["stage", "reason"]).size().reset_index(name="images")
               .sort_values(["images", "stage", "reason"], ascending=[False, True, True]))
    summary = _table(["stage", "reason", "images"],
                     grouped[["stage", "reason", "images"]].itertuples(index=False), [False, False, True])
    shown = frame.sort_values("path").head(ERROR_ROWS)
    more = f" (first {ERROR_ROWS} of {len(frame)}; errors/ and csv/errors.csv hold all)" if len(frame) > ERROR_ROWS else ""
    detail = _table(["path", "label", "stage", "reason"], shown[["path", "label", "stage", "reason"]].itertuples(index=False))
    return (f'<p class="bad">{len(frame):,} images failed.</p>' + summary
            + f"<details><summary>every failed image{html.escape(more)}</summary>{detail}</details>")


def _timing_section(info: Mapping[str, Any]) -> str:
    seconds = info["seconds"]
    rows = [(name.replace("_", " "), value) for name, value in figures.ordered_phases(seconds)]
    rows.append(("total", seconds.get("total", 0.0)))
    task = info.get("shard_seconds_summed", {})
    parts = [_image(figures.phase_figure(seconds), "seconds per pipeline phase"),
             f"<p>{info['images_per_second']:.1f} images/s end to end "
             f"({info['counts']['images_listed']:,} images in {seconds.get('total', 0.0):.1f} s).</p>",
             _table(["phase", "seconds"], rows, [False, True])]
    if task:
        parts.append("<h3>Inside the extraction tasks (seconds summed over shards)</h3>"
                     '<p class="note">Reading and decoding overlap inference, so these do not add up to wall time.'
                     "</p>" + _table(["task phase", "seconds"], list(task.items()), [False, True]))
    executors = info.get("executors") or []
    parts.append(f"<p>Executors: {html.escape(', '.join(map(str, executors)) or '–')}</p>")
    return "".join(parts)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _evaluation_section(evaluation: Mapping[str, Any] | None, train_source: str, thumbnails: Thumbnails) -> str:
    if evaluation is None:
        return ('<p class="note">Not evaluated yet: run <code>fruitpipe evaluate RUN_DIR --test SRC</code>, '
                "then build this report again.</p>")
    titles = [METHOD_TITLES[m] for m in METHODS]
    accuracy = _table(["features", *titles],
                      [(f"PCA-{v['dim']}" if name == "pca" else f"raw {v['dim']}-d",
                        *[_percent(v["accuracy"][m]) for m in METHODS])
                       for name, v in evaluation["feature_sets"].items()], [False, True, True, True])
    note = (f'<p class="note">{evaluation["test_images"]:,} held-out images ({html.escape(evaluation["split"])} split '
            f"of {html.escape(evaluation['test_source'])}) in {evaluation['classes']} classes; chance "
            f"{evaluation['chance']:.1%}, majority class {evaluation['majority_class']:.1%}. Classifiers fitted on "
            f"the run's {evaluation['train_images']:,} training images; {html.escape(evaluation['metric'])}. "
            f"Left out: {evaluation['test_images_unseen_class']} images of classes the run never saw, "
            f"{evaluation['test_images_failed']} unreadable.</p>")
    ranked = sorted(evaluation["per_class"], key=lambda row: (row["pca"]["1nn"] is None, row["pca"]["1nn"] or 0.0,
                                                               row["label"]))
    per_class = _table(["class", "train", "test", *[f"PCA {t}" for t in titles], *[f"raw {t}" for t in titles]],
                       [(row["label"], row["train"], row["test"], *[_percent(row["pca"][m]) for m in METHODS],
                         *[_percent(row["raw"][m]) for m in METHODS]) for row in ranked],
                       [False, True, True] + [True] * 6)
    confused = evaluation.get("most_confused_pca_1nn") or []
    confusions = (_table(["true class", "predicted as", "images"],
                         [(c["true"], c["predicted"], c["images"]) for c in confused], [False, False, True])
                  if confused else '<p class="ok">No confusions: PCA 1-NN labels every test image right.</p>')
    return (accuracy + note + "<h3>Most confused (PCA 1-NN)</h3>" + confusions
            + "<h3>Misclassified test photos and their nearest training photos (PCA 1-NN)</h3>"
            + photos.confusions_html(evaluation, train_source, thumbnails)
            + f"<details><summary>per class, weakest first ({len(ranked)} classes)</summary>{per_class}</details>")


def _duplicates_section(findings: photos.DuplicateFindings, thumbnails: Thumbnails) -> str:
    """What `fruitpipe duplicates` found, as counts, photos and the nearest-neighbour distance histogram."""
    summary = findings.found.summary
    default = " (the default)" if summary.get("threshold_is_default") else ""
    parts = [(f"<p>{summary['groups']:,} groups of near-identical images hold {summary['images_in_groups']:,} of "
              f"{summary['images']:,} training images (the largest {summary['largest_group']:,}); "
              f"<b>{summary['cross_label_groups']:,}</b> of them hold more than one label: likely label errors.</p>"
              if summary["groups"] else
              f'<p class="ok">No near-identical images among the {summary["images"]:,} training images.</p>')
             + f'<p class="note">Distance: {html.escape(str(summary.get("measure", "")))}; near-identical below '
             f"{summary['threshold']:g}{default}.</p>"]
    groups = findings.groups()
    if groups:
        parts.append(f"<h3>Groups ({len(groups)} of {summary['groups']:,} shown: mixed labels first, then the "
                     "largest)</h3>" + photos.duplicate_groups_html(findings, thumbnails))
    if findings.found.leaks is not None:
        leaked = sorted(summary.get("leaked_per_class", {}).items(), key=lambda item: (-item[1], item[0]))
        parts.append(f"<h3>Test images leaked from training</h3><p>{summary.get('leaked_test_images', 0):,} of "
                     f"{summary.get('test_images', 0):,} test images of {html.escape(str(summary['test_run']))} "
                     "have a near-identical training image.</p>")
        if leaked:
            parts.append(_table(["class", "leaked test images"], leaked[:LEAKING_CLASSES_SHOWN], [False, True])
                         + photos.leaks_html(findings, thumbnails))
    histogram = summary.get("nn_distance_histogram") or []
    if histogram:
        parts.append("<details><summary>each training image's distance to its nearest other image</summary>"
                     + _table(["from", "to", "images"], [(b["from"], b["to"], b["images"]) for b in histogram],
                              [True, True, True]) + "</details>")
    return f'<section id="duplicates"><h2>Near-duplicates and leaked test images</h2>{"".join(parts)}</section>'


def _config_section(documents: RunDocuments) -> str:
    info = documents.model_info
    model_rows = [("model", info["model"]), ("weights", info["weights"]), ("weights sha256", info["weights_sha256"]),
                  ("ONNX sha256", info["onnx_sha256"]), ("input size", f"{info['image_size']} px"),
                  ("interpolation", info["interpolation"]), ("normalisation mean", str(info["mean"])),
                  ("normalisation std", str(info["std"]))]
    versions = sorted(info.get("versions", {}).items())
    return ("<h3>Feature model</h3>" + _table(["", ""], model_rows)
            + "<h3>Versions</h3>" + _table(["package", "version"], versions)
            + "<h3>Resolved configuration (config.yaml)</h3>"
            + f"<pre>{html.escape(documents.config_text)}</pre>")

