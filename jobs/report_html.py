"""A job's report as ONE self-contained HTML page: totals, rate over time, failures, thumbnails.

Why one file: it is opened from a bucket, a laptop or a mail attachment, often with no network,
so everything is inline: CSS in a ``<style>``, the chart as inline SVG, the thumbnails as small
JPEG ``data:`` URIs. No script runs in the page.

What it reads is bounded, however big the job: the group roll-ups (one per group of up to 1000
shards), and the manifest parts of the few groups that hold an example of each failure class or
flagged output (of those read, the lowest quality scores are shown first), and of a spread of
groups for the sample. Every output shown is its latest
record from the part (a redo's record, new flags included, replaces the original one).
Thumbnails are re-encoded small and stop at a byte budget. Submitter side: Pillow and pyarrow,
never torch.
"""
from __future__ import annotations

import base64
import html
import io
import time
import urllib.parse
from dataclasses import dataclass, field

from cutout.jobs import manifest, manifest_parts, storage
from cutout.jobs.errors import CutoutError
from cutout.jobs.layout import JobLayout
from cutout.jobs.records import ItemRecord
from cutout.jobs.rollup import Tally

THUMB_SIDE = 160  # px, long side
SAMPLE_SIZE = 12  # done outputs shown as a sample
FLAGGED_PER_FLAG = 6  # flagged outputs shown per flag
THUMB_BUDGET_BYTES = 2_000_000  # total size of every data: URI in the page
MAX_THUMB_SOURCE_BYTES = 64 * 1024 * 1024  # inputs bigger than this get no preview
CHART_BINS = 40
SAMPLE_GROUPS = 3  # parts the sample is drawn from (spread over the job)


@dataclass
class Tile:
    record: ItemRecord
    input_thumb: str | None = None  # data: URIs
    output_thumb: str | None = None


@dataclass
class ShardRun:
    """When a shard ran and how many inputs it finished (from its group's roll-up)."""

    started_at: float
    finished_at: float
    items: int


@dataclass
class ReportData:
    job_id: str
    summary: manifest.JobSummary
    runs: list[ShardRun]
    failure_examples: dict[str, ItemRecord] = field(default_factory=dict)
    flagged: dict[str, list[Tile]] = field(default_factory=dict)
    sample: list[Tile] = field(default_factory=list)


# --- gathering ----------------------------------------------------------------------------------
def gather(job_prefix: str, job_id: str, *, sample_size: int = SAMPLE_SIZE,
           budget: int = THUMB_BUDGET_BYTES) -> ReportData:
    """Everything the page shows, reading the roll-ups and only the parts it needs."""
    state = manifest_parts.groups_state(job_prefix)
    manifest_parts.build_missing(job_prefix, state)
    summary = manifest.summarise(job_prefix, state=state)
    rollups = [rollup for group, rollup in sorted(state.rollups.items()) if state.current(group)]
    runs = [ShardRun(s["started_at"], s["finished_at"], s["items"]) for r in rollups for s in r["shards"]]
    data = ReportData(job_id, summary, runs)
    wanted = _groups_to_read(rollups, sample_size)
    sample_groups = set(wanted["sample"])
    per_group = -(-sample_size // max(1, len(sample_groups)))  # fill the sample from few groups too
    for group in sorted(set().union(*wanted.values())):
        table = manifest_parts.read_part(job_prefix, group)
        if table is not None:
            records = _rows_worth_showing(table, per_group if group in sample_groups else 0)
            _collect(data, records, per_group if group in sample_groups else 0, sample_size)
    thumbs = _ThumbBudget(budget)
    for tiles in data.flagged.values():
        for tile in tiles:
            thumbs.fill(tile)
    for tile in data.sample:
        thumbs.fill(tile)
    return data


def _rows_worth_showing(table, for_sample: int) -> list[ItemRecord]:
    """Of a part (up to 10^6 rows), only the rows the page can show become records: the first
    failure of each error class, the few lowest-scored outputs of each flag, and the first
    unflagged done outputs for the sample."""
    import pyarrow.compute as pc

    done = pc.equal(table["status"], "done")
    failed = table.filter(pc.equal(table["status"], "failed"))
    flagged = table.filter(pc.and_(done, pc.greater(pc.list_value_length(table["flags"]), 0)))
    scores = pc.map_lookup(flagged["quality"], "score", "first")  # the worst outputs first
    flagged = flagged.take(pc.array_sort_indices(scores, null_placement="at_end"))
    plain = table.filter(pc.and_(done, pc.equal(pc.list_value_length(table["flags"]), 0)))
    first_of_class: dict[str, int] = {}
    for index, name in enumerate(failed["error_class"].to_pylist()):
        first_of_class.setdefault(name, index)
    shown: dict[str, int] = {}
    flag_rows = []
    for index, flags in enumerate(flagged["flags"].to_pylist()):
        if any(shown.get(flag, 0) < FLAGGED_PER_FLAG for flag in flags):
            flag_rows.append(index)
            for flag in flags:
                shown[flag] = shown.get(flag, 0) + 1
    picked = [failed.take(sorted(first_of_class.values())), flagged.take(flag_rows), plain.slice(0, for_sample)]
    return [ItemRecord.model_validate(manifest_parts.plain_row(row)) for part in picked for row in part.to_pylist()]


def _groups_to_read(rollups: list[dict], sample_size: int) -> dict[str, list[int]]:
    """Groups holding the first example of each error class and flag, and a spread for the sample."""
    classes_seen: set[str] = set()
    flags_seen: dict[str, int] = {}
    failures, flagged = [], []
    for rollup in rollups:
        tally = Tally.from_fields(rollup["fields"])
        if set(tally.error_classes) - classes_seen:
            failures.append(rollup["group"])
            classes_seen |= set(tally.error_classes)
        if any(flags_seen.get(f, 0) < FLAGGED_PER_FLAG for f in tally.flag_counts):
            flagged.append(rollup["group"])
            for name, count in tally.flag_counts.items():
                flags_seen[name] = flags_seen.get(name, 0) + count
    with_done = [r["group"] for r in rollups if Tally.from_fields(r["fields"]).counts.get("done", 0)]
    step = max(1, len(with_done) // SAMPLE_GROUPS)
    return {"failures": failures, "flagged": flagged, "sample": with_done[::step][:SAMPLE_GROUPS]}


def _collect(data: ReportData, records: list[ItemRecord], for_sample: int, sample_size: int) -> None:
    """Failure examples, flagged outputs, and up to ``for_sample`` unflagged done outputs."""
    for record in records:
        if record.status == "failed" and record.error_class not in data.failure_examples:
            data.failure_examples[record.error_class or "UnknownError"] = record
        if record.status != "done":
            continue
        for flag in record.flags:  # keep the lowest quality scores: the worst outputs first
            tiles = data.flagged.setdefault(flag, [])
            tiles.append(Tile(record))
            tiles.sort(key=_score)
            del tiles[FLAGGED_PER_FLAG:]
        if for_sample > 0 and not record.flags and len(data.sample) < sample_size:
            data.sample.append(Tile(record))
            for_sample -= 1


def _score(tile: "Tile") -> float:
    """The output's quality score (cutout.workers.quality); 1 when the record has none."""
    return tile.record.quality.get("score", 1.0)


class _ThumbBudget:
    """Makes thumbnails until the page's image bytes reach the budget; later tiles get none."""

    def __init__(self, budget: int):
        self.left = budget

    def fill(self, tile: Tile) -> None:
        if self.left <= 0:
            return
        tile.input_thumb = self._thumb(tile.record.input_uri, checker=False)
        if tile.record.output_uris:
            tile.output_thumb = self._thumb(tile.record.output_uris[0], checker=True)

    def _thumb(self, uri: str, *, checker: bool) -> str | None:
        try:
            data = storage.read_bytes(uri, max_bytes=MAX_THUMB_SOURCE_BYTES)
            text = thumbnail_data_uri(data, checker=checker)
        except (CutoutError, OSError, ValueError):
            return None  # no preview; the record still says what happened
        self.left -= len(text)
        return text


def thumbnail_data_uri(data: bytes, *, side: int = THUMB_SIDE, checker: bool = False) -> str:
    """A small JPEG ``data:`` URI; with ``checker`` transparency shows over a checkerboard."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (side * 2, side * 2))  # JPEG: decode at reduced size
        image.thumbnail((side, side))
        rgba = image.convert("RGBA")
    base = _checkerboard(rgba.size) if checker else Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    base.alpha_composite(rgba)
    buffer = io.BytesIO()
    base.convert("RGB").save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _checkerboard(size: tuple[int, int], cell: int = 8):
    from PIL import Image, ImageDraw

    board = Image.new("RGBA", size, (255, 255, 255, 255))
    draw = ImageDraw.Draw(board)
    for y in range(0, size[1], cell):
        for x in range((y // cell % 2) * cell, size[0], 2 * cell):
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(204, 204, 204, 255))
    return board


# --- rendering ----------------------------------------------------------------------------------
def render(data: ReportData) -> str:
    summary = data.summary
    state = "complete" if summary.complete else "not finished"
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>cutout job {_e(data.job_id)}</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>cutout job <code>{_e(data.job_id)}</code> <span class='state {state.split()[0]}'>{state}</span></h1>",
        f"<p class='meta'>outputs: <code>{_e(summary.destination or '?')}</code> · "
        f"records: <code>{_e(summary.job_prefix)}</code> · generated "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</p>",
        _totals(data), _rate_section(data.runs), _failures(data), _flag_section(data),
        _sample_section(data), "</body></html>",
    ]
    return "\n".join(parts)


def _totals(data: ReportData) -> str:
    summary = data.summary
    processed = summary.items_processed
    cards = [("inputs", summary.items_total if summary.items_total is not None else "?")]
    cards += [(name, summary.counts.get(name, 0)) for name in ("done", "failed", "skipped")]
    cards.append(("shards", f"{summary.shards_done}/{summary.shards_total}"))
    span = _span(data.runs)
    if span:
        cards.append(("wall time", _duration(span)))
        cards.append(("mean rate", f"{processed / span:.2f}/s"))
    cards.append(("flagged", sum(summary.flag_counts.values())))
    items = "".join(f"<div class='card'><b>{_e(str(v))}</b><span>{_e(k)}</span></div>" for k, v in cards)
    return f"<section><h2>Totals</h2><div class='cards'>{items}</div></section>"


def _span(runs: list[ShardRun]) -> float:
    if not runs:
        return 0.0
    return max(s.finished_at for s in runs) - min(s.started_at for s in runs)


def _rate_section(runs: list[ShardRun]) -> str:
    return f"<section><h2>Rate over time</h2>{rate_chart_svg(runs)}</section>"


def rate_chart_svg(runs: list[ShardRun], *, width: int = 880, height: int = 220, bins: int = CHART_BINS) -> str:
    """Bars: inputs finished per second in each time bin (from shard finish times); line: the
    cumulative share of inputs finished."""
    if not runs:
        return "<p class='muted'>no group of shards has finished yet</p>"
    start = min(s.started_at for s in runs)
    span = max(_span(runs), 1e-6)
    counts = [0] * bins
    for shard in runs:
        index = min(bins - 1, int((shard.finished_at - start) / span * bins))
        counts[index] += shard.items
    rates = [c / (span / bins) for c in counts]
    top = max(rates) or 1.0
    left, bottom, plot_w, plot_h = 48, height - 28, width - 60, height - 44
    bar_w = plot_w / bins
    shapes = []
    for i, rate in enumerate(rates):
        h = plot_h * rate / top
        shapes.append(f"<rect x='{left + i * bar_w + 1:.1f}' y='{bottom - h:.1f}' width='{bar_w - 2:.1f}' "
                      f"height='{h:.1f}' class='bar'><title>{rate:.2f}/s</title></rect>")
    total, running, points = sum(counts) or 1, 0, [f"{left},{bottom}"]
    for i, count in enumerate(counts):
        running += count
        points.append(f"{left + (i + 1) * bar_w:.1f},{bottom - plot_h * running / total:.1f}")
    axes = (
        f"<line x1='{left}' y1='{bottom}' x2='{left + plot_w}' y2='{bottom}' class='axis'/>"
        f"<line x1='{left}' y1='{bottom}' x2='{left}' y2='{bottom - plot_h}' class='axis'/>"
        f"<text x='{left - 6}' y='{bottom - plot_h + 10}' text-anchor='end'>{top:.1f}/s</text>"
        f"<text x='{left - 6}' y='{bottom}' text-anchor='end'>0</text>"
        f"<text x='{left}' y='{height - 8}'>0 s</text>"
        f"<text x='{left + plot_w}' y='{height - 8}' text-anchor='end'>{_duration(span)}</text>"
        f"<text x='{left + plot_w / 2:.0f}' y='{height - 8}' text-anchor='middle' class='cum'>"
        f"bars: inputs finished per second · line: cumulative share finished</text>"
    )
    return (f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' width='{width}' "
            f"height='{height}' role='img' aria-label='inputs per second over time'>{axes}{''.join(shapes)}"
            f"<polyline points='{' '.join(points)}' class='cumline'/></svg>")


def _failures(data: ReportData) -> str:
    classes = data.summary.error_classes
    if not classes:
        return "<section><h2>Failures</h2><p class='muted'>none</p></section>"
    failed = sum(classes.values())
    rows = []
    for name, count in classes.items():
        example = data.failure_examples.get(name)
        rows.append(
            f"<tr><td><code>{_e(name)}</code></td><td class='num'>{count}</td>"
            f"<td class='num'>{100 * count / failed:.1f} %</td>"
            f"<td>{_e(example.stage or '') if example else ''}</td>"
            f"<td><code>{_e(display_uri(example.input_uri)) if example else ''}</code></td>"
            f"<td class='msg'>{_e((example.error or '')[:300]) if example else ''}</td></tr>"
        )
    head = "<tr><th>error class</th><th>inputs</th><th>share</th><th>stage</th><th>example input</th><th>message</th></tr>"
    return f"<section><h2>Failures</h2><table>{head}{''.join(rows)}</table></section>"


def _flag_section(data: ReportData) -> str:
    counts = data.summary.flag_counts
    if not counts:
        return "<section><h2>Flagged outputs</h2><p class='muted'>no output was flagged</p></section>"
    blocks = []
    for name, count in counts.items():
        tiles = data.flagged.get(name, [])
        blocks.append(f"<h3><code>{_e(name)}</code> × {count} <span class='muted'>(showing {len(tiles)}; "
                      f"rerun: <code>cutout redo {_e(data.job_id)} --flag {_e(name)}</code>)</span></h3>"
                      f"<div class='grid'>{''.join(_tile(t) for t in tiles)}</div>")
    return f"<section><h2>Flagged outputs</h2>{''.join(blocks)}</section>"


def _sample_section(data: ReportData) -> str:
    if not data.sample:
        return "<section><h2>Sample of done outputs</h2><p class='muted'>none yet</p></section>"
    return (f"<section><h2>Sample of done outputs</h2><p class='muted'>before and after, output over a "
            f"checkerboard</p><div class='grid'>{''.join(_tile(t) for t in data.sample)}</div></section>")


def _tile(tile: Tile) -> str:
    record = tile.record
    name = display_uri(record.input_uri).rsplit("/", 1)[-1]
    images = "".join(
        f"<img src='{thumb}' alt='{label}'>" if thumb else f"<div class='noimg'>no {label} preview</div>"
        for thumb, label in ((tile.input_thumb, "input"), (tile.output_thumb, "output"))
    )
    chips = "".join(f"<span class='chip'>{_e(f)}</span>" for f in record.flags)
    quality = " · ".join(f"{_e(k)} {v:.2f}" for k, v in sorted(record.quality.items()))
    return (f"<figure><div class='pair'>{images}</div><figcaption title='{_e(record.input_uri)}'>"
            f"{_e(name)}{chips}<small>{quality}</small></figcaption></figure>")


def display_uri(uri: str) -> str:
    """A URI for people: the query string (often a signature or token) is left out."""
    if uri.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(uri)
        return urllib.parse.urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))
    return uri


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2430;background:#fafbfc}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
h3{font-size:14px;margin:16px 0 8px}code{font:12px ui-monospace,Menlo,Consolas,monospace}
.meta,.muted{color:#667085}.state{font-size:12px;padding:2px 8px;border-radius:10px;vertical-align:middle}
.state.complete{background:#dcfae6;color:#085d3a}.state.not{background:#fef0c7;color:#93370d}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:10px 16px;min-width:90px}
.card b{display:block;font-size:20px}.card span{color:#667085;font-size:12px}
svg text{font-size:11px;fill:#667085}.bar{fill:#7aa7e0}.axis{stroke:#98a2b3}.cumline{fill:none;stroke:#d9480f;stroke-width:2}
.cum{fill:#d9480f}table{border-collapse:collapse;background:#fff}th,td{border:1px solid #dde1e6;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#f2f4f7}.num{text-align:right;white-space:nowrap}.msg{max-width:420px;word-break:break-word;color:#475467}
.grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:8px;width:336px}
.pair{display:flex;gap:8px;align-items:center;justify-content:center;min-height:120px}.pair img{max-width:160px;max-height:160px}
.noimg{width:160px;height:120px;display:flex;align-items:center;justify-content:center;background:#f2f4f7;color:#98a2b3;font-size:12px}
figcaption{font-size:12px;margin-top:6px;word-break:break-all}figcaption small{display:block;color:#667085}
.chip{display:inline-block;background:#fee4e2;color:#912018;border-radius:8px;padding:0 6px;margin-left:4px;font-size:11px}
"""


# --- writing ------------------------------------------------------------------------------------
def write_report(job_prefix: str, job_id: str, *, local_path: str | None = None,
                 to_destination: bool = True) -> list[str]:
    """Render the page and write it into the job's folder and/or ``local_path``; the URIs written."""
    page = render(gather(job_prefix, job_id)).encode()
    written = []
    if to_destination:
        uri = JobLayout.from_prefix(job_prefix).report
        storage.write_bytes(uri, page, content_type="text/html; charset=utf-8")
        written.append(uri)
    if local_path:
        storage.write_bytes(local_path, page, content_type="text/html; charset=utf-8")
        written.append(local_path)
    return written
