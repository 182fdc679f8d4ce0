"""Cross-validated quality score, do-no-harm gating and cascade, from cached raw masks.

Why: at scale nobody looks at the outputs, so the score has to find the bad ones by itself; it
is fitted here on one half of the visible photos and judged on the other, both ways round.

    .venv/bin/python benchmarks/cache_masks.py --cache /work/main/.cache/masks \\
        isnet-general:896 u2netp:320 isnet-general:768 isnet-general:512       # raw masks, once
    .venv/bin/python benchmarks/quality_cv.py --cache /work/main/.cache/masks   # prints everything

Steps:
1. Every photo (27 alphamatting + 50 GrabCut) through the real post-processing
   (``Pipeline.finish``: calibrate, GrabCut, trimap, matting, quality measurements) for each
   variant below, from the cached raw masks; per-photo rows are kept in
   ``CACHE/quality_rows.json`` (``--refresh`` recomputes them after a change to the measurements).
2. A photo's output is *bad* when the IoU of alpha ≥ 0.5 against the truth is below 0.90
   (GrabCut: the 128 band left out; alphamatting: truth > 0.5).
3. Score: logistic regression (L2, Newton steps, numpy) on standardised measurements, fitted on
   one half (each set's photos by name, alternating: A = even positions) and reported on the
   other: ROC AUC, and the ``likely_wrong`` threshold chosen on the fitted half (the score
   below which ``FLAG_SHARE`` of that half's outputs fall) with the share of bad outputs it
   catches and of all outputs it flags on the held-out half. Then the model fitted on all
   photos, printed as the ``SCORE_MODEL`` block of ``cutout/workers/quality.py``.
4. Do no harm: per photo, ``balanced``, and ``best`` again where its score is below S (the
   output with the higher score kept, as ``Pipeline._escalate`` does); S chosen on one half (the
   lowest criterion of ``tune_cv.py`` within balanced's CPU budget, ties to the lower S) and
   reported on the other; a refinement gate (the unrefined output where the refined one scores
   low) scored the same way.
5. Cascade: ``fast`` on every photo, ``balanced`` or ``best`` rerun where the score is below T,
   the output with the higher score kept; T chosen the same way against ``best``, and the
   frontier (quality against estimated CPU per photo) for every T.
6. ``--disagreement``: the cascade also rerun where ``fast``'s two networks disagree by more than
   D (1 - IoU of their raw masks, free in ``fast``), with three rules for which output is kept;
   T, D and the rule chosen together the same way, each fold's pick judged on both halves.
7. ``--stage-cpu FILE`` (from ``stage_cpu.py``): step 6 again with each photo's measured
   CPU-s (``fast``'s networks and the rest apart, ``balanced``'s) in place of the estimate, and a
   fourth rule, ``early``: a photo whose networks disagree goes straight to ``balanced`` (its
   output kept) without paying ``fast``'s refinement and matting. The budget is ``balanced``'s
   measured CPU on the same photos, model loads included.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tune_cv import Masks, samples  # noqa: E402  (same data, halves and cache as the presets' CV)

BAD_IOU = 0.90
FLAG_SHARE = 0.17  # the likely_wrong threshold flags this share of the fitted half's outputs
RIDGE = 3.0  # L2 penalty on the standardised weights (77 photos: keep the model small); of 0.3,
# 1, 3, 10, 30 the best pooled held-out AUC (1 and 3 within 0.001), so slightly optimistic
# The model's inputs, all of the measurements (no subset picked on the data); sqrt_ spreads
# ratios whose informative values are small.
FEATURES = ("multiple_objects", "sqrt_joined_object", "sqrt_second_object", "border_contact", "sqrt_refine_change", "ramp_gain", "grey_share",
            "edge_alignment", "unknown_share", "confidence", "alpha_coverage", "border_kinship")
EXPLORE_BLURS = (1, 2, 4)
CANDIDATES = ("outline_contrast", "solidity", "holes", "sqrt_hesitant_outside",
              "sqrt_dropped_share")
SECOND_OPINION = "u2netp_disagreement"  # 1 - IoU with a u2netp 320 pass: costs a network run

CLIP = [None]  # --clip N: standardised inputs clipped to ± N in a study (quality.score does not clip)
TIE = 0.005  # criteria closer than this count as equal; the cheaper threshold wins
BALANCED = {"preset": "balanced", "background": "mask", "escalate": None}
BEST = {"preset": "best", "background": "mask", "escalate": None}
FAST = {"preset": "fast", "background": "mask", "escalate": None}
NO_REFINE = {"refine": "none"}
# name: (mask source in tune_cv's notation, PipelineOptions fields). Fast's model is the fused
# one; its raw mask is the mean of the two cached passes, as the fusion computes it.
VARIANTS = {
    "balanced": ("isnet@896", BALANCED),
    "balanced/raw": ("isnet@896", {**BALANCED, **NO_REFINE}),
    "best": ("max:isnet@768,isnet@896", BEST),
    "fast": ("mean:isnet@512,u2netp@320", FAST),
}


# --- step 1: rows ---------------------------------------------------------------------------
def collect(masks: Masks, data, rows: dict, names) -> None:
    from PIL import Image

    from cutout.jobs.spec import PipelineOptions
    from cutout.workers import metrics
    from cutout.workers.pipeline import Pipeline

    for name in names:
        source, fields = VARIANTS[name]
        if not all(masks.available(m) for m in masks.members(source)):
            print(f"  {name}: masks not cached yet, left out", flush=True)
            continue
        pipeline = Pipeline(PipelineOptions(**fields))
        for dataset, stem, path, gt, ignore, half in data:
            key = f"{name}|{dataset}/{stem}"
            if key in rows:
                continue
            rgb = np.asarray(Image.open(path).convert("RGB"))
            start = time.process_time()
            result = pipeline.finish(rgb, pipeline.calibrate(masks.source(source, dataset, stem)))
            cpu = time.process_time() - start
            alpha = result.alpha
            second = masks.source("u2netp@320", dataset, stem) >= 0.5
            row = {"set": dataset, "stem": stem, "half": half, "cpu": cpu, "notes": result.notes,
                   "iou": metrics.iou(alpha >= 0.5, gt > 0.5, ignore),
                   "mse": metrics.mse(alpha, gt, None if ignore is None else ~ignore),
                   **{f"q_{k}": v for k, v in result.quality.items()},
                   "q_" + SECOND_OPINION: 1.0 - metrics.iou(second, alpha >= 0.5)}
            if dataset == "am":
                row["sad"] = metrics.sad(alpha, gt)
            rows[key] = row
            save_arrays(masks.cache, key, result, pipeline.calibrate(masks.source(source, dataset, stem)))
        print(f"  {name}: done", flush=True)


def arrays_path(cache: Path, key: str) -> Path:
    return cache / "finished" / (key.replace("|", "/").replace("/", "__") + ".npz")


def save_arrays(cache: Path, key: str, result, unrefined: np.ndarray) -> None:
    """The arrays ``quality.measure`` reads, as 8-bit, so ``--remeasure`` can recompute the
    measurements after a change to them without rerunning refinement and matting."""
    path = arrays_path(cache, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    as8 = lambda a: np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)  # noqa: E731
    np.savez_compressed(path, alpha=as8(result.alpha), mask=as8(result.mask), unrefined=as8(unrefined),
                        trimap=result.trimap if result.trimap is not None else np.zeros(0, np.uint8),
                        notes=np.array(result.notes, dtype=str))


def metrics_iou(a, b) -> float:
    from cutout.workers.metrics import iou

    return iou(a, b, None)


def remeasure(masks: Masks, data, rows: dict) -> None:
    """Recompute every row's measurements from the saved arrays (8-bit: within about 1/255 of
    a full rerun; final figures come from ``--refresh``)."""
    from PIL import Image

    from cutout.workers.quality import measure
    from cutout.workers.pipeline import Pipeline
    from cutout.jobs.spec import PipelineOptions

    paths = {f"{d}/{s}": p for d, s, p, *_ in data}
    for key, row in rows.items():
        name, photo = key.split("|", 1)
        path = arrays_path(masks.cache, key)
        if not path.exists():
            continue
        saved = np.load(path)
        pipeline = Pipeline(PipelineOptions(**VARIANTS[name][1]))
        rgb = np.asarray(Image.open(paths[photo]).convert("RGB"))
        trimap = saved["trimap"] if saved["trimap"].size else None
        quality, _flags = measure(saved["alpha"] / 255.0, saved["mask"] / 255.0, trimap, list(saved["notes"]),
                                  fg_threshold=pipeline.options.trimap_fg, bg_threshold=pipeline.options.trimap_bg,
                                  rgb=rgb, unrefined=saved["unrefined"] / 255.0, ramp=pipeline.mask_ramp)
        row.update({f"q_{k}": v for k, v in quality.items()})
        stem_set, stem = photo.split("/", 1)
        kept = saved["alpha"] >= 128
        for member in ("isnet@512", "isnet@768", "u2netp@320"):
            other = masks.member(member, stem_set, stem) >= 0.5
            row[f"q_disagree_{member.replace('@', '')}"] = 1.0 - metrics_iou(other, kept)
        for sigma in EXPLORE_BLURS:  # candidate measurements, compared by the same folds
            from cutout.workers.quality import KEPT_ALPHA, edge_alignment, small_copy
            row[f"q_edge_alignment_b{sigma}"] = edge_alignment(small_copy(saved["alpha"] / 255.0) >= KEPT_ALPHA,
                                                               small_copy(rgb), blur=sigma)
        for cname, value in candidate_signals(saved["alpha"] / 255.0, saved["unrefined"] / 255.0, rgb,
                                              pipeline.mask_ramp).items():
            row[f"q_{cname}"] = float(value)


# --- candidate measurements (issue 15), compared by the same folds before one is shipped --------
CONTRAST_DE = 10.0  # Lab ΔE76 above which two colours count as different
BAND_GAP = 2  # px on the small copy: the bands compared across an outline start this far from it
BAND_WINDOW = 9  # px: the local mean colour on each side is taken over this window


def _lab(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def _disk(radius: int) -> np.ndarray:
    import cv2

    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2)


def outline_contrast(kept: np.ndarray, lab: np.ndarray) -> float:
    """Share of the outline whose local inside and outside colours differ by > CONTRAST_DE."""
    import cv2

    binary = kept.astype(np.uint8)
    outline = (binary - cv2.erode(binary, np.ones((3, 3), np.uint8))).astype(bool)
    if not outline.any():
        return 0.5
    inner = cv2.erode(binary, _disk(BAND_GAP)).astype(np.float32)
    outer = cv2.erode(1 - binary, _disk(BAND_GAP)).astype(np.float32)
    window = (BAND_WINDOW, BAND_WINDOW)
    means = []
    for band in (inner, outer):
        total = cv2.boxFilter(lab * band[..., None], -1, window, normalize=False)
        count = cv2.boxFilter(band, -1, window, normalize=False)
        means.append((total[outline], count[outline]))
    (sum_in, n_in), (sum_out, n_out) = means
    valid = (n_in > 0) & (n_out > 0)
    if not valid.any():
        return 0.5
    distance = np.linalg.norm(sum_in[valid] / n_in[valid, None] - sum_out[valid] / n_out[valid, None], axis=1)
    return float((distance > CONTRAST_DE).mean())


def solidity(kept: np.ndarray) -> float:
    import cv2

    points = cv2.findNonZero(kept.astype(np.uint8))
    if points is None:
        return 1.0
    hull = cv2.contourArea(cv2.convexHull(points))
    return float(min(1.0, np.count_nonzero(kept) / hull)) if hull > 0 else 1.0


def holes(kept: np.ndarray) -> float:
    import cv2

    count, labels = cv2.connectedComponents((~kept).astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    enclosed = np.count_nonzero(~np.isin(labels, border) & ~kept)
    return enclosed / max(1, np.count_nonzero(kept) + enclosed)


def candidate_signals(alpha: np.ndarray, unrefined: np.ndarray, rgb: np.ndarray, ramp) -> dict:
    from cutout.workers.quality import KEPT_ALPHA, small_copy

    alpha, unrefined = small_copy(alpha.astype(np.float32)), small_copy(unrefined.astype(np.float32))
    kept = alpha >= KEPT_ALPHA
    lab = _lab(small_copy(rgb))
    low, high = ramp
    raw = low + unrefined * (high - low)
    before = unrefined >= KEPT_ALPHA
    n_kept = max(1, np.count_nonzero(kept))
    return {
        "outline_contrast": outline_contrast(kept, lab),
        "solidity": solidity(kept),
        "holes": holes(kept),
        "hesitant_outside": min(1.0, np.count_nonzero(~kept & (raw >= 0.2) & (raw < 0.5)) / n_kept),
        "dropped_share": np.count_nonzero(before & ~kept) / max(1, np.count_nonzero(before)),
    }


def table(rows: dict, name: str, data) -> list[dict]:
    return [rows[f"{name}|{d}/{s}"] for d, s, *_ in data if f"{name}|{d}/{s}" in rows]


# --- step 3: the score ------------------------------------------------------------------------
def feature_matrix(rows: list[dict], features) -> np.ndarray:
    from cutout.workers.quality import feature_value

    return np.array([[feature_value({k[2:]: v for k, v in r.items() if k.startswith("q_")}, f)
                      for f in features] for r in rows], np.float64)


def standardised(x: np.ndarray, mean, scale) -> np.ndarray:
    """(x - mean) / scale, clipped to ± CLIP[0] (None: not clipped) as ``quality.score`` does."""
    z = (x - mean) / scale
    return z if CLIP[0] is None else np.clip(z, -CLIP[0], CLIP[0])


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = RIDGE):
    """Means, scales, weights, intercept of P(y = 1) = sigmoid(b + w · (x - mean) / scale)."""
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-9
    z = np.hstack([np.ones((len(x), 1)), standardised(x, mean, scale)])
    w = np.zeros(z.shape[1])
    penalty = np.eye(z.shape[1]) * ridge
    penalty[0, 0] = 0.0
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-z @ w))
        gradient = z.T @ (p - y) + penalty @ w
        hessian = z.T @ (z * (p * (1 - p))[:, None]) + penalty
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return mean, scale, w[1:], w[0]


def predict_right(model, x: np.ndarray) -> np.ndarray:
    """The score: P(right) = 1 - P(bad)."""
    mean, scale, weights, intercept = model
    return 1.0 - 1.0 / (1.0 + np.exp(-(intercept + standardised(x, mean, scale) @ weights)))


def auc(score_bad: np.ndarray, bad: np.ndarray) -> float:
    """ROC AUC of ``score_bad`` (higher = more likely bad)."""
    from cutout.workers.metrics import roc_auc

    return roc_auc(score_bad, bad)


def flag_threshold(scores: np.ndarray, share: float = FLAG_SHARE) -> float:
    """The score below which ``share`` of these outputs fall."""
    return float(np.quantile(scores, share))


def catch(scores: np.ndarray, bad: np.ndarray, threshold: float) -> tuple[float, float, int, int]:
    flagged = scores < threshold
    return (float((flagged & bad).sum() / max(1, bad.sum())), float(flagged.mean()),
            int((flagged & bad).sum()), int(bad.sum()))


def out_of_fold_threshold(rows: dict, keys, variants, features) -> float:
    """The ``likely_wrong`` threshold for a model fitted on ``keys``: the score under which
    ``FLAG_SHARE`` of their ``balanced`` outputs fall, each scored by a model fitted on the other
    part of ``keys`` (alternating), as unseen photos are scored. In-sample scores sit too far
    from the threshold on both sides, so a threshold set on them flags too few unseen photos."""
    out_of_fold_scores(rows, keys, variants, features)
    return flag_threshold(np.array([rows[f"balanced|{k}"]["s"] for k in keys]))


def score_study(rows: dict, data, variants, features, label: str) -> dict:
    """Both folds and the pooled held-out figures for one feature set, fitted on ``variants``'
    rows, reported on the ``balanced`` rows of the held-out half."""
    print(f"\n{label}: features {', '.join(features)}; fitted on {', '.join(variants)}")
    held_scores, held_bad, out = [], [], {}
    for fit_half, test_half in (("A", "B"), ("B", "A")):
        fit_rows = [r for v in variants for r in table(rows, v, data) if r["half"] == fit_half]
        test_rows = [r for r in table(rows, "balanced", data) if r["half"] == test_half]
        model = fit_logistic(feature_matrix(fit_rows, features), np.array([r["iou"] < BAD_IOU for r in fit_rows], float))
        fit_keys = [f"{d}/{s}" for d, s, *_r, h in data if h == fit_half]
        threshold = out_of_fold_threshold(rows, fit_keys, variants, features)
        scores = predict_right(model, feature_matrix(test_rows, features))
        bad = np.array([r["iou"] < BAD_IOU for r in test_rows])
        caught, flagged, n_caught, n_bad = catch(scores, bad, threshold)
        print(f"  fit {fit_half}, report {test_half}: AUC {auc(1 - scores, bad):.3f}  likely_wrong below "
              f"{threshold:.3f}: caught {n_caught}/{n_bad} = {caught:.0%} of bad, flagged {flagged:.0%} of "
              f"{len(test_rows)}")
        held_scores.append(scores)
        held_bad.append(bad)
        out[f"fit {fit_half}"] = {"auc": auc(1 - scores, bad), "caught": caught, "flagged": flagged,
                                  "threshold": threshold}
        out[fit_half] = model
    scores, bad = np.concatenate(held_scores), np.concatenate(held_bad)
    flagged = np.concatenate([s < out[f"fit {h}"]["threshold"] for s, h in zip(held_scores, "AB")])
    print(f"  pooled held-out: AUC {auc(1 - scores, bad):.3f}  caught {(flagged & bad).sum()}/{bad.sum()} = "
          f"{(flagged & bad).sum() / bad.sum():.0%}, flagged {flagged.mean():.0%} of {len(bad)}")
    out["pooled"] = {"auc": auc(1 - scores, bad), "caught": float((flagged & bad).sum() / bad.sum()),
                     "flagged": float(flagged.mean())}
    return out


def explore(rows: dict, data, only_candidates: bool = False) -> None:
    """Candidate feature sets, each by both folds (held-out figures only)."""
    fitted_on = [v for v in ("balanced", "fast", "best") if table(rows, v, data)]
    candidates = {"shipped": FEATURES}
    for sigma in EXPLORE_BLURS:
        candidates[f"edge blur {sigma}"] = tuple(f"edge_alignment_b{sigma}" if f == "edge_alignment" else f
                                                 for f in FEATURES)
    candidates["no edge"] = tuple(f for f in FEATURES if f != "edge_alignment")
    for member in ("isnet512", "isnet768", "u2netp320"):
        candidates[f"+ {member}"] = FEATURES + (f"disagree_{member}",)
        candidates[f"+ sqrt {member}"] = FEATURES + (f"sqrt_disagree_{member}",)
    for name in CANDIDATES:
        candidates[f"+ {name}"] = FEATURES + (name,)
    candidates["edge -> outline_contrast"] = tuple("outline_contrast" if f == "edge_alignment" else f for f in FEATURES)
    if only_candidates:
        candidates = {k: v for k, v in candidates.items()
                      if k == "shipped" or k[2:] in CANDIDATES or k.startswith("edge ->")}
    for label, features in candidates.items():
        score_study(rows, data, fitted_on, features, label)
    if only_candidates:
        return
    pool = FEATURES[1:] + ("sqrt_" + SECOND_OPINION,)
    for k in (2, 3, 4, 5, 6, 8):
        for ridge in (1.0, 3.0, 10.0, 30.0):
            selected_study(rows, data, pool, k, ridge, f"top {k} in fold, ridge {ridge}")


def selected_study(rows: dict, data, pool, k: int, ridge: float, label: str) -> dict:
    """Like ``score_study`` but the features are chosen inside each fold: the ``k`` signals of
    ``pool`` with the best single AUC on the fitted half's ``balanced`` outputs."""
    fitted_on = [v for v in ("balanced", "fast", "best") if table(rows, v, data)]
    held_scores, held_bad, held_flag = [], [], []
    for fit_half, test_half in (("A", "B"), ("B", "A")):
        fit_balanced = [r for r in table(rows, "balanced", data) if r["half"] == fit_half]
        bad_fit = np.array([r["iou"] < BAD_IOU for r in fit_balanced])
        strength = {f: abs(auc(feature_matrix(fit_balanced, (f,))[:, 0], bad_fit) - 0.5) for f in pool}
        features = tuple(sorted(pool, key=lambda f: -strength[f])[:k])
        fit_rows = [r for v in fitted_on for r in table(rows, v, data) if r["half"] == fit_half]
        model = fit_logistic(feature_matrix(fit_rows, features),
                             np.array([r["iou"] < BAD_IOU for r in fit_rows], float), ridge)
        threshold = flag_threshold(predict_right(model, feature_matrix(fit_balanced, features)))
        test_rows = [r for r in table(rows, "balanced", data) if r["half"] == test_half]
        scores = predict_right(model, feature_matrix(test_rows, features))
        held_scores.append(scores)
        held_bad.append(np.array([r["iou"] < BAD_IOU for r in test_rows]))
        held_flag.append(scores < threshold)
        print(f"    fit {fit_half}: {', '.join(features)}; AUC on {test_half} {auc(1 - scores, held_bad[-1]):.3f}")
    scores, bad, flagged = (np.concatenate(a) for a in (held_scores, held_bad, held_flag))
    print(f"  {label}: pooled held-out AUC {auc(1 - scores, bad):.3f}  caught {(flagged & bad).sum()}/{bad.sum()}, "
          f"flagged {flagged.mean():.0%}")


def single_signal_aucs(rows: dict, data) -> None:
    balanced = table(rows, "balanced", data)
    bad = np.array([r["iou"] < BAD_IOU for r in balanced])
    print(f"\nbalanced outputs: {bad.sum()} bad of {len(bad)} (IoU < {BAD_IOU}); one signal each, AUC "
          "(> 0.5: higher means worse; < 0.5: lower means worse):")
    for name in sorted(k for k in balanced[0] if k.startswith("q_") and k != "q_score"):
        values = np.array([r[name] for r in balanced])
        print(f"  {name[2:]:22} {auc(values, bad):.3f}")


def rescore(rows: dict, model, features) -> None:
    """Every row's score ``s`` under ``model`` (a fold's, so policies are judged out of fold)."""
    values = list(rows.values())
    for row, value in zip(values, predict_right(model, feature_matrix(values, features))):
        row["s"] = float(value)


def final_model(rows: dict, data, variants, features):
    fit_rows = [r for v in variants for r in table(rows, v, data)]
    mean, scale, weights, intercept = fit_logistic(
        feature_matrix(fit_rows, features), np.array([r["iou"] < BAD_IOU for r in fit_rows], float))
    # the model predicts P(bad); the stored score is P(right): flip the signs once here
    model = {"intercept": round(float(-intercept), 4),
             "features": {f: (round(float(m), 4), round(float(s), 4), round(float(-w), 4))
                          for f, m, s, w in zip(features, mean, scale, weights)}}
    threshold = out_of_fold_threshold(rows, [f"{d}/{s}" for d, s, *_ in data], variants, features)
    print("\nfitted on all photos (paste into cutout/workers/quality.py):")
    print(f'SCORE_MODEL = {{\n    "intercept": {model["intercept"]},\n    "features": {{  # name: (mean, scale, weight)')
    for name, values in model["features"].items():
        print(f'        "{name}": {values},')
    print("    },\n}")
    print(f"LIKELY_WRONG_BELOW = {threshold:.3f}  # flags {FLAG_SHARE:.0%} of the balanced outputs")
    return mean, scale, weights, intercept


# --- step 4: do no harm -----------------------------------------------------------------------
def criterion(chosen: list[dict], reference: list[dict]) -> float:
    """tune_cv.py's J: SAD, MSE (alphamatting), 1 - IoU, MSE (GrabCut), each over the default's."""
    def means(rows):
        am = [r for r in rows if r["set"] == "am"]
        gc = [r for r in rows if r["set"] == "gc"]
        return (statistics.fmean(r["sad"] for r in am), statistics.fmean(r["mse"] for r in am),
                1 - statistics.fmean(r["iou"] for r in gc), statistics.fmean(r["mse"] for r in gc))
    return statistics.fmean(c / max(r, 1e-9) for c, r in zip(means(chosen), means(reference)))


def figures(rows: list[dict]) -> str:
    am = [r for r in rows if r["set"] == "am"]
    gc = [r for r in rows if r["set"] == "gc"]
    return (f"SAD {statistics.fmean(r['sad'] for r in am):6.2f} / {statistics.median(r['sad'] for r in am):5.2f}"
            f"  MSE am {statistics.fmean(r['mse'] for r in am):.4f}  IoU gc {statistics.fmean(r['iou'] for r in gc):.4f}"
            f"  MSE gc {statistics.fmean(r['mse'] for r in gc):.4f}")


def escalated(rows: dict, key: str, cheap: str, costly: str, below: float) -> tuple[dict, bool]:
    """The cascade for one photo: ``cheap``'s output, or ``costly``'s when the first scored
    below ``below`` and the second scores higher (``Pipeline._escalate``)."""
    first = rows[f"{cheap}|{key}"]
    if first["s"] >= below:
        return first, False
    second = rows[f"{costly}|{key}"]
    return (second if second["s"] > first["s"] else first), True


def rerun_cpu(rows: dict, keys, below: float) -> float:
    """Estimated CPU-s per photo of balanced with best rerun where its score is below ``below``."""
    share = sum(rows[f"balanced|{k}"]["s"] < below for k in keys) / len(keys)
    return COST["balanced"] + share * (COST["best"] - FIXED_RUN_CPU)


def cheapest_best(grid, j) -> float:
    """The lowest threshold whose criterion is within ``TIE`` of the best on the grid (a lower
    threshold reruns fewer photos)."""
    values = {threshold: j(threshold) for threshold in grid}
    return min(t for t, value in values.items() if value <= min(values.values()) + TIE)


def harm_study(rows: dict, data, models: dict, features) -> dict:
    """Per photo: balanced, and best where balanced's score is below S (the higher score kept);
    S chosen on one half by tune_cv.py's criterion, reported on the other. A refinement gate
    (the unrefined output where the refined one scores below a threshold, if it scores higher)
    is chosen and reported the same way."""
    keys = [f"{d}/{s}" for d, s, *_ in data]
    halves = {k: h for (d, s, *_r, h), k in zip(data, keys)}
    grid = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01)
    print("\ndo no harm: balanced, and best where balanced's score is below S (higher score kept):")
    picks = {}
    for fit_half, test_half in (("A", "B"), ("B", "A"), (None, None)):
        rescore(rows, models[fit_half], features)
        fit = [k for k in keys if fit_half is None or halves[k] == fit_half]
        reference = [rows[f"balanced|{k}"] for k in fit]
        affordable = [s for s in grid if rerun_cpu(rows, fit, s) <= BALANCED_BUDGET]
        below, below_r = (cheapest_best(affordable, lambda s: criterion(
            [escalated(rows, k, "balanced", other, s)[0] for k in fit], reference)) for other in ("best", "balanced/raw"))
        picks[fit_half] = below
        test = [k for k in keys if test_half is None or halves[k] == test_half]
        chosen = [escalated(rows, k, "balanced", "best", below) for k in test]
        gate = [escalated(rows, k, "balanced", "balanced/raw", below_r)[0] for k in test]
        default = [rows[f"balanced|{k}"] for k in test]
        label = "all photos" if fit_half is None else f"fit {fit_half}, report {test_half}"
        share = sum(c[1] for c in chosen) / len(test)
        print(f"  {label}: S {below} (the lowest criterion at an estimated CPU within {BALANCED_BUDGET:.2f}): "
              f"best rerun on {sum(c[1] for c in chosen)}/{len(test)}, est. CPU-s "
              f"{COST['balanced'] + share * (COST['best'] - FIXED_RUN_CPU):.2f}")
        print(f"    default            {figures(default)}")
        print(f"    + best below S     {figures([c[0] for c in chosen])}  J {criterion([c[0] for c in chosen], default):.3f}")
        print(f"    refinement gate    {figures(gate)}  J {criterion(gate, default):.3f} (unrefined kept "
              f"below {below_r} when it scores higher)")
        print(f"    best preset        {figures([rows[f'best|{k}'] for k in test])}")
    return picks


def fit_on(rows: dict, keys, variants, features):
    """The score model fitted on these photos' rows of ``variants``."""
    fit_rows = [rows[f"{v}|{k}"] for v in variants for k in keys if f"{v}|{k}" in rows]
    return fit_logistic(feature_matrix(fit_rows, features), np.array([r["iou"] < BAD_IOU for r in fit_rows], float))


def score_keys(rows: dict, keys, model, features) -> None:
    """Every variant's row of these photos scored by ``model``."""
    values = [r for k in keys for name in VARIANTS if (r := rows.get(f"{name}|{k}")) is not None]
    for row, value in zip(values, predict_right(model, feature_matrix(values, features))):
        row["s"] = float(value)


def out_of_fold_scores(rows: dict, keys, variants, features) -> None:
    """Scores for ``keys`` that were not fitted on them: the photos split in two (alternating)
    and each part scored by the model fitted on the other, so a threshold chosen on these
    photos sees scores as unseen photos get them (in-sample scores are too kind to the bad)."""
    inner = (keys[0::2], keys[1::2])
    for part, other in (inner, inner[::-1]):
        score_keys(rows, part, fit_on(rows, other, variants, features), features)


def nested_policy_study(rows: dict, data, variants, features) -> None:
    """The escalation S and the cascade T, each chosen on the tuning half from out-of-fold
    scores (``out_of_fold_scores``), then judged on the other half scored by the model fitted
    on the whole tuning half, as a user's unseen photos would be."""
    keys = [f"{d}/{s}" for d, s, *_ in data]
    halves = {k: h for (d, s, *_r, h), k in zip(data, keys)}
    harm_grid = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01)
    cascade_grid = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

    def cascade(test, threshold):
        picked = [escalated(rows, k, "fast", "balanced", threshold) for k in test]
        cpu = COST["fast"] + sum(c[1] for c in picked) / len(test) * (COST["balanced"] - FIXED_RUN_CPU)
        return [c[0] for c in picked], cpu

    print("\nnested: S and T chosen on out-of-fold scores of the tuning half")
    picks = {}
    for fit_half, test_half in (("A", "B"), ("B", "A"), (None, None)):
        fit = [k for k in keys if fit_half is None or halves[k] == fit_half]
        out_of_fold_scores(rows, fit, variants, features)
        reference = [rows[f"balanced|{k}"] for k in fit]
        affordable = [t for t in harm_grid if rerun_cpu(rows, fit, t) <= BALANCED_BUDGET]
        below = cheapest_best(affordable, lambda t: criterion(
            [escalated(rows, k, "balanced", "best", t)[0] for k in fit], reference))
        best_rows = [rows[f"best|{k}"] for k in fit]
        within = [(criterion(cascade(fit, t)[0], best_rows), t) for t in cascade_grid
                  if cascade(fit, t)[1] <= COST["balanced"]]
        threshold = min(within)[1] if within else cascade_grid[0]
        label = "all photos (out-of-fold scores)" if fit_half is None else f"fit {fit_half}, report {test_half}"
        print(f"  {label}: S {below}, T {threshold}")
        picks[fit_half] = (below, threshold)
        if fit_half is None:
            continue
        test = [k for k in keys if halves[k] == test_half]
        score_keys(rows, test, fit_on(rows, fit, variants, features), features)
        chosen = [escalated(rows, k, "balanced", "best", below) for k in test]
        picked, cpu = cascade(test, threshold)
        for name in ("fast", "balanced", "best"):
            print(f"    {name:16} {figures([rows[f'{name}|{k}'] for k in test])}")
        print(f"    balanced + S     {figures([c[0] for c in chosen])}  rerun {sum(c[1] for c in chosen)}/{len(test)}"
              f"  J vs balanced {criterion([c[0] for c in chosen], [rows[f'balanced|{k}'] for k in test]):.3f}")
        print(f"    cascade T        {figures(picked)}  est. CPU-s {cpu:.2f}  J vs best "
              f"{criterion(picked, [rows[f'best|{k}'] for k in test]):.3f}")
    print("  when the folds disagree, each fold's pick on both held-out halves (the better worse half "
          "among those within the CPU budget on all photos ships):")
    out_of_fold_scores(rows, keys, variants, features)
    for value in sorted({picks["A"][1], picks["B"][1]}):
        print(f"    T {value}: est. CPU-s on all photos {cascade(keys, value)[1]:.2f} (budget {COST['balanced']:.2f})")
    for name, index, reference in (("S", 0, "balanced"), ("T", 1, "best")):
        for value in sorted({picks["A"][index], picks["B"][index]}):
            judged = []
            for fit_half, test_half in (("A", "B"), ("B", "A")):
                fit = [k for k in keys if halves[k] == fit_half]
                test = [k for k in keys if halves[k] == test_half]
                score_keys(rows, test, fit_on(rows, fit, variants, features), features)
                chosen = ([escalated(rows, k, "balanced", "best", value)[0] for k in test] if name == "S"
                          else cascade(test, value)[0])
                judged.append(f"{test_half} {criterion(chosen, [rows[f'{reference}|{k}'] for k in test]):.3f}")
            print(f"    {name} {value}: J vs {reference} on held-out {', '.join(judged)}")


def member_disagreement(masks: Masks, data) -> dict:
    """Per photo, 1 - IoU of the two networks ``fast`` fuses (IS-Net at 512 and u2netp at 320,
    raw masks >= 0.5): a second opinion ``fast`` computes anyway."""
    from cutout.workers.metrics import iou

    return {f"{d}/{s}": 1.0 - iou(masks.source("isnet@512", d, s) >= 0.5, masks.source("u2netp@320", d, s) >= 0.5)
            for d, s, *_ in data}


def kept_by_rule(first: dict, second: dict, apart: bool, keep) -> dict:
    """The output a rerun photo keeps: ``keep`` "score" the higher score; where the networks
    disagreed (``apart``), "costly" the rerun's, a number the rerun's unless the first scores
    higher by more than that (``Pipeline._escalate``'s ``APART_KEEP_MARGIN``)."""
    if keep == "costly" and apart:
        return second
    if keep not in ("score", "costly", "early") and apart:
        return first if first["s"] > second["s"] + keep else second
    return second if second["s"] > first["s"] else first


def judged_on_both_halves(rows: dict, keys, halves: dict, variants, features, outputs) -> str:
    """"B j, A j": J against ``best`` of ``outputs(test)`` on each half, scored by the model
    fitted on the other half."""
    judged = []
    for fit_half, test_half in (("A", "B"), ("B", "A")):
        fit = [k for k in keys if halves[k] == fit_half]
        test = [k for k in keys if halves[k] == test_half]
        score_keys(rows, test, fit_on(rows, fit, variants, features), features)
        judged.append(f"{test_half} {criterion(outputs(test), [rows[f'best|{k}'] for k in test]):.3f}")
    return ", ".join(judged)


def disagreement_cascade_study(rows: dict, data, variants, features, disagreement: dict) -> None:
    """The cascade rerun also where ``fast``'s two networks disagree by more than D (free in
    ``fast``), and the rerun's output kept where the trigger was the disagreement: T and D
    chosen together on the tuning half (out-of-fold scores, the lowest criterion against
    ``best`` within ``balanced``'s CPU), reported on the other half."""
    keys = [f"{d}/{s}" for d, s, *_ in data]
    halves = {k: h for (d, s, *_r, h), k in zip(data, keys)}
    keeps = ("score", "costly", 0.1, 0.2, 0.3)  # a number: the costly output unless the cheap one
    # scores higher by more than that
    grid = [(t, d, keep) for t in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8) for d in (0.05, 0.1, 0.15, 0.2, 0.3, 1.01)
            for keep in keeps]

    def one(k, t, d, keep):
        first = rows[f"fast|{k}"]
        low, apart = first["s"] < t, disagreement[k] > d
        if not (low or apart):
            return first, False
        return kept_by_rule(first, rows[f"balanced|{k}"], apart, keep), True

    def cascade(test, setting):
        picked = [one(k, *setting) for k in test]
        cpu = COST["fast"] + sum(c[1] for c in picked) / len(test) * (COST["balanced"] - FIXED_RUN_CPU)
        return [c[0] for c in picked], cpu

    picks = []
    print("\ncascade with the fused networks' disagreement: rerun where score < T or disagreement > D")
    for d in (0.05, 0.1, 0.15, 0.2, 0.3):
        share = sum(disagreement[k] > d for k in keys) / len(keys)
        print(f"  disagreement > {d}: {share:.0%} of photos")
    for fit_half, test_half in (("A", "B"), ("B", "A")):
        fit = [k for k in keys if halves[k] == fit_half]
        out_of_fold_scores(rows, fit, variants, features)
        best_fit = [rows[f"best|{k}"] for k in fit]
        within = [(criterion(cascade(fit, g)[0], best_fit), g) for g in grid if cascade(fit, g)[1] <= COST["balanced"]]
        setting = min(within, key=lambda pair: pair[0])[1]
        picks.append(setting)
        test = [k for k in keys if halves[k] == test_half]
        score_keys(rows, test, fit_on(rows, fit, variants, features), features)
        picked, cpu = cascade(test, setting)
        plain, plain_cpu = cascade(test, (0.4, 1.01, "score"))
        print(f"  fit {fit_half}, report {test_half}: T {setting[0]}, D {setting[1]}, keep {setting[2]}")
        print(f"    cascade T, D     {figures(picked)}  est. CPU-s {cpu:.2f}  J vs best "
              f"{criterion(picked, [rows[f'best|{k}'] for k in test]):.3f}")
        print(f"    auto (T 0.4)     {figures(plain)}  est. CPU-s {plain_cpu:.2f}  J vs best "
              f"{criterion(plain, [rows[f'best|{k}'] for k in test]):.3f}")
        for name in ("balanced", "best"):
            print(f"    {name:16} {figures([rows[f'{name}|{k}'] for k in test])}")
    print("  each fold's pick (and the plain cascade) judged on both held-out halves, J vs best; "
          "est. CPU-s on all photos:")
    for setting in sorted(set(picks) | {(0.4, 1.01, "score")}, key=str):
        judged = judged_on_both_halves(rows, keys, halves, variants, features,
                                       lambda test: cascade(test, setting)[0])
        out_of_fold_scores(rows, keys, variants, features)
        print(f"    T {setting[0]}, D {setting[1]}, keep {setting[2]}: {judged}; "
              f"CPU-s {cascade(keys, setting)[1]:.2f}")
    out_of_fold_scores(rows, keys, variants, features)
    print("  all photos (out-of-fold scores), the frontier by D (T 0.4):")
    for d in (0.05, 0.1, 0.15, 0.2, 0.3, 1.01):
        for keep in keeps:
            picked, cpu = cascade(keys, (0.4, d, keep))
            print(f"    D {d:4} keep {keep!s:6} {figures(picked)}  est. CPU-s {cpu:.2f}  J vs best "
                  f"{criterion(picked, [rows[f'best|{k}'] for k in keys]):.3f}")


# --- step 5: cascade --------------------------------------------------------------------------
# Whole-process CPU-s per photo from benchmarks/bench_cost.py (docs/results.md): fast 2.71,
# balanced 4.47, best 6.84; a rerun costs best's per-photo work without its model loads and
# imports, estimated as best minus FIXED_RUN_CPU.
COST = {"fast": 2.71, "balanced": 4.47, "best": 6.84}
FIXED_RUN_CPU = 0.9  # imports and model loads per photo over a 27-photo run (bench_cost.py)
BALANCED_BUDGET = 10.04 / 2  # balanced's budget: half of rembg -a's CPU-s per photo (bench_cost.py)


def cascade_study(rows: dict, data, models: dict, features) -> None:
    """``fast`` everywhere, ``balanced`` or ``best`` again below T (the higher score kept). T is
    chosen on one half: the lowest criterion against ``best`` at an estimated CPU within
    ``balanced``'s; reported on the other half, and every T on all photos (the frontier)."""
    keys = [f"{d}/{s}" for d, s, *_ in data]
    halves = {k: h for (d, s, *_r, h), k in zip(data, keys)}
    grid = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

    def run(test, costly, threshold):
        picked = [escalated(rows, k, "fast", costly, threshold) for k in test]
        cpu = COST["fast"] + sum(c[1] for c in picked) / len(test) * (COST[costly] - FIXED_RUN_CPU)
        return [c[0] for c in picked], cpu

    for costly in ("balanced", "best"):
        print(f"\ncascade: fast everywhere, {costly} where fast's score < T, the higher score kept")
        for fit_half, test_half in (("A", "B"), ("B", "A"), (None, None)):
            rescore(rows, models[fit_half], features)
            fit = [k for k in keys if fit_half is None or halves[k] == fit_half]
            best_rows = [rows[f"best|{k}"] for k in fit]
            within = [(criterion(run(fit, costly, t)[0], best_rows), t) for t in grid
                      if run(fit, costly, t)[1] <= COST["balanced"]]
            threshold = min(within)[1] if within else grid[0]
            test = [k for k in keys if test_half is None or halves[k] == test_half]
            chosen, cpu = run(test, costly, threshold)
            label = "all photos" if fit_half is None else f"fit {fit_half}, report {test_half}"
            print(f"  {label}: T {threshold}")
            for name in ("fast", "balanced", "best"):
                print(f"    {name:10} {figures([rows[f'{name}|{k}'] for k in test])}  CPU-s {COST[name]:.2f}")
            print(f"    cascade    {figures(chosen)}  CPU-s {cpu:.2f} (est.)  J vs best "
                  f"{criterion(chosen, [rows[f'best|{k}'] for k in test]):.3f}")
        print("  the frontier, all photos (scores of the model fitted on all photos):")
        for threshold in grid:
            chosen, cpu = run(keys, costly, threshold)
            print(f"    T {threshold:4.2f}  {figures(chosen)}  CPU-s {cpu:.2f} (est.)")


def measured_cascade_study(rows: dict, data, variants, features, disagreement: dict, cpu: dict) -> None:
    """Step 7: the disagreement cascade priced per photo from measurements (``cpu``: stage_cpu.py's
    JSON), because the estimate (``balanced`` minus the loads, the same for every photo) came out
    far too low once a third of the photos reran: those are the costly ones to finish."""
    keys = [f"{d}/{s}" for d, s, *_ in data]
    halves = {k: h for (d, s, *_r, h), k in zip(data, keys)}
    loads = cpu["_load"]  # CPU-s of each preset's model load, paid once per process
    keeps = ("score", "costly", 0.1, 0.2, 0.3, "early")  # step 6's rules, and early
    grid = [(t, d, keep) for t in (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8) for d in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 1.01)
            for keep in keeps]

    def total(k, name):
        return cpu[k][name]["segment"] + cpu[k][name]["finish"]

    def one(k, t, d, keep):
        """(output kept, CPU-s of this photo, whether balanced ran)."""
        first = rows[f"fast|{k}"]
        apart = disagreement[k] > d
        if apart and keep == "early":
            return rows[f"balanced|{k}"], cpu[k]["fast"]["segment"] + total(k, "balanced"), True
        if not (apart or first["s"] < t):
            return first, total(k, "fast"), False
        spent = total(k, "fast") + total(k, "balanced")
        return kept_by_rule(first, rows[f"balanced|{k}"], apart, keep), spent, True

    def cascade(test, setting):
        picked = [one(k, *setting) for k in test]
        cost = sum(c[1] for c in picked) + loads["fast"] + (loads["balanced"] if any(c[2] for c in picked) else 0)
        return [c[0] for c in picked], cost / len(test)

    def balanced_cpu(test):
        return (sum(total(k, "balanced") for k in test) + loads["balanced"]) / len(test)

    def budget_ok(test, setting):
        return all(cascade(part, setting)[1] <= balanced_cpu(part)
                   for part in ([k for k in test if k.startswith("am/")], [k for k in test if k.startswith("gc/")]))

    print("\nmeasured CPU-s per photo (stage_cpu.py), model loads spread over each set:")
    for name in ("am", "gc"):
        part = [k for k in keys if k.startswith(f"{name}/")]
        fast_cpu = (sum(total(k, "fast") for k in part) + loads["fast"]) / len(part)
        print(f"  {name}: fast {fast_cpu:.2f}  balanced {balanced_cpu(part):.2f}  fast's networks "
              f"{statistics.fmean(cpu[k]['fast']['segment'] for k in part):.2f}, the rest "
              f"{statistics.fmean(cpu[k]['fast']['finish'] for k in part):.2f}")
    picks = []
    for fit_half, test_half in (("A", "B"), ("B", "A")):
        fit = [k for k in keys if halves[k] == fit_half]
        out_of_fold_scores(rows, fit, variants, features)
        best_fit = [rows[f"best|{k}"] for k in fit]
        within = [(criterion(cascade(fit, g)[0], best_fit), g) for g in grid if budget_ok(fit, g)]
        setting = min(within, key=lambda pair: pair[0])[1]
        picks.append(setting)
        test = [k for k in keys if halves[k] == test_half]
        score_keys(rows, test, fit_on(rows, fit, variants, features), features)
        picked, cost = cascade(test, setting)
        print(f"  fit {fit_half}, report {test_half}: T {setting[0]}, D {setting[1]}, keep {setting[2]}: "
              f"{figures(picked)}  CPU-s {cost:.2f} (balanced {balanced_cpu(test):.2f})  J vs best "
              f"{criterion(picked, [rows[f'best|{k}'] for k in test]):.3f}")
    print("  each pick and the shipped auto judged on both held-out halves (J vs best), and on all "
          "photos (out-of-fold scores):")
    for setting in sorted(set(picks) | {(0.4, 1.01, "score")}, key=str):
        judged = judged_on_both_halves(rows, keys, halves, variants, features,
                                       lambda test: cascade(test, setting)[0])
        out_of_fold_scores(rows, keys, variants, features)
        per_set = ", ".join(f"{n} {cascade([k for k in keys if k.startswith(n + '/')], setting)[1]:.2f}"
                            for n in ("am", "gc"))
        print(f"    T {setting[0]}, D {setting[1]}, keep {setting[2]}: {judged}; "
              f"{figures(cascade(keys, setting)[0])}; CPU-s {per_set}")
    out_of_fold_scores(rows, keys, variants, features)
    print("  all photos (out-of-fold scores), the frontier; CPU-s per set against balanced's:")
    am = [k for k in keys if k.startswith("am/")]
    gc = [k for k in keys if k.startswith("gc/")]
    print(f"    balanced                {figures([rows[f'balanced|{k}'] for k in keys])}  "
          f"CPU-s am {balanced_cpu(am):.2f}, gc {balanced_cpu(gc):.2f}")
    print(f"    best                    {figures([rows[f'best|{k}'] for k in keys])}")
    for setting in grid:
        picked, _ = cascade(keys, setting)
        print(f"    T {setting[0]} D {setting[1]:4} {setting[2]!s:6} {figures(picked)}  CPU-s am "
              f"{cascade(am, setting)[1]:.2f}, gc {cascade(gc, setting)[1]:.2f}  J vs best "
              f"{criterion(picked, [rows[f'best|{k}'] for k in keys]):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=".cache/masks")
    parser.add_argument("--refresh", action="store_true", help="recompute every row")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--clip", type=float, default=None, help="study another clip (0: none)")
    parser.add_argument("--explore", action="store_true", help="compare candidate measurements only")
    parser.add_argument("--candidates", action="store_true", help="with --explore: the new candidates only")
    parser.add_argument("--remeasure", action="store_true",
                        help="recompute the measurements from the saved 8-bit arrays (fast)")
    parser.add_argument("--disagreement", action="store_true",
                        help="also study the cascade triggered by fast's two networks disagreeing")
    parser.add_argument("--stage-cpu", help="stage_cpu.py's JSON: price the cascade per photo, measured")
    args = parser.parse_args()
    masks, data = Masks(Path(args.cache)), samples()
    path = Path(args.cache) / "quality_rows.json"
    rows = {} if args.refresh or not path.exists() else json.loads(path.read_text())
    collect(masks, data, rows, args.variants)
    if args.remeasure:
        remeasure(masks, data, rows)
    path.write_text(json.dumps(rows))
    if args.clip is not None:
        CLIP[0] = args.clip or None
    single_signal_aucs(rows, data)
    if args.explore:
        explore(rows, data, args.candidates)
        return
    fitted_on = [v for v in ("balanced", "fast", "best") if table(rows, v, data)]
    score_study(rows, data, ["balanced"], FEATURES, "score, fitted on balanced outputs")
    folds = score_study(rows, data, fitted_on, FEATURES, "score, fitted on every preset's outputs")
    score_study(rows, data, fitted_on, FEATURES + (SECOND_OPINION,), "score with the u2netp second opinion")
    models = {"A": folds["A"], "B": folds["B"], None: final_model(rows, data, fitted_on, FEATURES)}
    if all(table(rows, v, data) for v in ("fast", "balanced/raw", "best")):
        nested_policy_study(rows, data, fitted_on, FEATURES)
    if all(table(rows, v, data) for v in ("balanced/raw", "best")):
        harm_study(rows, data, models, FEATURES)
    if all(table(rows, v, data) for v in ("fast", "best")):
        cascade_study(rows, data, models, FEATURES)
    if args.disagreement:
        disagreement_cascade_study(rows, data, fitted_on, FEATURES, member_disagreement(masks, data))
    if args.stage_cpu:
        measured_cascade_study(rows, data, fitted_on, FEATURES, member_disagreement(masks, data),
                               json.loads(Path(args.stage_cpu).read_text()))


if __name__ == "__main__":
    main()
