"""What a run costs and what it gives: each preset and model of ``cutout run`` against
``rembg p -a`` on the same IS-Net network, whole process, model load included.

Why whole processes: a user pays for the model load, the imports and every stage, and on a
shared machine wall time mostly measures the neighbours, so CPU-seconds (user+sys of the child,
from os.wait4) are the figure to compare; wall time is printed beside them. Runs are interleaved
(every setting once, then again) so that a busy spell hurts all settings alike.

Quality is scored on the outputs written: whole-image SAD / MSE against the 27 alphamatting.com
mattes, IoU (alpha >= 0.5, the 128 band left out) against the 50 GrabCut masks.

rembg lives in its own venv (never the project's): ``python3 -m venv .cache/rembg-venv &&
.cache/rembg-venv/bin/pip install "rembg[cpu,cli]==2.0.86"`` (rembg 2.0.86 needs the cpu extra for onnxruntime). It cannot download weights here, so
it gets our IS-Net file through its custom-model session (``-m dis_custom -x '{"model_path": F}'``,
with ``U2NET_HOME`` set to our models folder: rembg only loads custom files from its own).
Its IS-Net preprocessing matches ours (RGB, ``x/255 - 0.5``, std 1.0, 1024²) except that it
divides by the image's maximum and resizes with Lanczos.

    .venv/bin/python benchmarks/bench_cost.py                     # every preset, rembg -a
    .venv/bin/python benchmarks/bench_cost.py --settings fast rembg-a --repeats 2 --sets am
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from cutout.jobs.settings import settings

REPO = Path(__file__).resolve().parents[1]
DATA = Path(settings().eval_data)
MODELS_DIR = Path(settings().models_dir or Path.home() / ".cache" / "cutout" / "models")
REMBG = Path(os.environ.get("REMBG", REPO / ".cache" / "rembg-venv" / "bin" / "rembg"))
CUTOUT = [str(REPO / ".venv" / "bin" / "cutout"), "run", "--no-progress"]

SETTINGS = {
    "fast": CUTOUT + ["--preset", "fast"],
    "balanced": CUTOUT + ["--preset", "balanced"],
    "best": CUTOUT + ["--preset", "best"],
    "auto": CUTOUT + ["--preset", "auto"],
    # the cascade also rerun where fast's networks disagree (quality_cv.py --stage-cpu)
    "auto-apart": CUTOUT + ["--preset", "auto", "--escalate-below", "0.5", "--escalate-apart", "0.15"],
    "balanced-no-escalation": CUTOUT + ["--preset", "balanced", "--escalate-below", "0"],
    # one raw IS-Net pass at 1024 (fast's raw settings at rembg's size): rembg without -a
    "isnet-1024": CUTOUT + ["--preset", "fast", "--seg-size", "1024"],
    "modnet": CUTOUT + ["--model", "modnet", "--refine", "none"],
    "u2netp": CUTOUT + ["--model", "u2netp", "--refine", "none"],
    "rembg": [str(REMBG), "p", "-m", "dis_custom"],
    "rembg-a": [str(REMBG), "p", "-a", "-m", "dis_custom"],
}


def command(setting: str, source: Path, out: Path) -> list[str]:
    base = SETTINGS[setting]
    if setting.startswith("rembg"):
        weights = MODELS_DIR / "isnet-general-use-fp16.onnx"
        return base + ["-x", json.dumps({"model_path": str(weights)}), str(source), str(out)]
    return base + [str(source), "--out", str(out)]


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(CPU-seconds user+sys, wall seconds) of one child process, from os.wait4."""
    env = {"NUMBA_CACHE_DIR": str(REPO / ".cache" / "numba"), **os.environ, "U2NET_HOME": str(MODELS_DIR)}
    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _pid, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    errors = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.returncode not in (0,):
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {process.returncode}: {errors[-2000:]}")
    return usage.ru_utime + usage.ru_stime, wall


def output_alpha(out: Path, stem: str) -> np.ndarray:
    with Image.open(out / f"{stem}.png") as image:
        return np.asarray(image.convert("RGBA"))[..., 3].astype(np.float32) / 255


def score_alphamatting(out: Path) -> dict:
    base = DATA / "alphamatting_lowres"
    sad, mse = [], []
    for path in sorted((base / "image").glob("*.png")):
        gt = np.asarray(Image.open(base / "alpha" / path.name).convert("L"), np.float32) / 255
        alpha = output_alpha(out, path.stem)
        sad.append(float(np.abs(alpha - gt).sum() / 1000))
        mse.append(float(((alpha - gt) ** 2).mean()))
    return {"sad": statistics.fmean(sad), "sad_median": statistics.median(sad), "mse": statistics.fmean(mse)}


def score_grabcut(out: Path) -> dict:
    base = DATA / "grabcut_msrc"
    ious = []
    for path in sorted((base / "image").iterdir()):
        raw = np.asarray(Image.open(base / "mask" / (path.stem + ".png")).convert("L"))
        keep = ~((raw > 64) & (raw < 192))
        predicted, truth = output_alpha(out, path.stem) >= 0.5, raw > 192
        union = ((predicted | truth) & keep).sum()
        ious.append(float(((predicted & truth) & keep).sum() / union) if union else 1.0)
    return {"iou": statistics.fmean(ious), "iou_median": statistics.median(ious)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=["fast", "balanced", "best", "rembg-a"],
                        choices=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=1, help="interleaved timing rounds")
    parser.add_argument("--sets", nargs="+", default=["am", "gc"], choices=["am", "gc"],
                        help="am: the 27 alphamatting photos (SAD, MSE, cost); gc: the 50 GrabCut photos (IoU)")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    folders = {"am": DATA / "alphamatting_lowres" / "image", "gc": DATA / "grabcut_msrc" / "image"}
    sets = {name: folders[name] for name in args.sets}
    counts = {name: len(list(folder.iterdir())) for name, folder in sets.items()}
    costs: dict = {s: {name: [] for name in sets} for s in args.settings}
    quality: dict = {s: {} for s in args.settings}
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as tmp:
        warm = Path(tmp) / "warm"
        warm.mkdir()
        (warm / "one.png").write_bytes(next(iter(sorted(folders["am"].iterdir()))).read_bytes())
        for setting in args.settings:  # untimed: numba's kernel cache, the OS file cache
            run_measured(command(setting, warm, Path(tmp) / "warm-out" / setting))
        for round_ in range(args.repeats):
            for setting in args.settings:  # interleaved: every setting once per round
                for name, folder in sets.items():
                    out = Path(tmp) / setting / name
                    cpu, wall = run_measured(command(setting, folder, out))
                    costs[setting][name].append((cpu, wall))
                    print(f"round {round_ + 1} {setting:10} {name}: {cpu:7.1f} CPU-s {wall:7.1f} s "
                          f"for {counts[name]} photos", flush=True)
                    if round_ == 0:
                        quality[setting].update(score_alphamatting(out) if name == "am" else score_grabcut(out))
    table = summarise(costs, quality, counts)
    print_table(table)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))


def summarise(costs: dict, quality: dict, counts: dict) -> dict:
    table = {}
    for setting, per_set in costs.items():
        name = "am" if "am" in per_set else "gc"  # cost is quoted on the 27 photos when run
        cpu = statistics.median(c for c, _w in per_set[name]) / counts[name]
        wall = statistics.median(w for _c, w in per_set[name]) / counts[name]
        table[setting] = {**quality[setting], "cpu_per_image": cpu, "wall_per_image": wall,
                          "cost_measured_on": name}
    if "rembg-a" in table:
        for row in table.values():
            row["cpu_ratio_to_rembg_a"] = row["cpu_per_image"] / table["rembg-a"]["cpu_per_image"]
    return table


def print_table(table: dict) -> None:
    print(f"\n{'setting':11} {'SAD mean':>8} {'median':>7} {'MSE':>7} {'IoU':>6} "
          f"{'CPU-s/img':>9} {'wall s/img':>10} {'CPU vs rembg -a':>15}")
    for setting, row in table.items():
        ratio = row.get("cpu_ratio_to_rembg_a")
        nan = float("nan")
        print(f"{setting:11} {row.get('sad', nan):8.2f} {row.get('sad_median', nan):7.2f} {row.get('mse', nan):7.4f} "
              f"{row.get('iou', float('nan')):6.4f} {row['cpu_per_image']:9.2f} "
              f"{row['wall_per_image']:10.2f} {'' if ratio is None else f'{ratio:.2f}':>15}")
    print("CPU-s and wall: whole process per photo (model load included), on the 27 alphamatting "
          "photos when they ran, else on the 50 GrabCut photos")


if __name__ == "__main__":
    main()
