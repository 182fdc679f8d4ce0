"""``cutout eval``: quality and speed on real photographs with ground truth.

Three measurements, printed as tables and written to ``OUT/eval.json``:
1. end to end on alphamatting.com (no trimap given): whole-image SAD / MSE for the raw model
   mask and for the full pipeline, plus seconds per image per stage;
2. matting alone with the benchmark's trimap1 / trimap2: ours vs plain pymatting closed-form,
   SAD / MSE / gradient / connectivity over the unknown region;
3. segmentation IoU on the GrabCut dataset, leaving out the 128 boundary band.
A contact sheet (input | alpha | composite) is written to ``OUT/contact_sheet.png``.

``--data DIR`` pointing at a user's own folder (``image/`` plus ``alpha/`` soft mattes or
``mask/`` binary masks, matched by file stem) scores that folder instead (``run_user_eval``).
Every image's CPU-seconds (user+sys of this process, all threads) are printed beside its wall
time: on a shared or throttled machine wall time says little about what a run costs.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cutout.jobs.spec import PipelineOptions
from cutout.workers import metrics

STAGES = ("decode", "segment", "calibrate", "refine", "trimap", "matte", "objects", "foreground", "composite",
          "encode")


@dataclass
class MattingSample:
    name: str
    data: bytes  # the photo's file bytes, decoded by the pipeline like any input
    gt_alpha: np.ndarray
    trimaps: dict[str, np.ndarray]


@dataclass
class SegmentationSample:
    name: str
    data: bytes
    gt_mask: np.ndarray
    ignore: np.ndarray


@dataclass
class EndToEndRow:
    name: str
    sad_mask: float
    mse_mask: float
    sad_full: float
    mse_full: float
    timings: dict[str, float] = field(default_factory=dict)
    sad_calibrated: float = 0.0
    mse_calibrated: float = 0.0
    notes: list[str] = field(default_factory=list)
    sad_refined: float = 0.0  # the mask after calibration and refinement, before matting
    mse_refined: float = 0.0
    sad_single: float = 0.0  # one pass at the model's own input size, no ensemble
    mse_single: float = 0.0
    cpu: float = 0.0  # CPU-seconds (user+sys) for this image's pipeline, decode to encode


def _read_gray(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def load_alphamatting(root: Path, limit: int | None = None) -> list[MattingSample]:
    base = root / "alphamatting_lowres"
    names = sorted(p.name for p in (base / "image").glob("*.png"))[:limit]
    if not names:
        raise FileNotFoundError(f"no alphamatting images under {base} (set CUTOUT_EVAL_DATA)")
    return [
        MattingSample(
            name=name,
            data=(base / "image" / name).read_bytes(),
            gt_alpha=_read_gray(base / "alpha" / name).astype(np.float32) / 255.0,
            trimaps={t: _read_gray(base / t / name) for t in ("trimap1", "trimap2")},
        )
        for name in names
    ]


def load_grabcut(root: Path, limit: int | None = None) -> list[SegmentationSample]:
    base = root / "grabcut_msrc"
    samples = []
    for image_path in sorted((base / "image").iterdir())[:limit]:
        mask = _read_gray(base / "mask" / (image_path.stem + ".png"))
        samples.append(
            SegmentationSample(image_path.stem, image_path.read_bytes(), mask > 192,
                               (mask > 64) & (mask < 192))
        )
    return samples


def cpu_seconds() -> float:
    """User+sys CPU-seconds of this process so far (every thread, onnxruntime's included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def end_to_end(options: PipelineOptions, samples: list[MattingSample]) -> list[EndToEndRow]:
    """Run each photo through the real pipeline one by one, timing every stage."""
    from cutout.workers.decode import decode_image
    from cutout.workers.pipeline import Pipeline

    pipeline = Pipeline(options)
    pipeline.load_models()  # outside the timings
    rows = []
    for sample in samples:
        cpu_start = cpu_seconds()
        result = run_one(pipeline, sample.name, sample.data, encode=True)
        cpu = cpu_seconds() - cpu_start
        timings, raw = result.timings, result.raw_mask
        mask = pipeline.calibrate(raw)  # the calibrated mask before refinement, for its score
        single = raw if len(pipeline.seg_sizes) == 1 else \
            pipeline.segment_at([decode_image(sample.data).rgb], None)[0]
        gt = sample.gt_alpha
        rows.append(EndToEndRow(
            sample.name, metrics.sad(raw, gt), metrics.mse(raw, gt),
            metrics.sad(result.alpha, gt), metrics.mse(result.alpha, gt), timings,
            metrics.sad(mask, gt), metrics.mse(mask, gt), result.notes,
            metrics.sad(result.mask, gt), metrics.mse(result.mask, gt),
            metrics.sad(single, gt), metrics.mse(single, gt), cpu,
        ))
        print(f"  {sample.name}: SAD single {rows[-1].sad_single:6.1f}  raw {rows[-1].sad_mask:6.1f}  calibrated "
              f"{rows[-1].sad_calibrated:6.1f}  refined {rows[-1].sad_refined:6.1f}  pipeline {rows[-1].sad_full:6.1f}  "
              f"{sum(timings.values()):.2f} s  {cpu:.2f} CPU-s  {'; '.join(result.notes)}", flush=True)
    return rows


def run_one(pipeline, name: str, image: bytes | np.ndarray, *, encode: bool, box=None):
    """One photo through the pipeline's driver (``Pipeline.run``); its failure is raised.
    ``box`` ((x, y, w, h) px) takes the box path (``cutout.workers.boxes``)."""
    from cutout.workers.pipeline import PipelineInput

    item = PipelineInput(name, data=image) if isinstance(image, bytes) else PipelineInput(name, rgb=image)
    item.box = box
    (outcome,) = pipeline.run([item], encode=encode, keep_result=True)
    if not outcome.ok:
        raise outcome.error
    return outcome.result


def matting_only(samples: list[MattingSample], method: str, max_side: int) -> dict:
    """Ours precise on the crop (what a user trimap gets), ours with the automatic pipeline's
    speed bounds, and plain pymatting over the full image, per benchmark trimap."""
    from cutout.workers.decode import decode_image
    from cutout.workers.matte import estimate_alpha

    results: dict = {}
    for trimap_name in ("trimap1", "trimap2"):
        per_variant: dict[str, list[dict]] = {"cutout-precise": [], "cutout-fast": [],
                                              "pymatting": []}
        for sample in samples:
            rgb = decode_image(sample.data).rgb
            trimap = sample.trimaps[trimap_name]
            unknown = (trimap > 0) & (trimap < 255)
            start = time.perf_counter()
            full = estimate_alpha(rgb, trimap, method=method, max_side=None, budget=None,
                                  precise=True).alpha
            full_s = time.perf_counter() - start
            start = time.perf_counter()
            fast = estimate_alpha(rgb, trimap, method=method, max_side=max_side).alpha
            fast_s = time.perf_counter() - start
            start = time.perf_counter()
            baseline = _pymatting_alpha(rgb, trimap, method)
            base_s = time.perf_counter() - start
            for variant, alpha, seconds in (("cutout-precise", full, full_s),
                                            ("cutout-fast", fast, fast_s),
                                            ("pymatting", baseline, base_s)):
                per_variant[variant].append(_matting_scores(alpha, sample.gt_alpha, unknown,
                                                            seconds))
        results[trimap_name] = {v: _mean_scores(rows) for v, rows in per_variant.items()}
    return results


def _pymatting_alpha(rgb: np.ndarray, trimap: np.ndarray, method: str) -> np.ndarray:
    from pymatting import estimate_alpha_cf, estimate_alpha_knn

    solver = estimate_alpha_cf if method == "closed-form" else estimate_alpha_knn
    with contextlib.redirect_stdout(io.StringIO()):  # pymatting prints preconditioner retries
        alpha = solver(rgb.astype(np.float64) / 255.0, trimap.astype(np.float64) / 255.0)
    return np.clip(alpha, 0, 1)


def _matting_scores(alpha, gt, region, seconds) -> dict:
    return {
        "sad": metrics.sad(alpha, gt, region),
        "mse": metrics.mse(alpha, gt, region),
        "grad": metrics.gradient_error(alpha, gt, region),
        "conn": metrics.connectivity_error(alpha, gt, region),
        "seconds": seconds,
    }


def _mean_scores(rows: list[dict]) -> dict:
    return {key: statistics.fmean(row[key] for row in rows) for key in rows[0]}


def segmentation_iou(options: PipelineOptions, samples: list[SegmentationSample]) -> dict:
    from cutout.workers.decode import decode_image
    from cutout.workers.pipeline import Pipeline

    pipeline = Pipeline(options)
    scores: dict[str, dict[str, float]] = {"raw": {}, "calibrated": {}, "refined": {}}
    for sample in samples:
        rgb = decode_image(sample.data).rgb
        raw = pipeline.segment_raw([rgb])[0]
        calibrated = pipeline.calibrate(raw)
        refined = calibrated
        if pipeline.refine_method == "grabcut":
            from cutout.workers.refine import refine_with_grabcut

            refined, _ = refine_with_grabcut(rgb, calibrated)
        for variant, mask in (("raw", raw), ("calibrated", calibrated), ("refined", refined)):
            scores[variant][sample.name] = metrics.iou(mask >= 0.5, sample.gt_mask, sample.ignore)
    return {
        variant: {"mean_iou": statistics.fmean(values.values()),
                  "median_iou": statistics.median(values.values()), "per_image": values}
        for variant, values in scores.items()
    }


def contact_sheet(options: PipelineOptions, samples: list[MattingSample], path: Path,
                  height: int = 160) -> None:
    """input | alpha | composite on a checkerboard, one row per photo."""
    import cv2
    from PIL import Image

    from cutout.workers.decode import decode_image
    from cutout.workers.pipeline import Pipeline

    pipeline = Pipeline(options.model_copy(update={"background": "transparent"}))
    rows = []
    for sample in samples:
        rgb = decode_image(sample.data).rgb
        result = run_one(pipeline, sample.name, rgb, encode=False)
        scale = height / rgb.shape[0]
        size = (max(1, round(rgb.shape[1] * scale)), height)
        thumb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        alpha = cv2.resize(result.alpha, size, interpolation=cv2.INTER_AREA)
        rgba = cv2.resize(result.image, size, interpolation=cv2.INTER_AREA).astype(np.float32)
        checker = _checkerboard(size[1], size[0])
        a = rgba[..., 3:4] / 255.0
        comp = (rgba[..., :3] * a + checker * (1 - a) + 0.5).astype(np.uint8)
        alpha_rgb = np.repeat((alpha[..., None] * 255 + 0.5).astype(np.uint8), 3, axis=2)
        rows.append(np.concatenate([thumb, alpha_rgb, comp], axis=1))
    width = max(row.shape[1] for row in rows)
    padded = [np.pad(row, ((0, 4), (0, width - row.shape[1]), (0, 0)), constant_values=255)
              for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(padded, axis=0)).save(path)


def _checkerboard(height: int, width: int, cell: int = 12) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    board = ((yy // cell + xx // cell) % 2).astype(np.float32)
    return np.repeat((200 + 55 * board)[..., None], 3, axis=2)


def _summarise_rows(rows: list[EndToEndRow]) -> dict:
    sad_mask = [r.sad_mask for r in rows]
    sad_full = [r.sad_full for r in rows]
    sad_calibrated = [r.sad_calibrated for r in rows]
    sad_single = [r.sad_single for r in rows]
    sad_refined = [r.sad_refined for r in rows]
    totals = [sum(r.timings.values()) for r in rows]
    stage_medians = {
        stage: statistics.median(r.timings.get(stage, 0.0) for r in rows) for stage in STAGES
    }
    return {
        "images": len(rows),
        "mask": {"sad_mean": statistics.fmean(sad_mask), "sad_median": statistics.median(sad_mask),
                 "mse_mean": statistics.fmean(r.mse_mask for r in rows)},
        "single": {"sad_mean": statistics.fmean(sad_single),
                   "sad_median": statistics.median(sad_single),
                   "mse_mean": statistics.fmean(r.mse_single for r in rows)},
        "calibrated": {"sad_mean": statistics.fmean(sad_calibrated),
                       "sad_median": statistics.median(sad_calibrated),
                       "mse_mean": statistics.fmean(r.mse_calibrated for r in rows)},
        "refined": {"sad_mean": statistics.fmean(sad_refined),
                    "sad_median": statistics.median(sad_refined),
                    "mse_mean": statistics.fmean(r.mse_refined for r in rows)},
        "full": {"sad_mean": statistics.fmean(sad_full), "sad_median": statistics.median(sad_full),
                 "mse_mean": statistics.fmean(r.mse_full for r in rows)},
        "seconds_per_image_median": statistics.median(totals),
        "seconds_per_image_mean": statistics.fmean(totals),
        "cpu_seconds_per_image_median": statistics.median(r.cpu for r in rows),
        "cpu_seconds_per_image_mean": statistics.fmean(r.cpu for r in rows),
        "stage_seconds_median": stage_medians,
        "matting_share_of_segment": (
            (stage_medians["trimap"] + stage_medians["matte"] + stage_medians["foreground"])
            / stage_medians["segment"] if stage_medians["segment"] else None
        ),
        "per_image": [r.__dict__ for r in rows],
    }


def run_eval(options: PipelineOptions, data_dir: Path, out_dir: Path, *, limit: int | None = None,
             skip_matting_only: bool = False, skip_segmentation: bool = False) -> dict:
    """Run every measurement for one setting and print the figures."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    report: dict = {"options": options.model_dump(mode="json"), "data_dir": str(data_dir),
                    "cpu_count": os.cpu_count()}
    samples = load_alphamatting(data_dir, limit)
    print(f"== end to end, {len(samples)} alphamatting.com photos, model {options.model}, "
          f"matting {options.matting}")
    rows = end_to_end(options, samples)
    report["end_to_end"] = _summarise_rows(rows)
    _print_end_to_end(report["end_to_end"])
    if not skip_matting_only and options.matting != "none":
        print(f"== matting alone ({options.matting}) with the benchmark trimaps")
        report["matting_only"] = matting_only(samples, options.matting, options.matting_max_side)
        _print_matting(report["matting_only"])
    if not skip_segmentation:
        grabcut = load_grabcut(data_dir, limit)
        print(f"== segmentation IoU on {len(grabcut)} GrabCut photos (128 band left out)")
        report["segmentation"] = segmentation_iou(options, grabcut)
        for variant, scores in report["segmentation"].items():
            print(f"  {variant:11} mask: mean IoU {scores['mean_iou']:.4f}  "
                  f"median {scores['median_iou']:.4f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    sheet = out_dir / "contact_sheet.png"
    contact_sheet(options, samples, sheet)
    report["contact_sheet"] = str(sheet)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2, default=float))
    print(f"wrote {out_dir / 'eval.json'} and {sheet}")
    return report


# --- a user's own folder ---------------------------------------------------------------------
@dataclass
class UserSample:
    name: str
    data: bytes
    gt: np.ndarray  # float32 0..1: a soft alpha, or a binary mask as 0/1
    ignore: np.ndarray | None  # mask/ only: the 128 band left out of every score


def is_user_folder(root: Path) -> bool:
    """A folder of the user's own photos: ``image/`` and ``alpha/`` or ``mask/`` beside it."""
    return (root / "image").is_dir() and ((root / "alpha").is_dir() or (root / "mask").is_dir())


def load_user_folder(root: Path, limit: int | None = None) -> list[UserSample]:
    """Photos matched to their ground truth by file stem; a photo without one is left out, loudly."""
    kind = "alpha" if (root / "alpha").is_dir() else "mask"
    truths = {p.stem: p for p in (root / kind).iterdir() if p.is_file()}
    samples = []
    for path in sorted(p for p in (root / "image").iterdir() if p.is_file())[:limit]:
        if path.stem not in truths:
            print(f"  {path.name}: no {kind}/{path.stem}.* ground truth, left out")
            continue
        gray = _read_gray(truths[path.stem])
        if kind == "alpha":
            samples.append(UserSample(path.name, path.read_bytes(), gray.astype(np.float32) / 255, None))
        else:  # GrabCut's convention: 0 background, 255 foreground, 128 a band to leave out
            samples.append(UserSample(path.name, path.read_bytes(), (gray > 192).astype(np.float32),
                                      (gray > 64) & (gray < 192)))
    if not samples:
        raise FileNotFoundError(f"no photo under {root / 'image'} has a {kind}/ ground truth")
    return samples


def score_user_sample(pipeline, sample: UserSample, box=None) -> dict:
    """Run one photo through the whole pipeline (decode to encode) and score its alpha; with
    ``box`` ((x, y, w, h) px), the object in that box."""
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    result = run_one(pipeline, sample.name, sample.data, encode=True, box=box)
    wall, cpu = time.perf_counter() - wall_start, cpu_seconds() - cpu_start
    if result.alpha.shape != sample.gt.shape:
        raise ValueError(f"{sample.name}: ground truth is {sample.gt.shape[::-1]} px, "
                         f"the photo {result.alpha.shape[::-1]}")
    keep = None if sample.ignore is None else ~sample.ignore
    return {"name": sample.name, "sad": metrics.sad(result.alpha, sample.gt, keep),
            "mse": metrics.mse(result.alpha, sample.gt, keep),
            "iou": metrics.iou(result.alpha >= 0.5, sample.gt >= 0.5, sample.ignore),
            "seconds": wall, "cpu_seconds": cpu, "notes": result.notes,
            "score": result.quality.get("score", 1.0), "flags": result.flags}


def run_user_eval(options: PipelineOptions, root: Path, out_dir: Path, *,
                  limit: int | None = None, boxes: dict | None = None) -> dict:
    """Score the pipeline on a user's folder; print per-image and summary figures. ``boxes``
    (stem → (x, y, w, h)) scores the box path; a photo without a box is left out."""
    from cutout.workers.pipeline import Pipeline

    samples = load_user_folder(root, limit)
    if boxes is not None:
        samples = [s for s in samples if Path(s.name).stem in boxes]
        if not samples:
            raise FileNotFoundError(f"no photo under {root / 'image'} has a box")
    pipeline = Pipeline(options)
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    pipeline.load_models()
    load = {"seconds": time.perf_counter() - wall_start, "cpu_seconds": cpu_seconds() - cpu_start}
    print(f"== {len(samples)} photos from {root}, preset {options.preset}, model {options.model} "
          f"(loaded in {load['seconds']:.1f} s, {load['cpu_seconds']:.1f} CPU-s)")
    rows = []
    for sample in samples:
        rows.append(score_user_sample(pipeline, sample,
                                      None if boxes is None else boxes[Path(sample.name).stem]))
        row = rows[-1]
        print(f"  {row['name']}: SAD {row['sad']:7.2f}  MSE {row['mse']:.4f}  IoU {row['iou']:.4f}  "
              f"{row['seconds']:.2f} s  {row['cpu_seconds']:.2f} CPU-s  {'; '.join(row['notes'])}",
              flush=True)
    summary = {key: {"mean": statistics.fmean(r[key] for r in rows),
                     "median": statistics.median(r[key] for r in rows)}
               for key in ("sad", "mse", "iou", "seconds", "cpu_seconds")}
    report = {"options": options.model_dump(mode="json"), "data_dir": str(root),
              "images": len(rows), "boxes": boxes is not None, "model_load": load, "summary": summary,
              "flags": flag_report(rows), "per_image": rows}
    _print_flag_report(report["flags"])
    print(f"  mean: SAD {summary['sad']['mean']:.2f} (median {summary['sad']['median']:.2f})  "
          f"MSE {summary['mse']['mean']:.4f}  IoU {summary['iou']['mean']:.4f}  per image "
          f"{summary['seconds']['mean']:.2f} s, {summary['cpu_seconds']['mean']:.2f} CPU-s")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2, default=float))
    print(f"wrote {out_dir / 'eval.json'}")
    return report


BAD_IOU = 0.90  # an output is "bad" below this IoU of alpha ≥ 0.5 against the truth


def flag_report(rows: list[dict]) -> dict:
    """How well the quality score and each flag find this folder's bad outputs, so a user can
    check them on their own kind of photos before trusting them at scale."""
    from cutout.jobs.records import QUALITY_FLAGS

    bad = np.array([row["iou"] < BAD_IOU for row in rows])
    scores = np.array([row["score"] for row in rows])
    report = {"images": len(rows), "bad": int(bad.sum()), "score_auc": metrics.roc_auc(1.0 - scores, bad),
              "flags": {}}
    for flag in (*QUALITY_FLAGS, "any flag"):
        flagged = np.array([bool(row["flags"]) if flag == "any flag" else flag in row["flags"] for row in rows])
        if flagged.any() or flag in ("likely_wrong", "multiple_objects", "any flag"):
            report["flags"][flag] = {"flagged": int(flagged.sum()), "caught": int((flagged & bad).sum())}
    return report


def _print_flag_report(report: dict) -> None:
    images, bad = report["images"], report["bad"]
    print(f"== quality score and flags: {bad} of {images} outputs bad (IoU < {BAD_IOU:.2f})")
    print(f"  score ROC AUC {report['score_auc']:.3f} (1: every bad output scores below every good "
          "one; 0.5: chance; nan: no bad or no good output)")
    for flag, counts in report["flags"].items():
        print(f"  {flag:18} caught {counts['caught']:3d}/{bad} bad ({counts['caught'] / max(1, bad):4.0%}), "
              f"flagged {counts['flagged']:3d}/{images} ({counts['flagged'] / max(1, images):4.0%})")


def _print_end_to_end(summary: dict) -> None:
    print(f"  {'':16} {'SAD mean':>9} {'SAD median':>11} {'MSE mean':>9}")
    names = {"single": "raw mask 1 pass", "mask": "raw mask (ens.)",
             "calibrated": "calibrated mask", "refined": "refined mask", "full": "pipeline"}
    for label, name in names.items():
        s = summary[label]
        print(f"  {name:16} {s['sad_mean']:9.2f} {s['sad_median']:11.2f} {s['mse_mean']:9.5f}")
    stages = "  ".join(f"{k} {v:.3f}" for k, v in summary["stage_seconds_median"].items())
    print(f"  seconds/image median {summary['seconds_per_image_median']:.2f} "
          f"(mean {summary['seconds_per_image_mean']:.2f}); CPU-seconds/image median "
          f"{summary['cpu_seconds_per_image_median']:.2f} (mean "
          f"{summary['cpu_seconds_per_image_mean']:.2f}); per stage median: {stages}")
    share = summary["matting_share_of_segment"]
    if share is not None:
        print(f"  trimap+matte+foreground = {100 * share:.1f} % of segmentation time")


def _print_matting(results: dict) -> None:
    print(f"  {'trimap':8} {'variant':14} {'SAD':>8} {'MSE':>9} {'Grad':>8} {'Conn':>8} {'s/img':>7}")
    for trimap_name, variants in results.items():
        for variant, s in variants.items():
            print(f"  {trimap_name:8} {variant:14} {s['sad']:8.2f} {s['mse']:9.5f} "
                  f"{s['grad']:8.2f} {s['conn']:8.2f} {s['seconds']:7.2f}")
