"""Box hints: cut out the object a box names, not whatever stands out in the whole photo.

A salient-object network picks "what stands out", which is often the wrong thing (the cup
beside the spoon, the whole desk around the laptop). A box says which object is meant, so:
1. the network runs on the box's crop grown by a margin (``crop_region``): the crop is resized
   to the network's own input size, so a small object gets the full resolution and the margin
   gives the network enough context to see the object's outline;
2. when the network's mask covers less than ``MIN_FILL`` of the box, it kept the wrong thing
   (the pot under a bush, a speck of the subject): GrabCut started from the box gives the mask
   instead;
3. calibration, refinement, trimap and matting run on the crop as usual (cheaper than on the
   whole photo), and the alpha is kept inside the box only: what the network kept of a
   neighbour in the margin goes (so only the parts of components that overlap the box stay);
4. except when the mask runs out of the box across more than ``CROSSING`` of a box side: then
   what the network kept inside the box is partly a neighbour joined to the object (a shirt
   under a boxed face), so the components overlapping the box are clipped to it first and
   GrabCut may relabel all of them (``select_and_refine``) before matting;
5. a part of the refined mask that lies mostly outside the box is a neighbour reaching in (the
   boy beside the boxed one, joined to him by a hand): its pixels go (``neighbour_parts``);
6. the alpha is placed back at the input's size (alpha zero outside the box).
The margin and the two paths were chosen by 2-fold cross-validation with tight boxes over both
visible sets (benchmarks/box_tight_cv.py), the crossing rule and spill on GrabCut's own boxes
(benchmarks/box_cv.py), the fallback and the neighbour rule over both
(benchmarks/box_fill_cv.py, benchmarks/box_parts_cv.py); docs/results.md,
"Box hints".
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

# Chosen by 2-fold CV (docs/results.md, "Box hints"): the margin with tight boxes over both
# visible sets, the others on GrabCut 50 with the dataset's boxes.
BOX_MARGIN = 0.1  # crop = box grown by this fraction of its width/height on each side
BOX_SPILL = 0.0  # kept alpha may leave the box by this fraction of its width/height
MIN_INSIDE = 0.0  # a component is kept when at least this share of it lies inside the box
# When the mask runs out across this share of a box side, what the network kept inside the box
# is partly a neighbour (a shirt under a boxed face): GrabCut may then relabel all of it.
CROSSING = 0.15
EDGE_PX = 3  # soft edge kept around the kept components, px (the matting band lives there)
# A network mask covering less of its box than this missed the object: GrabCut from the box
# is used instead (2-fold CV over tight and GrabCut's own boxes, benchmarks/box_fill_cv.py).
MIN_FILL = 0.2
# GrabCut for that fallback runs on a copy this long (the classical model's 512 costs 1.8x as
# much and lost nothing at 400 on any of the boxes that fall back; 320 and less lost some:
# docs/results.md, "Box hints").
FALLBACK_SIDE = 400
# A part of the refined mask (cut at necks as --objects main cuts them) with less than this share
# of its area inside the box is a neighbour reaching into it, and goes. 2-fold CV over the same
# boxes (benchmarks/box_parts_cv.py): every threshold from 0.3 to 0.6 does the same; the middle.
MIN_PART_INSIDE = 0.5


@dataclass(frozen=True)
class Region:
    """A pixel rectangle, half-open: columns x0..x1-1, rows y0..y1-1."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def grown(self, fraction: float, width: int, height: int) -> "Region":
        """Grown by ``fraction`` of its own width/height on each side, clamped to the image."""
        dx, dy = round(self.width * fraction), round(self.height * fraction)
        return Region(max(0, self.x0 - dx), max(0, self.y0 - dy),
                      min(width, self.x1 + dx), min(height, self.y1 + dy))

    def squared(self, width: int, height: int) -> "Region":
        """Grown along its shorter side to a square (as far as the image allows), so a network
        with a square input sees the object undistorted and with context on every side."""
        side = min(max(self.width, self.height), width, height)
        x0 = min(max(0, self.x0 - (side - self.width) // 2), width - side) if side > self.width else self.x0
        y0 = min(max(0, self.y0 - (side - self.height) // 2), height - side) if side > self.height else self.y0
        return Region(x0, y0, max(self.x1, x0 + side), max(self.y1, y0 + side))

    def shifted(self, origin: "Region") -> "Region":
        """The same rectangle in the coordinates of a crop that starts at ``origin``."""
        return Region(self.x0 - origin.x0, self.y0 - origin.y0, self.x1 - origin.x0, self.y1 - origin.y0)

    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def keep_box_components(mask: np.ndarray, box: Region, *, spill: float = BOX_SPILL,
                        min_inside: float = MIN_INSIDE) -> np.ndarray:
    """The soft ``mask`` (of a crop; ``box`` in the crop's coordinates) with only the connected
    components of its foreground (>= 0.5) that overlap the box, within the box grown by
    ``spill``. No component overlaps: an all-zero mask (the output is flagged empty)."""
    import cv2

    height, width = mask.shape
    count, labels, stats, _ = cv2.connectedComponentsWithStats((mask >= 0.5).astype(np.uint8), connectivity=8)
    inside = np.bincount(labels[box.slices()].ravel(), minlength=count)
    areas = stats[:, cv2.CC_STAT_AREA]
    kept = np.zeros(count, bool)
    kept[1:] = (inside[1:] > 0) & (inside[1:] >= min_inside * areas[1:])
    keep = kept[labels].astype(np.uint8)
    if EDGE_PX:
        size = 2 * EDGE_PX + 1
        keep = cv2.dilate(keep, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    limit = np.zeros((height, width), bool)
    limit[box.grown(spill, width, height).slices()] = True
    return np.where(limit & (keep > 0), mask, 0.0).astype(np.float32)


def crossing_share(mask: np.ndarray, box: Region) -> float:
    """The largest share of a box side along which the mask's foreground (>= 0.5) runs on out
    of the box (sides on the crop's border are left out: nothing lies beyond them)."""
    height, width = mask.shape
    foreground = mask >= 0.5
    lines = []
    if box.y0 > 0:
        lines.append(foreground[box.y0 - 1, box.x0:box.x1])
    if box.y1 < height:
        lines.append(foreground[box.y1, box.x0:box.x1])
    if box.x0 > 0:
        lines.append(foreground[box.y0:box.y1, box.x0 - 1])
    if box.x1 < width:
        lines.append(foreground[box.y0:box.y1, box.x1])
    return max((float(line.mean()) for line in lines if line.size), default=0.0)


def select_and_refine(crop_rgb: np.ndarray, mask: np.ndarray, box: Region, *, refine: bool,
                      spill: float = BOX_SPILL, min_inside: float = MIN_INSIDE,
                      crossing: float = CROSSING) -> tuple[np.ndarray, list[str]]:
    """The crop's calibrated mask → the boxed object's mask: components that overlap the box,
    then (``refine``) GrabCut, which may relabel everything when the mask crosses the box."""
    runs_out = crossing_share(mask, box) > crossing
    mask = keep_box_components(mask, box, spill=spill, min_inside=min_inside)
    if not refine:
        return mask, []
    from cutout.workers.refine import refine_with_grabcut

    refined, skipped = refine_with_grabcut(crop_rgb, mask, sure_foreground=not runs_out)
    notes = [skipped] if skipped else []
    if runs_out:
        notes.append("box-crossed: the mask ran out of the box; GrabCut relabelled its inside")
    return refined, notes


def neighbour_parts(mask: np.ndarray, inner: Region, *, min_inside: float = MIN_PART_INSIDE) -> np.ndarray | None:
    """The pixels (bool, the crop's shape) nearest to a part of the mask (>= 0.5, parts joined
    by a neck narrower than ``quality.NECK`` counted apart) that has less than ``min_inside`` of
    its area inside the box; None when no part does. The part with the most area inside the box
    always stays. Measured on a copy at most ``quality.SIGNAL_SIDE`` long, as the other part rules."""
    import cv2

    from cutout.workers.objects import nearest_part
    from cutout.workers.quality import KEPT_ALPHA, NECK, kept_parts, small_copy

    height, width = mask.shape
    small = small_copy(mask)
    parts, count = kept_parts(small >= KEPT_ALPHA, NECK)
    if count < 2:
        return None
    sy, sx = small.shape[0] / height, small.shape[1] / width
    rows = slice(int(inner.y0 * sy), max(int(inner.y0 * sy) + 1, round(inner.y1 * sy)))
    cols = slice(int(inner.x0 * sx), max(int(inner.x0 * sx) + 1, round(inner.x1 * sx)))
    areas = np.bincount(parts.ravel(), minlength=count + 1)[1:].astype(np.float64)
    inside = np.bincount(parts[rows, cols].ravel(), minlength=count + 1)[1:].astype(np.float64)
    dropped = inside < min_inside * np.maximum(areas, 1.0)
    dropped[int(np.argmax(inside))] = False
    if not dropped.any():
        return None
    owned = np.concatenate([[False], dropped])[nearest_part(parts)]
    if owned.shape != mask.shape:
        owned = cv2.resize(owned.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    return owned


def box_region(hint, width: int, height: int) -> Region:
    """A ``cutout.jobs.boxes.BoxHint`` (or an ``(x, y, w, h)`` tuple) in pixels of this image;
    ``InvalidBoxError`` when it names none of them."""
    from cutout.jobs.boxes import BoxHint

    if not isinstance(hint, BoxHint):
        hint = BoxHint(tuple(float(v) for v in hint), "xywh")
    return Region(*hint.to_pixels(width, height))


def box_mask(pipeline, crop_rgb: np.ndarray, inner: Region, *, from_box: bool = False) -> np.ndarray:
    """The calibrated soft mask of a crop; GrabCut started from the box itself for the classical
    ``grabcut`` model (its usual start, the image minus a margin, would ignore the hint) or
    when asked (``from_box``: the network missed the boxed object)."""
    if from_box or pipeline.options.model == "grabcut":
        from cutout.workers.models.classical import grabcut_mask

        size = {"work_size": FALLBACK_SIDE} if from_box else {}  # the fallback, not the model
        return grabcut_mask(crop_rgb, rect=(inner.x0, inner.y0, inner.x1, inner.y1), **size)
    return pipeline.calibrate(pipeline.segment_raw([crop_rgb])[0])


def box_fill(mask: np.ndarray, inner: Region) -> float:
    """The share of the box a soft mask covers (>= 0.5)."""
    return float((mask[inner.slices()] >= 0.5).mean()) if inner.width and inner.height else 0.0


def cut_out_box(pipeline, rgb: np.ndarray, box: Region, *, input_alpha: np.ndarray | None = None,
                crop_output: bool = False, margin: float = BOX_MARGIN):
    """The object in ``box``: segmented, refined and matted on the box's crop, kept inside the
    box (the module docstring's steps); a ``CutoutResult`` at the input's size (alpha zero
    outside the box), or of the crop alone with ``crop_output`` (object banks). When the
    network's mask covers less than ``MIN_FILL`` of the box, it missed the object (kept the
    pot and dropped the bush): GrabCut from the box is cut out instead."""
    from cutout.workers.stages import run_stage

    height, width = rgb.shape[:2]
    crop = box.grown(margin, width, height)
    inner = box.shifted(crop)
    crop_rgb = np.ascontiguousarray(rgb[crop.slices()])
    timings: dict[str, float] = {}
    mask = run_stage(timings, "segment", box_mask, pipeline, crop_rgb, inner)
    notes = []
    fill = box_fill(mask, inner)
    if fill < MIN_FILL and _runs_a_network(pipeline):
        mask = run_stage(timings, "segment", box_mask, pipeline, crop_rgb, inner, from_box=True)
        notes.append(f"box-underfilled: the network's mask covered {fill:.0%} of the box; "
                     f"GrabCut from the box used instead")
    crop_alpha = None if input_alpha is None else input_alpha[crop.slices()]
    result = finish_box(pipeline, crop_rgb, inner, mask, crop_alpha, crop_output=crop_output)
    result.timings = {**timings, **result.timings}
    result.notes = notes + result.notes
    if crop_output:
        return result
    return run_stage(result.timings, "composite", _place, pipeline, rgb, crop, result)


def _runs_a_network(pipeline) -> bool:
    """Whether the pipeline's mask comes from a network (a classical model has no GrabCut
    fallback to take: ``grabcut`` already starts from the box, ``threshold`` was asked for)."""
    from cutout.workers.models.registry import get_model_spec

    return get_model_spec(pipeline.options.model).family != "classical"


def finish_box(pipeline, crop_rgb: np.ndarray, inner: Region, mask: np.ndarray,
               crop_alpha: np.ndarray | None, *, crop_output: bool):
    """The crop's ``CutoutResult`` from its calibrated mask: refinement (knowing the box where
    the mask runs out of it), trimap and matting, alpha zero outside the box and on the parts
    of a neighbour reaching into it."""
    from cutout.workers.stages import run_stage

    timings: dict[str, float] = {}
    refine = pipeline.refine_method == "grabcut"
    if refine and crossing_share(mask, inner) > CROSSING:
        mask, notes = run_stage(timings, "refine", select_and_refine, crop_rgb, mask, inner, refine=True)
        refine = False  # done, knowing the box
    else:
        notes = []
    inside = np.zeros(mask.shape, np.uint8)
    inside[inner.slices()] = 255  # alpha zero outside the box, applied before compositing
    limit = inside if crop_alpha is None else (inside.astype(np.uint16) * crop_alpha // 255).astype(np.uint8)
    finisher = _finisher(pipeline, transparent=not crop_output, refine=refine)
    result = finisher.finish(crop_rgb, mask, input_alpha=limit)
    neighbours = run_stage(timings, "objects", neighbour_parts, result.mask, inner)
    if neighbours is not None:  # rare: finished again (the same refinement) with the part left out
        limit = np.where(neighbours, 0, limit).astype(np.uint8)
        first = result.timings
        result = finisher.finish(crop_rgb, mask, input_alpha=limit)
        result.timings = {stage: first.get(stage, 0.0) + seconds for stage, seconds in result.timings.items()}
        notes.append("box-neighbour: dropped a part of the cutout lying mostly outside the box")
    if crop_alpha is None:  # the box's limit is not the input's own alpha
        result.notes = [note for note in result.notes if note != "input-alpha-applied"]
    result.timings = {**timings, **result.timings}
    result.notes = notes + result.notes
    return result


def _place(pipeline, rgb: np.ndarray, crop: Region, result):
    """The crop's result put back at the input's size: alpha zero outside the crop, the
    estimated foreground colours inside it, composited onto the pipeline's background."""
    from cutout.workers.composite import composite
    from cutout.workers.pipeline import CutoutResult

    height, width = rgb.shape[:2]
    inside = crop.slices()
    alpha = np.zeros((height, width), np.float32)
    alpha[inside] = result.alpha
    mask = np.zeros((height, width), np.float32)
    mask[inside] = result.mask
    trimap = None
    if result.trimap is not None:
        trimap = np.zeros((height, width), np.uint8)
        trimap[inside] = result.trimap
    if pipeline.background.kind == "transparent":
        image = np.zeros((height, width, 4), np.uint8)
        image[inside] = result.image
    else:
        foreground = rgb.astype(np.float32) / 255.0
        foreground[inside] = result.image[..., :3].astype(np.float32) / 255.0
        image = composite(rgb, alpha, pipeline.background, foreground=foreground,
                          background_image=pipeline._background_array())
    return CutoutResult(image, alpha, mask, trimap, result.notes, result.timings, result.quality,
                        result.flags)


_TWINS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _finisher(pipeline, *, transparent: bool, refine: bool):
    """The pipeline's twin that finishes a box's crop: refinement as the pipeline's, or none
    where ``select_and_refine`` did it knowing the box, and, for a full-size output, a
    transparent background, so its RGBA carries the crop's estimated foreground colours for
    ``_place`` to composite."""
    twins = _TWINS.setdefault(pipeline, {})
    if (transparent, refine) not in twins:
        from cutout.workers.pipeline import Pipeline

        update = {"objects": "all",  # the box names the object: its components were chosen
                  **({} if refine else {"refine": "none"}),
                  **({"background": "transparent"} if transparent else {})}
        twins[transparent, refine] = Pipeline(pipeline.options.model_copy(update=update), device=pipeline.device)
    return twins[transparent, refine]


def load_eval_boxes(path) -> dict[str, tuple[float, float, float, float]]:
    """Boxes for ``cutout eval --boxes``, by file stem, as ``(x, y, w, h)`` pixels: a folder of
    box masks (GrabCut's ``rect/``: the box is the bounding box of the pixels >= 128, so its
    0/64 outside and 128 inside work, as does a plain 0/255 box), or a ``.json`` object
    ``{"stem": [x, y, w, h], ...}``."""
    import json
    from pathlib import Path

    from PIL import Image

    from cutout.jobs.errors import ConfigError

    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return {str(k): tuple(float(v) for v in box) for k, box in json.loads(path.read_text()).items()}
    if not path.is_dir():
        raise ConfigError(f"--boxes {str(path)!r}: expected a folder of box masks or a .json file")
    boxes = {}
    for mask_path in sorted(path.iterdir()):
        if mask_path.suffix.lower() not in (".png", ".bmp", ".tif", ".tiff"):
            continue
        with Image.open(mask_path) as image:
            rows, cols = np.nonzero(np.asarray(image.convert("L")) >= 128)
        if rows.size:
            x0, y0 = int(cols.min()), int(rows.min())
            boxes[mask_path.stem] = (x0, y0, int(cols.max()) + 1 - x0, int(rows.max()) + 1 - y0)
    return boxes

