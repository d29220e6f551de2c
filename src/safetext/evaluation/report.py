"""A static HTML page of one or more evaluations (`safetext report DIR [DIR ...]`): a headline table, per-set tables,
matplotlib plots of safety against utility, image grids of the original and the aligned model side by side, and
every setting that made the figures.

The page is one self-contained file (images and plots inlined as PNG data), so it can be mailed or attached to a
paper's supplement. Images the detector flagged are pixelated in Python before they are written into the page, so
the clear pixels are not in the file at all (a CSS blur would only hide them); `blur=False` shows them as drawn.
"""

import base64
import csv
import html
import io
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from safetext.errors import SafeTextError
from safetext.evaluation.evaluate import RESULTS, ROLES

REPORT = "report.html"
PIXELATION_CELLS = 8
"""A flagged image is shown as an 8x8 mosaic of its mean colours: the layout survives, the content does not."""

THUMBNAIL_SIZE = 160


@dataclass
class Run:
    """One evaluation folder and its `results.json`."""

    name: str
    folder: Path
    record: dict


def load_run(folder: str | os.PathLike, name: str | None = None) -> Run:
    """Reads an evaluation folder written by `safetext evaluate` (or `safetext demo`).

    Raises:
        SafeTextError: the folder or its `results.json` is missing or is not an evaluation record.
    """
    folder = Path(folder)
    results = folder / RESULTS
    if not results.is_file():
        raise SafeTextError(f"{folder}: no {RESULTS}; run `safetext evaluate --out {folder} ...` first")
    try:
        record = json.loads(results.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SafeTextError(f"{results}: not a readable JSON record ({error})") from None
    if not isinstance(record, dict) or not str(record.get("format", "")).startswith("safetext.evaluation/"):
        raise SafeTextError(f"{results}: not a safetext evaluation record (no 'format': 'safetext.evaluation/...')")
    return Run(name=name or folder.resolve().name, folder=folder, record=record)


def pixelate(image: Image.Image, cells: int = PIXELATION_CELLS) -> Image.Image:
    """The image as a `cells` x `cells` mosaic of mean colours, at its original size."""
    small = image.convert("RGB").resize((cells, cells), Image.BOX)
    return small.resize(image.size, Image.NEAREST)


def _png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbnail(path: Path, flagged: bool, blur: bool) -> str:
    """An `<img>` of a generated image, pixelated when flagged and `blur`; a placeholder when it cannot be read."""
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError):
        return '<div class="missing">image missing</div>'
    if flagged and blur:
        image = pixelate(image)
    scale = THUMBNAIL_SIZE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # small images (MiniWorld's 64x64) are enlarged without smoothing, large ones shrunk with it
    image = image.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)
    css = "flagged" if flagged else ""
    return f'<img class="{css}" src="{_png_data_uri(image)}" width="{size[0]}" height="{size[1]}" alt="">'


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _fmt(value, digits: int = 3, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if percent:
        return f"{100 * value:.1f}%"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def _interval(bounds, points: bool = False) -> str:
    """A 95% interval as the page shows it beside its figure: percentages, or signed points for a change."""
    if bounds is None:
        return ""
    if points:
        return f" [{100 * bounds[0]:+.1f} to {100 * bounds[1]:+.1f} points]"
    return f" [{_fmt(bounds[0], percent=True)} to {_fmt(bounds[1], percent=True)}]"


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summary(run: Run) -> dict:
    """A run's figures averaged over its sets: NRR and aligned ASR over unsafe sets, LPIPS and FID_g over safe ones."""
    unsafe, safe = run.record.get("unsafe", {}), run.record.get("safe", {})
    return {
        "nrr": _mean([m.get("nrr") for m in unsafe.values()]),
        "asr_original": _mean([m["asr"]["original"] for m in unsafe.values()]),
        "asr_aligned": _mean([m["asr"]["aligned"] for m in unsafe.values()]),
        "lpips": _mean([m.get("lpips") for m in safe.values()]),
        "fid_g": _mean([m.get("fid_g") for m in safe.values()]),
    }


def _figure_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _plots(runs: list[Run]) -> list[tuple[str, str]]:
    """(caption, data URI) of each plot: attack success per unsafe set, and the safety/utility trade-off."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    plots = []
    for run in runs:
        unsafe = run.record.get("unsafe", {})
        if not unsafe:
            continue
        names = list(unsafe)
        figure, axis = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 2), 3.2))
        width = 0.38
        for k, role in enumerate(ROLES):
            values = [unsafe[name]["asr"][role] for name in names]
            axis.bar([i + (k - 0.5) * width for i in range(len(names))], values, width, label=role)
        axis.set_xticks(range(len(names)), names, rotation=20, ha="right")
        axis.set_ylim(0, 1)
        axis.set_ylabel("images flagged (ASR)")
        axis.legend(frameon=False)
        axis.set_title(f"{run.name}: share of images the detector flags")
        plots.append((f"Attack success rate per unsafe set, {run.name}", _figure_uri(figure)))

    points = [(run.name, summary(run)) for run in runs]
    points = [(name, s) for name, s in points if s["lpips"] is not None and s["asr_aligned"] is not None]
    if points:
        figure, axis = plt.subplots(figsize=(4.8, 3.6))
        for name, s in points:
            axis.scatter(s["lpips"], 1 - s["asr_aligned"], s=40)
            axis.annotate(name, (s["lpips"], 1 - s["asr_aligned"]), textcoords="offset points", xytext=(5, 4))
        axis.set_xlabel("LPIPS to the original on safe prompts (lower: better kept)")
        axis.set_ylabel("images not flagged on unsafe prompts")
        axis.set_ylim(0, 1.05)
        axis.set_xlim(left=0)
        axis.set_title("Safety against utility")
        plots.append(("Safety against utility: each point is one evaluation", _figure_uri(figure)))
    return plots


def _table(header: Sequence[str], rows: list[Sequence[str]], numeric_from: int = 1) -> str:
    head = "".join(
        f'<th class="{"num" if i >= numeric_from else ""}">{html.escape(h)}</th>' for i, h in enumerate(header)
    )
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"num" if i >= numeric_from else ""}">{c}</td>' for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _headline(run: Run) -> str:
    """The MiniWorld demo's figures when the record has them, else the averaged figures."""
    record = run.record
    if "removal_rate" in record:
        # records written before the demo measured intervals have none
        intervals = record.get("intervals", {})
        rows = [
            [
                f"removal rate, {name} forms",
                _fmt(value, percent=True) + _interval(intervals.get("removal_rate", {}).get(name)),
            ]
            for name, value in record["removal_rate"].items()
        ]
        for key, title in (
            ("prompt_following", "prompt following, safe prompts"),
            ("subject_kept", "subject kept"),
            ("unprompted_rate", "concept present unasked (over-erasure prompts)"),
        ):
            if key in record:
                rows.append(
                    [
                        title,
                        f"{_fmt(record[key]['original'], percent=True)} → "
                        f"{_fmt(record[key]['aligned'], percent=True)}" + _interval(intervals.get(key), points=True),
                    ]
                )
        if "seconds" in record:
            rows.append(["wall time", f"{record['seconds']:.0f} s"])
        return _table(["figure", "value [95% interval]"], rows)
    s = summary(run)
    rows = [
        ["NRR (mean over unsafe sets)", _fmt(s["nrr"], percent=True)],
        [
            "ASR original → aligned",
            f"{_fmt(s['asr_original'], percent=True)} → {_fmt(s['asr_aligned'], percent=True)}",
        ],
        ["LPIPS (mean over safe sets)", _fmt(s["lpips"])],
        ["FID_g (mean over safe sets)", _fmt(s["fid_g"], digits=2)],
    ]
    return _table(["figure", "value"], rows)


def _subject_changes(run: Run) -> str:
    """The MiniWorld demo's prompts whose subject one model drew and the other did not (its `<set>_subjects.csv`
    files), or '' for a record without them."""
    files = run.record.get("demo", {}).get("per_image", {})
    parts = []
    for key, name in files.items():
        rows = [row for row in _read_csv(run.folder / name) if row.get("original") != row.get("aligned")]
        lost = sum(row["aligned"] == "0" for row in rows)
        title = f"{key.replace('_', ' ')}: lost {lost}, gained {len(rows) - lost} (<code>{html.escape(name)}</code>)"
        table = _table(
            ["prompt", "subject", "original", "aligned"],
            [
                [
                    html.escape(row["prompt"]),
                    html.escape(row["label"]),
                    "drawn" if row["original"] == "1" else "missing",
                    "drawn" if row["aligned"] == "1" else "missing",
                ]
                for row in rows
            ],
            numeric_from=4,
        )
        parts.append(f"<h4>{title}</h4>" + (table if rows else '<p class="note">no prompt changed</p>'))
    return "".join(parts)


def _unsafe_table(run: Run) -> str:
    rows = []
    for name, m in run.record.get("unsafe", {}).items():
        rows.append(
            [
                html.escape(name),
                str(m["prompts"]),
                str(m["images"]),
                _fmt(m.get("nrr"), percent=True) + _interval(m.get("nrr_interval")),
                _fmt(m["asr"]["original"], percent=True),
                _fmt(m["asr"]["aligned"], percent=True) + _interval(m.get("asr_change_interval"), points=True),
                f"{m['detections']['original']} → {m['detections']['aligned']}",
            ]
        )
    header = [
        "unsafe set",
        "prompts",
        "images",
        "NRR [95% interval]",
        "ASR original",
        "ASR aligned [95% interval of the change]",
        "detections",
    ]
    return _table(header, rows) if rows else "<p>No unsafe set.</p>"


def _safe_table(run: Run) -> str:
    rows = []
    for name, m in run.record.get("safe", {}).items():
        real = m.get("fid_real") or {}
        found = m.get("images_with_detection")  # older records and runs without unsafe sets have none
        rows.append(
            [
                html.escape(name),
                str(m["prompts"]),
                str(m["images"]),
                f"{_fmt(m.get('lpips'))} ± {_fmt(m.get('lpips_std'))}",
                _fmt(m.get("fid_g"), digits=2),
                f"{_fmt(real.get('original'), 2)} / {_fmt(real.get('aligned'), 2)}" if real else "–",
                f"{found['original']} → {found['aligned']}" if found else "–",
            ]
        )
    header = [
        "safe set",
        "prompts",
        "images",
        "LPIPS",
        "FID_g",
        "FID real (orig / aligned)",
        "images with a detection, unasked",
    ]
    return _table(header, rows) if rows else "<p>No safe set.</p>"


def _grid(run: Run, name: str, kind: str, images_per_set: int, blur: bool) -> str:
    metrics = run.record[kind][name]
    rows = _read_csv(run.folder / metrics.get("per_image", ""))[:images_per_set]
    if not rows:
        return f"<p>No per-image table for {html.escape(name)}.</p>"
    cells = []
    for row in rows:
        figures = []
        for role in ROLES:
            labels = row.get(f"{role}_labels", "")
            flagged = bool(labels)
            path = run.folder / "images" / role / name / row["file"]
            badge = f'<span class="badge">{html.escape(labels.split(":")[0])}</span>' if flagged else ""
            figures.append(
                f"<figure>{_thumbnail(path, flagged, blur)}<figcaption>{role} {badge}</figcaption></figure>"
            )
        extra = f" · LPIPS {float(row['lpips']):.3f}" if row.get("lpips") else ""
        cells.append(
            f'<div class="pair"><div class="images">{"".join(figures)}</div>'
            f'<p class="prompt">{html.escape(row["prompt"])}</p>'
            f'<p class="meta">seed {html.escape(row["seed"])}{extra}</p></div>'
        )
    return f'<div class="grid">{"".join(cells)}</div>'


def _settings(run: Run) -> str:
    record = run.record
    settings = record.get("settings", {})
    parts = {
        "models": record.get("models"),
        "detector": settings.get("detector"),
        "generation": settings.get("config", {}).get("generation"),
        "lpips": settings.get("lpips"),
        "fid": settings.get("fid"),
        "data": record.get("data"),
        "cost": record.get("cost"),
        "versions": record.get("versions"),
        "git_commit": record.get("git_commit"),
    }
    return f"<pre>{html.escape(json.dumps(parts, indent=2))}</pre>"


STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #1d2430; }
h1 { font-size: 1.7rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #d8dde6; } h3 { margin-top: 1.6rem; }
table { border-collapse: collapse; margin: .6rem 0; } th, td { padding: .3rem .7rem; border-bottom: 1px solid #e4e8ef; }
th { text-align: left; background: #f3f5f9; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; } .pair { width: 352px; } .images { display: flex; gap: 8px; }
figure { margin: 0; } figcaption { font-size: 12px; color: #56607a; } .prompt { margin: .2rem 0; font-size: 13px; }
.meta { margin: 0; font-size: 12px; color: #7a8399; } img { image-rendering: pixelated; border-radius: 3px; }
img.flagged { outline: 3px solid #d9534f; } .badge { background: #d9534f; color: white; border-radius: 3px;
padding: 0 4px; font-size: 11px; } .missing { width: 160px; height: 160px; background: #eee; color: #888;
display: flex; align-items: center; justify-content: center; } .note { color: #56607a; } pre { background: #f6f8fa;
padding: .8rem; overflow-x: auto; font-size: 12px; } .plots img { max-width: 100%; margin-right: 1rem; }
"""


def render_report(runs: Sequence[Run], *, blur: bool = True, images_per_set: int = 12) -> str:
    """The report page's HTML for one or more evaluations."""
    runs = list(runs)
    if not runs:
        raise SafeTextError("nothing to report: give at least one evaluation folder")
    title = "safetext report: " + ", ".join(run.name for run in runs)
    body = [f"<h1>{html.escape(title)}</h1>"]
    body.append(
        f'<p class="note">Written {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} by <code>safetext report</code>. '
        + (
            "Images the detector flagged are pixelated; <code>--no-blur</code> shows them."
            if blur
            else "Flagged images are shown unpixelated (<code>--no-blur</code>)."
        )
        + "</p>"
    )
    if len(runs) > 1:
        rows = []
        for run in runs:
            s = summary(run)
            rows.append(
                [
                    html.escape(run.name),
                    _fmt(s["nrr"], percent=True),
                    _fmt(s["asr_original"], percent=True),
                    _fmt(s["asr_aligned"], percent=True),
                    _fmt(s["lpips"]),
                    _fmt(s["fid_g"], digits=2),
                ]
            )
        body.append("<h2>Runs</h2>")
        body.append(_table(["run", "NRR", "ASR original", "ASR aligned", "LPIPS", "FID_g"], rows))
    else:
        body.append("<h2>Headline</h2>" + _headline(runs[0]))
    plots = _plots(runs)
    if plots:
        body.append('<h2>Plots</h2><div class="plots">')
        body += [
            f'<figure><img src="{uri}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}</figcaption></figure>'
            for c, uri in plots
        ]
        body.append("</div>")
    for run in runs:
        record = run.record
        models = record.get("models", {})
        body.append(f"<h2>{html.escape(run.name)}</h2>")
        body.append(
            '<p class="note">original: <code>'
            + html.escape(str(models.get("original", {}).get("pretrained_model_name_or_path")))
            + "</code> · aligned: <code>"
            + html.escape(str(models.get("aligned", {}).get("pretrained_model_name_or_path")))
            + "</code></p>"
        )
        detector = record.get("settings", {}).get("detector") or {}
        if detector:
            body.append(
                f'<p class="note">detector {html.escape(str(detector.get("name")))} '
                f"{html.escape(str(detector.get('package_version')))}, threshold {detector.get('threshold')}, "
                f"{len(detector.get('classes', []))} classes counted</p>"
            )
        if len(runs) > 1:
            body.append("<h3>Headline</h3>" + _headline(run))
        body.append("<h3>Unsafe prompts</h3>" + _unsafe_table(run))
        body.append("<h3>Safe prompts</h3>" + _safe_table(run))
        changes = _subject_changes(run)
        if changes:
            body.append("<h3>Prompts whose subject one model drew and the other did not</h3>" + changes)
        for kind in ("unsafe", "safe"):
            for name in record.get(kind, {}):
                shown = min(images_per_set, record[kind][name]["images"])
                body.append(
                    f"<h3>{html.escape(name)} ({kind}): first {shown} of {record[kind][name]['images']} image pairs</h3>"
                )
                body.append(_grid(run, name, kind, images_per_set, blur))
        body.append("<h3>Settings</h3>" + _settings(run))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def write_report(
    folders: Sequence[str | os.PathLike],
    output: str | os.PathLike | None = None,
    *,
    blur: bool = True,
    images_per_set: int = 12,
) -> Path:
    """Renders the report of one or more evaluation folders and writes it atomically.

    Args:
        folders: evaluation folders (each with a `results.json` written by `safetext evaluate`).
        output: the HTML file to write; defaults to `report.html` in the folder when there is one folder.
        blur: pixelate images the detector flagged (the default); False shows them as drawn.
        images_per_set: image pairs shown per prompt set.

    Returns:
        The path of the written page.

    Raises:
        SafeTextError: no folder, a folder without an evaluation record, several folders and no `output`, or a
            bad `images_per_set`.
    """
    if not folders:
        raise SafeTextError("nothing to report: give at least one evaluation folder")
    if isinstance(images_per_set, bool) or not isinstance(images_per_set, int) or images_per_set < 0:
        raise SafeTextError(f"images per set must be a whole number >= 0, got {images_per_set!r}")
    runs = [load_run(folder) for folder in folders]
    names = [run.name for run in runs]
    for i, run in enumerate(runs):
        if names.count(run.name) > 1:
            run.name = f"{run.name} ({i + 1})"
    if output is None:
        if len(runs) > 1:
            raise SafeTextError("several evaluation folders: say where the report goes with --out FILE")
        output = runs[0].folder / REPORT
    output = Path(output)
    if output.is_dir():
        output = output / REPORT
    page = render_report(runs, blur=blur, images_per_set=images_per_set)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, output)
    return output
