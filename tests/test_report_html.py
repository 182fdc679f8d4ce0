"""The job report page (cutout.jobs.report_html): built from a destination written with the real
manifest writers, rendered in a real headless Chromium (Debian's package), and checked there: the
screenshot is not blank, the text is in the DOM, and every thumbnail decoded (naturalWidth > 0)."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cutout.jobs import manifest, sharding, storage
from cutout.jobs.records import ItemRecord, ShardStats
from cutout.jobs.spec import JobSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "coins", "camera", "clock", "moon"]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _photo(index: int, side: int = 240) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, PHOTOS[index % len(PHOTOS)])()
    if array.ndim == 2:
        array = np.dstack([array] * 3)
    image = Image.fromarray(array[..., :3])
    image.thumbnail((side, side))
    return image


def _cutout(photo: Image.Image, coverage: float) -> Image.Image:
    """The photo with an elliptical alpha covering about ``coverage`` of the frame."""
    w, h = photo.size
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.sqrt(max(coverage, 1e-3) / np.pi)
    inside = ((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) < r * r
    alpha = np.where(inside, 255, 0).astype(np.uint8) if coverage < 1 else np.full((h, w), 255, np.uint8)
    return Image.fromarray(np.dstack([np.asarray(photo), alpha]), "RGBA")


def build_job(root: Path, shards: int = 6, per_shard: int = 4) -> tuple[str, str]:
    """A finished job's destination: real inputs and outputs, records with quality flags and
    failures of two classes, stats with spread-out finish times. Returns (job_prefix, job_id)."""
    source, dest = root / "in", root / "out"
    source.mkdir(parents=True, exist_ok=True)
    spec = JobSpec(sources=(str(source),), destination=str(dest))
    prefix = sharding.job_prefix(str(dest), spec.job_id)
    manifest.save_spec(prefix, spec)
    start = time.time() - 600
    n = 0
    for s in range(shards):
        shard_id = sharding.shard_id_for(s)
        items, records = [], []
        for i in range(per_shard):
            uri = str(source / f"photo_{n:03d}.png")
            output = str(dest / f"photo_{n:03d}.png")
            items.append(sharding.ShardItem(uri, Path(uri).name, output))
            record = ItemRecord(input_uri=uri, status="done", shard_id=shard_id, job_id=spec.job_id,
                                config_hash=spec.pipeline.config_hash())
            if n % 11 == 5:
                record.status, record.stage = "failed", "decode"
                record.error_class, record.error = "TruncatedImageError", f"{uri}: image file is truncated"
                Path(uri).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
            elif n % 13 == 7:
                record.status, record.stage = "failed", "read"
                record.error_class, record.error = "NotFoundError", f"no such file: {uri}"
            else:
                photo = _photo(n)
                Path(uri).write_bytes(_png(photo))
                coverage = 0.002 if n % 7 == 3 else (1.0 if n % 9 == 4 else 0.35)
                storage.write_bytes(output, _png(_cutout(photo, coverage)))
                record.output_uris = [output]
                record.quality = {"alpha_coverage": coverage, "unknown_share": 0.04}
                record.flags = ["empty_alpha"] if coverage < 0.01 else (["full_frame_alpha"] if coverage >= 1 else [])
            records.append(record)
            n += 1
        sharding.write_shard(prefix, sharding.Shard(shard_id, items))
        counts, classes, flags = {}, {}, {}
        for record in records:
            counts[record.status] = counts.get(record.status, 0) + 1
            if record.error_class:
                classes[record.error_class] = classes.get(record.error_class, 0) + 1
            for flag in record.flags:
                flags[flag] = flags.get(flag, 0) + 1
        stats = ShardStats(job_id=spec.job_id, shard_id=shard_id, counts=counts, error_classes=classes,
                           started_at=start + 60 * s, finished_at=start + 60 * s + 30 + 20 * (s % 3),
                           flag_counts=flags)
        manifest.write_shard_result(prefix, shard_id, records, stats)
    manifest.save_totals(prefix, n, shards)
    return prefix, spec.job_id


@pytest.fixture
def finished_job(tmp_path):
    return build_job(tmp_path)


def test_report_data_is_bounded_and_complete(finished_job):
    from cutout.jobs import report_html

    prefix, job_id = finished_job
    data = report_html.gather(prefix, job_id, sample_size=4)
    assert set(data.failure_examples) == {"TruncatedImageError", "NotFoundError"}
    assert set(data.flagged) == {"empty_alpha", "full_frame_alpha"}
    assert all(t.input_thumb and t.output_thumb for tiles in data.flagged.values() for t in tiles)
    assert len(data.sample) == 4 and not any(t.record.flags for t in data.sample)
    tight = report_html.gather(prefix, job_id, budget=1)  # one tile, then the budget is spent
    tiles = [t for ts in tight.flagged.values() for t in ts] + tight.sample
    assert sum(1 for t in tiles if t.input_thumb) == 1


def test_page_is_self_contained_and_escapes_text(tmp_path):
    from cutout.jobs import report_html

    prefix, job_id = build_job(tmp_path, shards=2)
    records = manifest.read_shard_records(prefix, "s000001")
    records[1].status, records[1].error_class = "failed", "DecodeError"
    records[1].error, records[1].output_uris, records[1].flags = "<script>alert(1)</script>", [], []
    records[1].input_uri = "https://host/a.jpg?X-Amz-Signature=secret"
    stats = manifest.read_shard_stats(prefix, "s000001")
    stats.error_classes = {**stats.error_classes, "DecodeError": 1}
    manifest.write_shard_result(prefix, "s000001", records, stats)
    page = report_html.render(report_html.gather(prefix, job_id))
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "secret" not in page and "https://host/a.jpg" in page
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page)  # nothing fetched from a network


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("chromium is not installed (apt-get install -y chromium; infra/setup.sh does it)",
                    pytrace=False)
    return found


def _browser(*args: str) -> subprocess.CompletedProcess:
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", "--disable-dev-shm-usage", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const probe = document.createElement('pre'); probe.id = 'probe';
  probe.textContent = JSON.stringify({images: imgs.length, decoded: imgs.filter(i => i.naturalWidth > 0).length,
    width: document.documentElement.scrollWidth});
  document.body.appendChild(probe);
});</script>"""


def test_report_page_in_a_real_browser(finished_job, tmp_path):
    prefix, job_id = finished_job
    page_path = tmp_path / "report.html"
    cli = subprocess.run([sys.executable, "-m", "cutout.jobs.cli", "report", job_id, "--dest",
                          manifest.load_spec(prefix).destination, "--html", str(page_path)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CUTOUT_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert cli.returncode == 3, cli.stderr  # finished, with failed inputs (README, "Exit codes")
    in_dest = storage.join_uri(prefix, "report.html")
    assert f"report page: {in_dest}" in cli.stdout and f"report page: {page_path}" in cli.stdout
    assert storage.read_bytes(in_dest) == page_path.read_bytes()
    assert page_path.stat().st_size < 1_500_000

    # The page's own text and the decoded images, as the browser sees them (a probe script is
    # added to a copy: the page itself runs no script).
    probed = tmp_path / "probed.html"
    probed.write_text(page_path.read_text().replace("</body>", PROBE + "</body>"))
    dom = _browser("--virtual-time-budget=5000", "--dump-dom", probed.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    for text in (job_id, "Totals", "Rate over time", "TruncatedImageError", "NotFoundError",
                 "empty_alpha", "full_frame_alpha", "Sample of done outputs"):
        assert text in dom.stdout, text
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout)
    assert found, dom.stdout[-2000:]
    probe = json.loads(found.group(1))
    assert probe["images"] >= 20 and probe["decoded"] == probe["images"], probe
    assert probe["width"] <= 1300, probe  # nothing overflows the window sideways

    shot = tmp_path / "shot.png"
    result = _browser(f"--screenshot={shot}", "--window-size=1280,2200", page_path.as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert pixels.shape[:2] == (2200, 1280)
    assert pixels.std() > 20  # not blank
    # the chart's bars (#7aa7e0) and the red cumulative line were drawn
    bars = np.all(np.abs(pixels - (0x7A, 0xA7, 0xE0)) <= 6, axis=-1).sum()
    assert bars > 2000, bars
    if os.environ.get("CUTOUT_SAVE_REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["CUTOUT_SAVE_REPORT_SCREENSHOT"])


def test_report_page_never_imports_torch(finished_job):
    """The report runs on the submitter side: Pillow for thumbnails, nothing heavy."""
    prefix, job_id = finished_job
    dest = manifest.load_spec(prefix).destination
    code = (
        "import sys\n"
        "from cutout.jobs.cli import main\n"
        f"rc = main(['report', {job_id!r}, '--dest', {dest!r}, '--html'])\n"
        "heavy = [m for m in ('torch', 'torchvision', 'cv2', 'pymatting', 'cutout.workers.pipeline') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr  # finished, with failed inputs
    assert "HEAVY []" in out.stdout, out.stdout
    assert storage.exists(storage.join_uri(prefix, "report.html"))


def test_flagged_outputs_are_shown_worst_score_first():
    from cutout.jobs import report_html

    data = report_html.ReportData("job", manifest.JobSummary("prefix", None, 0, 0, 0), [])
    scores = [0.4, 0.05, 0.3, 0.9, 0.2, 0.5, 0.1, 0.35]
    records = [ItemRecord(input_uri=f"photo_{i}.png", status="done", flags=["likely_wrong"],
                          quality={"score": score}) for i, score in enumerate(scores)]
    report_html._collect(data, records, 0, 0)
    shown = [tile.record.quality["score"] for tile in data.flagged["likely_wrong"]]
    assert shown == sorted(scores)[:report_html.FLAGGED_PER_FLAG]
