"""The public face: ``import cutout; cutout.remove_background(...)`` and ``cutout.Session``."""
from __future__ import annotations

import http.server
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

import cutout
from cutout.jobs.errors import ConfigError, CutoutError
from tests.test_pipeline import disk_on_plain, png


def test_version_and_lazy_import_keep_the_submitter_light():
    assert cutout.__version__.count(".") == 2
    probe = (
        "import sys, cutout\n"
        "assert cutout.__version__\n"
        "heavy = [m for m in ('torch', 'cv2', 'cutout.workers.pipeline') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_remove_background_takes_paths_bytes_arrays_and_pil_images(tmp_path):
    rgb, inside = disk_on_plain()
    path = tmp_path / "disk.png"
    path.write_bytes(png(rgb))
    for source in (rgb, str(path), path, png(rgb), Image.fromarray(rgb)):
        result = cutout.remove_background(source, model="threshold", background="color:#000000")
        assert result.image.shape == rgb.shape
        assert result.alpha[inside].mean() > 0.9
        assert result.alpha[~inside].mean() < 0.1


def test_the_result_carries_the_quality_score_and_flags():
    from cutout.workers import quality

    rgb, _inside = disk_on_plain()
    result = cutout.remove_background(rgb, model="threshold")
    assert 0.0 <= result.quality["score"] <= 1.0
    assert result.quality["score"] == pytest.approx(quality.score(result.quality), abs=2e-3)
    assert "multiple_objects" not in result.flags and result.quality["second_object"] == 0.0


def test_an_rgba_array_keeps_its_transparent_pixels():
    rgb, inside = disk_on_plain()
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, :20, 3] = 0  # a transparent strip inside the backdrop... and nothing of the disk
    result = cutout.remove_background(rgba, model="threshold")
    assert result.alpha[:, :20].max() == 0
    assert result.alpha[inside].mean() > 0.9


def test_remove_background_reads_s3_uris(bucket):
    from cutout.jobs import storage

    rgb, inside = disk_on_plain()
    name = bucket()
    storage.write_bytes(f"s3://{name}/in/disk.png", png(rgb))
    result = cutout.remove_background(f"s3://{name}/in/disk.png", model="threshold")
    assert result.alpha[inside].mean() > 0.9


def test_remove_background_reads_http_uris(monkeypatch):
    rgb, inside = disk_on_plain()
    body = png(rgb)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("CUTOUT_ALLOW_PRIVATE_HOSTS", "1")  # the server is on loopback
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/disk.png"
        result = cutout.remove_background(url, model="threshold")
    finally:
        server.shutdown()
    assert result.alpha[inside].mean() > 0.9


def test_parameters_are_explicit_and_validated():
    rgb, _ = disk_on_plain()
    with pytest.raises(TypeError):
        cutout.remove_background(rgb, modle="threshold")  # a typo is an error, not ignored
    with pytest.raises(ConfigError):
        cutout.remove_background(rgb, model="threshold", background="nonsense")
    with pytest.raises(ConfigError):
        cutout.remove_background(np.zeros((4, 4), np.float32), model="threshold")


def test_a_session_loads_its_model_once_and_batches(monkeypatch):
    import cutout.workers.segment as segment

    builds = []
    real_build = segment.get_segmenter

    def counting(options, device=None):
        segmenter = real_build(options, device)
        builds.append(id(segmenter))
        return segmenter

    monkeypatch.setattr(segment, "get_segmenter", counting)
    session = cutout.Session(model="threshold", background="mask")
    rgb, inside = disk_on_plain()
    results = session.remove_many([rgb, b"not an image", png(rgb)])
    assert isinstance(results[1], CutoutError)
    for result in (results[0], results[2]):
        assert result.alpha[inside].mean() > 0.9
    session.remove(rgb)
    assert len(set(builds)) == 1  # one segmenter object served every call


def test_the_model_loads_once_per_process_for_every_call_and_session(monkeypatch):
    """One cache owns the models: repeated calls, other output settings and Sessions reuse
    the loaded model; another model frees it."""
    from cutout.workers.models import registry
    from cutout.workers.models.cache import MODEL_CACHE

    builds: list[str] = []
    real_build = registry.build_segmenter

    def counting(options, device):
        builds.append(options.model)
        return real_build(options, device)

    monkeypatch.setattr(registry, "build_segmenter", counting)
    MODEL_CACHE.clear()
    rgb, _ = disk_on_plain()
    for _ in range(3):
        cutout.remove_background(rgb, model="threshold")
    cutout.remove_background(rgb, model="threshold", background="color:#ffffff", matting="none")
    cutout.Session(model="threshold").remove_many([rgb, rgb])
    assert builds == ["threshold"]
    cutout.remove_background(rgb, model="grabcut")
    assert builds == ["threshold", "grabcut"] and MODEL_CACHE.loaded() == ["grabcut"]


def test_presets_and_fusion_are_keywords_too():
    rgb, inside = disk_on_plain()
    from cutout.jobs.presets import PRESETS

    fast = cutout.Session(preset="fast", model="threshold")
    assert fast.options.preset == "fast"
    assert fast.options.trimap_band == PRESETS["fast"]["common"]["trimap_band"] != PRESETS["balanced"]["common"]["trimap_band"]
    assert fast.remove(rgb).alpha[inside].mean() > 0.9
    with pytest.raises(ConfigError):
        cutout.remove_background(rgb, preset="fastest")
    fused = cutout.Session(model="threshold+grabcut", fusion="max", matting="none")
    assert fused.options.fusion == "max" and fused.remove(rgb).alpha[inside].mean() > 0.9


def test_remove_many_puts_an_unreadable_input_s_error_in_its_slot(tmp_path):
    rgb, inside = disk_on_plain()
    path = tmp_path / "disk.png"
    path.write_bytes(png(rgb))
    results = cutout.Session(model="threshold").remove_many(
        [str(path), str(tmp_path / "missing.jpg"), rgb, object()])
    assert results[0].alpha[inside].mean() > 0.9 and results[2].alpha[inside].mean() > 0.9
    assert isinstance(results[1], CutoutError) and "missing.jpg" in str(results[1])
    assert isinstance(results[3], ConfigError)


def test_a_missing_file_is_a_typed_one_line_error():
    from cutout.jobs.errors import NotFoundError

    with pytest.raises(NotFoundError) as caught:
        cutout.remove_background("nope.jpg", model="threshold")
    message = str(caught.value)
    assert isinstance(caught.value, CutoutError) and "nope.jpg" in message and "\n" not in message
