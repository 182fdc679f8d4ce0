"""Throughput on one device: images per second, GPU busy share and peak memory per preset, batch
size and segmentation runtime (torch or onnxruntime), through the path a shard runs
(``Pipeline.run``, the one driver: decode → segment → ... → encode).

    python benchmarks/bench_gpu.py --device cuda:0 [--presets fast,balanced,best]
        [--batch-sizes 1,4,8,16] [--runtimes torch,onnxruntime] [--images 32]
    python benchmarks/bench_gpu.py --device cpu --tiny   # the smoke run of the test suite

Inputs: the photos of ``$CUTOUT_EVAL_DATA/alphamatting_lowres/image``, cycled to ``--images``
(``--tiny``: two 64x64 synthetic images, the ``threshold`` model, batch sizes 1 and 2). The batch
size is both the images per ``Pipeline.run`` call and ``CUTOUT_SEG_BATCH``; each row loads its
models and runs one warm-up batch (CUDA context, cuDNN autotuning) before the timed run.
Columns: wall and CPU seconds (user+sys of this process, all threads) of the timed run, images
per wall second, GPU busy share (NVML through ``torch.cuda.utilization``, else ``nvidia-smi``,
sampled every 0.1 s; ``n/a`` on CPU), peak memory (``torch.cuda.max_memory_allocated``, which
onnxruntime's own CUDA arena is not part of, and the device's used memory as NVML sees it; on
CPU the peak RSS of this process during the run). A runtime the device cannot use (onnxruntime
without its CUDA provider) is a row that says why.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cutout.jobs.errors import CutoutError
from cutout.jobs.settings import settings
from cutout.jobs.spec import PipelineOptions

SAMPLE_EVERY_S = 0.1
MiB = 1024 * 1024


# --- inputs ---------------------------------------------------------------------------------------
def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_inputs() -> list[tuple[str, bytes]]:
    """Two small images with a bright square on a dark ground (the threshold model's subject)."""
    inputs = []
    for index in range(2):
        rgb = np.full((64, 64, 3), 30 + 10 * index, np.uint8)
        rgb[16:48, 16 + 4 * index : 48 + 4 * index] = 220
        inputs.append((f"tiny{index}.png", _png(rgb)))
    return inputs


def photo_inputs(count: int) -> list[tuple[str, bytes]]:
    folder = Path(settings().eval_data) / "alphamatting_lowres" / "image"
    photos = sorted(folder.glob("*.png"))
    if not photos:
        raise SystemExit(f"no photos in {folder} (set CUTOUT_EVAL_DATA)")
    return [(photos[i % len(photos)].name, photos[i % len(photos)].read_bytes()) for i in range(count)]


# --- what the device did --------------------------------------------------------------------------
def _nvidia_smi_id(device: str) -> str:
    """The id nvidia-smi knows the torch device by (CUDA_VISIBLE_DEVICES renumbers them)."""
    index = int(device.partition(":")[2] or 0)
    visible = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return visible[index].strip() if index < len(visible) else str(index)


def gpu_sample(device: str) -> tuple[float, float] | None:
    """(busy %, used MiB) of the GPU now, or None where neither NVML nor nvidia-smi answers."""
    import torch

    try:
        return float(torch.cuda.utilization(device)), torch.cuda.device_memory_used(device) / MiB
    except Exception:  # noqa: BLE001 - no pynvml here: ask nvidia-smi
        pass
    try:
        out = subprocess.run(["nvidia-smi", "-i", _nvidia_smi_id(device), "--format=csv,noheader,nounits",
                              "--query-gpu=utilization.gpu,memory.used"],
                             capture_output=True, text=True, timeout=5).stdout
        busy, used = (float(v) for v in out.strip().splitlines()[0].split(","))
        return busy, used
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def rss_mib() -> float:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


class Sampler:
    """Samples the GPU (busy share, used memory) or this process's RSS while a run goes on."""

    def __init__(self, device: str):
        self.device = device
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> tuple[float, float] | None:
        return gpu_sample(self.device) if self.device.startswith("cuda") else (float("nan"), rss_mib())

    def _run(self) -> None:
        while True:
            sample = self._sample()
            if sample is not None:
                self.samples.append(sample)
            if self._stop.wait(SAMPLE_EVERY_S):
                return

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()

    def busy_share(self) -> str:
        busy = [b for b, _ in self.samples if b == b]  # NaN on CPU
        return f"{statistics.mean(busy):.0f} %" if busy else "n/a"

    def peak_used_mib(self) -> float | None:
        return max((used for _, used in self.samples), default=None)


# --- one row --------------------------------------------------------------------------------------
@dataclass
class Row:
    preset: str
    runtime: str
    batch: int
    images: int = 0
    failed: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    busy: str = "n/a"
    peak: str = "n/a"
    note: str = ""

    def cells(self) -> list[str]:
        if self.note:
            return [self.preset, self.runtime, str(self.batch), self.note]
        rate = self.images / self.wall_s if self.wall_s else float("nan")
        return [self.preset, self.runtime, str(self.batch), str(self.images), str(self.failed),
                f"{self.wall_s:.3f}", f"{self.cpu_s:.3f}", f"{rate:.2f}", self.busy, self.peak]


HEADER = ["preset", "runtime", "batch", "images", "failed", "wall s", "cpu s (user+sys)", "img/s",
          "gpu busy", "peak memory"]


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _batches(inputs: list, size: int) -> list[list]:
    return [inputs[i : i + size] for i in range(0, len(inputs), size)]


def _peak_memory(device: str, sampler: Sampler) -> str:
    used = sampler.peak_used_mib()
    if not device.startswith("cuda"):
        return f"{used:.0f} MiB RSS" if used is not None else "n/a"
    import torch

    allocated = f"{torch.cuda.max_memory_allocated(device) / MiB:.0f} MiB torch"
    return allocated + (f", {used:.0f} MiB used" if used is not None else "")


def _as_inputs(named: list[tuple[str, bytes]]):
    """(name, encoded bytes) pairs as the driver's inputs (it decodes them, as a worker does)."""
    from cutout.workers.pipeline import PipelineInput

    return [PipelineInput(name, data) for name, data in named]


def measure(options: PipelineOptions, preset: str, runtime: str, batch: int, device: str,
            inputs: list[tuple[str, bytes]]) -> Row:
    """One configuration: load and warm up, then time every input through ``Pipeline.run``."""
    from cutout.workers.models.base import choose_runtime
    from cutout.workers.models.cache import MODEL_CACHE
    from cutout.workers.pipeline import Pipeline

    row = Row(preset, runtime, batch)
    os.environ["CUTOUT_RUNTIME"], os.environ["CUTOUT_SEG_BATCH"] = runtime, str(batch)
    MODEL_CACHE.clear()  # the segmenters take their batch size when built
    try:
        row.runtime = f"{runtime} -> {choose_runtime(device, runtime)}" if runtime == "auto" else runtime
        pipeline = Pipeline(options, device=device)
        pipeline.run(_as_inputs(inputs[:batch]))  # warm-up: models, CUDA context, autotuning
    except CutoutError as exc:
        row.note = f"skipped: {type(exc).__name__}: {exc}"
        return row
    cuda = device.startswith("cuda")
    if cuda:
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    cpu_before, started = _cpu_seconds(), time.perf_counter()
    with Sampler(device) as sampler:
        for chunk in _batches(inputs, batch):
            outcomes = pipeline.run(_as_inputs(chunk))
            row.images += len(outcomes)
            row.failed += sum(not outcome.ok for outcome in outcomes)
        if cuda:
            torch.cuda.synchronize(device)
    row.wall_s, row.cpu_s = time.perf_counter() - started, _cpu_seconds() - cpu_before
    row.busy, row.peak = sampler.busy_share(), _peak_memory(device, sampler)
    return row


def print_table(rows: list[Row]) -> None:
    table = [HEADER] + [row.cells() for row in rows]
    widths = [max(len(cells[i]) for cells in table if i < len(cells)) for i in range(len(HEADER))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(HEADER, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for cells in table[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |")


def _device_line(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        return f"device {device}: {props.name}, {props.total_memory / MiB / 1024:.0f} GiB, torch {torch.__version__}"
    return f"device cpu: {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", required=True, help="cuda, cuda:N or cpu")
    parser.add_argument("--presets", default="fast,balanced,best")
    parser.add_argument("--batch-sizes", default=None, help="default 1,4,8,16 (--tiny: 1,2)")
    parser.add_argument("--runtimes", default="torch,onnxruntime", help="torch, onnxruntime, auto")
    parser.add_argument("--images", type=int, default=32, help="photos per row (cycled)")
    parser.add_argument("--tiny", action="store_true",
                        help="two 64x64 images, the threshold model: a CPU smoke run")
    args = parser.parse_args(argv)
    from cutout.workers.models.base import check_device

    try:
        check_device(args.device)
    except CutoutError as exc:
        print(f"bench_gpu: error: {exc}", file=sys.stderr)
        return 2
    inputs = tiny_inputs() if args.tiny else photo_inputs(args.images)
    sizes = [int(s) for s in (args.batch_sizes or ("1,2" if args.tiny else "1,4,8,16")).split(",")]
    print(_device_line(args.device))
    print(f"{len(inputs)} images per row{' (tiny: threshold model)' if args.tiny else ''}")
    rows = []
    for preset in args.presets.split(","):
        overrides = {"model": "threshold"} if args.tiny else {}
        options = PipelineOptions(preset=preset, **overrides)
        for runtime in args.runtimes.split(","):
            for batch in sizes:
                rows.append(measure(options, preset, runtime, batch, args.device, inputs))
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
