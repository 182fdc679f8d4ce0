"""2-fold CV of keeping the main object when the network kept several (``--objects main``).

Why: of the 21 bad `balanced` outputs on the visible sets, 7 reach the ``multiple_objects``
rule (two kept parts of similar size once narrow necks are cut) and all 7 are bad: the network
kept two people, a sign and its post. ``cutout.workers.objects.keep_main_object`` keeps one
part. Two rules for which part (listed before either was measured): the largest, or the
largest weighted by closeness to the image centre; and the size of the second part (against
the largest) from which the photo counts as several objects: 0.1 … 0.5.

Every photo of both visible sets goes through `balanced` once with every object kept
(``objects="all"``); each rule is applied to that output's alpha. Chosen by the preset study's
criterion J (mean of SAD, MSE on alphamatting, 1 − IoU and MSE on GrabCut, each over the same
half's `balanced` value: below 1 is better) on one half (each set's photos by name,
alternating), reported on the other.

    .venv/bin/python benchmarks/objects_cv.py      # about 5 minutes on 2 cores
"""
from __future__ import annotations

import statistics

import numpy as np

from box_tight import photos  # noqa: E402  (benchmarks/ is the script's folder)

SIZES = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
RULES = [("all", 1.0)] + [(pick, size) for pick in ("largest", "central") for size in SIZES]


def scores(row: dict, alpha: np.ndarray) -> dict:
    from cutout.workers import metrics

    truth, ignore = row["truth"], row["ignore"]
    return {"iou": metrics.iou(alpha >= 0.5, truth > 0.5, ignore), "sad": metrics.sad(alpha, truth),
            "mse": metrics.mse(alpha, truth)}


def summary(values: list[dict]) -> dict:
    am = [v for v in values if v["set"] == "am"]
    gc = [v for v in values if v["set"] == "gc"]
    return {"sad": statistics.fmean(v["sad"] for v in am), "sad_median": statistics.median(v["sad"] for v in am),
            "mse_am": statistics.fmean(v["mse"] for v in am), "iou": statistics.fmean(v["iou"] for v in gc),
            "mse_gc": statistics.fmean(v["mse"] for v in gc)}


def criterion(s: dict, ref: dict) -> float:
    return (s["sad"] / ref["sad"] + s["mse_am"] / ref["mse_am"]
            + (1 - s["iou"]) / (1 - ref["iou"]) + s["mse_gc"] / ref["mse_gc"]) / 4


def main() -> None:
    from cutout.jobs.spec import PipelineOptions
    from cutout.workers.objects import keep_main_object
    from cutout.workers.pipeline import Pipeline

    pipeline = Pipeline(PipelineOptions(background="mask", objects="all"))
    rows, counters = [], {"am": 0, "gc": 0}
    for dataset, stem, rgb, truth, ignore in photos():
        counters[dataset] += 1
        alpha = pipeline.finish(rgb, pipeline.segment([rgb])[0]).alpha
        rows.append({"set": dataset, "stem": stem, "half": "AB"[(counters[dataset] - 1) % 2], "alpha": alpha,
                     "truth": truth, "ignore": ignore})
        print(f"  {dataset}/{stem} done", flush=True)
    results = {}
    for pick, size in RULES:
        values, changed = [], []
        for row in rows:
            alpha = row["alpha"]
            if pick != "all":
                alpha, _note = keep_main_object(alpha, min_second=size, by_centre=pick == "central")
            value = {"set": row["set"], "half": row["half"], **scores(row, alpha)}
            before = scores(row, row["alpha"])["iou"]
            if abs(value["iou"] - before) > 0.005:
                changed.append(f"{row['stem']} {before:.2f}->{value['iou']:.2f}")
            values.append(value)
        results[pick, size] = values
        s = summary(values)
        print(f"{pick:8} {size:4}: SAD {s['sad']:.2f} / {s['sad_median']:.2f}, MSE {s['mse_am']:.4f}; GrabCut IoU "
              f"{s['iou']:.4f}, MSE {s['mse_gc']:.4f} | {', '.join(changed)}")
    refs = {half: summary([v for v in results["all", 1.0] if half is None or v["half"] == half])
            for half in ("A", "B", None)}

    def j(rule, half):
        return criterion(summary([v for v in results[rule] if half is None or v["half"] == half]), refs[half])

    print("\nJ against every object kept: half A | half B | all")
    for rule in RULES:
        print(f"  {rule[0]:8} {rule[1]:4}  {j(rule, 'A'):.3f} | {j(rule, 'B'):.3f} | {j(rule, None):.3f}")
    for fit, test in (("A", "B"), ("B", "A")):
        best = min(round(j(rule, fit), 4) for rule in RULES)
        tied = [rule for rule in RULES if round(j(rule, fit), 4) == best]
        print(f"choose on {fit}: J {best:.3f} for {tied}; held out on {test}: "
              + ", ".join(f"{rule} {j(rule, test):.3f}" for rule in tied))


if __name__ == "__main__":
    main()
