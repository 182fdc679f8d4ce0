"""Box hints: which object of an image to cut out, as detection datasets give it.

A list file row (or a COCO annotation) may carry a box; each box becomes its own input with
its own record and output (``photo.box-0.png``, ``photo.box-1.png``, or ``photo.<id>.png``
from the row's ``id``). This module is the contract half: parsing and checking box values
(no image needed), the formats, and the fields a box item carries in its shard row. The
workers turn a box into pixels once the image's size is known (``BoxHint.to_pixels``), where
an empty, inverted or off-image box becomes that object's ``InvalidBoxError``.

Formats (``--box-format``): ``xywh`` (the default: pixels, COCO's convention), ``xyxy``
(pixel corners), ``xywhn`` / ``xyxyn`` (the same as fractions 0..1 of the image's width and
height, as YOLO-style exports give them).
"""
from __future__ import annotations

import hashlib
import json
import math
import posixpath
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

from cutout.jobs.errors import ConfigError, InvalidBoxError

BoxFormat = Literal["xywh", "xyxy", "xywhn", "xyxyn"]
BOX_FORMATS: tuple[str, ...] = ("xywh", "xyxy", "xywhn", "xyxyn")
DEFAULT_BOX_COLUMN = "bbox"
# Keys a box item adds to its row's extra columns (and so to its manifest row).
BOX_KEY, FORMAT_KEY, INDEX_KEY, IMAGE_KEY = "box", "box_format", "box_index", "image_uri"


@dataclass(frozen=True)
class BoxHint:
    """Four numbers in ``format``; turned into pixels against an image's size."""

    values: tuple[float, float, float, float]
    format: str = "xywh"

    def to_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` half-open pixel corners clipped to the image; ``InvalidBoxError``
        when the box is empty, inverted or wholly outside the image."""
        a, b, c, d = self.values
        if self.format.endswith("n"):
            a, c = a * width, c * width
            b, d = b * height, d * height
        x0, y0, x1, y1 = (a, b, a + c, b + d) if self.format.startswith("xywh") else (a, b, c, d)
        if x1 < x0 or y1 < y0:
            raise InvalidBoxError(f"box {self.describe()} is inverted (its end lies before its start)")
        left, top = max(0, math.floor(x0)), max(0, math.floor(y0))
        right, bottom = min(width, math.ceil(x1)), min(height, math.ceil(y1))
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise InvalidBoxError(f"box {self.describe()} is empty (under one pixel wide or high)")
        if right - left < 1 or bottom - top < 1:
            raise InvalidBoxError(f"box {self.describe()} lies outside the {width}x{height} image")
        return left, top, right, bottom

    def describe(self) -> str:
        return f"{self.format} [{', '.join(f'{v:g}' for v in self.values)}]"


def check_format(box_format: str) -> str:
    if box_format not in BOX_FORMATS:
        raise ConfigError(f"box format {box_format!r}: use {', '.join(BOX_FORMATS)}")
    return box_format


def parse_box(value, box_format: str = "xywh") -> BoxHint:
    """One box from a CSV cell (``"12,30,200,180"``, spaces or brackets allowed) or a list of
    four numbers; ``ConfigError`` when it is not four finite numbers fitting ``box_format``."""
    check_format(box_format)
    numbers = _four_numbers(value)
    if box_format.endswith("n") and not all(-1e-6 <= v <= 1 + 1e-6 for v in numbers):
        raise ConfigError(f"box {value!r}: format {box_format} takes fractions 0..1 of the image; "
                          "for pixels use xywh or xyxy")
    return BoxHint(numbers, box_format)


def parse_boxes(value, box_format: str = "xywh") -> list[BoxHint]:
    """A cell's boxes: one box, or a list of boxes (JSON ``[[x,y,w,h], ...]``) for one image."""
    if isinstance(value, str) and value.strip().startswith("[["):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"box {value!r}: not a JSON list of boxes ({exc})") from None
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
        return [parse_box(v, box_format) for v in value]
    return [parse_box(value, box_format)]


def _four_numbers(value) -> tuple[float, float, float, float]:
    if isinstance(value, str):
        parts = [p for p in value.strip().strip("[]()").replace(";", ",").replace(" ", ",").split(",") if p]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise ConfigError(f"box {value!r}: expected four numbers such as \"12,30,200,180\"")
    try:
        numbers = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"box {value!r}: expected four numbers such as \"12,30,200,180\"") from None
    if len(numbers) != 4 or not all(math.isfinite(n) for n in numbers):
        raise ConfigError(f"box {value!r}: expected four finite numbers, got {len(numbers)}")
    return numbers  # type: ignore[return-value]


def box_of(extra: dict | None) -> BoxHint | None:
    """The box a shard item carries (None for an ordinary whole-image input)."""
    if not extra or BOX_KEY not in extra:
        return None
    return BoxHint(tuple(float(v) for v in extra[BOX_KEY]), extra.get(FORMAT_KEY, "xywh"))


def image_uri_of(uri: str, extra: dict | None) -> str:
    """Where a box item's image is read from (its own ``uri`` names the object, not the file)."""
    return extra.get(IMAGE_KEY, uri) if extra else uri


class BoxExpander:
    """Turns list-file rows with a box column into one item per box.

    ``expand(uri, rel_key, extra)`` yields ``(object_uri, rel_key, extra)`` triples: the object
    URI is ``<image uri>#box-<i>`` (or ``#<id>`` from the row's ``id``), unique per object, so
    each gets its own record; ``i`` counts an image's boxes in list order (kept per image as an
    8-byte digest, like output keys). A row without a box value stays a whole-image input.
    """

    def __init__(self, column: str = DEFAULT_BOX_COLUMN, box_format: str = "xywh",
                 id_column: str = "id", *, images: str | None = None, classes: tuple[str, ...] = ()):
        self.column = column
        self.box_format = check_format(box_format)
        self.id_column = id_column
        self.images = images  # COCO sources (cutout.jobs.coco): where file_name is found
        self.classes = tuple(classes)  # COCO sources: the categories to keep (all when empty)
        self._counts: dict[bytes, int] = {}

    def expand(self, uri: str, rel_key: str, extra: dict | None,
               where: str = "") -> Iterator[tuple[str, str, dict | None]]:
        value = (extra or {}).get(self.column)
        if value is None or value == "" or value == []:
            yield uri, rel_key, extra
            return
        try:
            boxes = parse_boxes(value, self.box_format)
        except ConfigError as exc:
            raise ConfigError(f"{where}{exc}") from None
        rest = {k: v for k, v in extra.items() if k != self.column}
        for box in boxes:
            index = self._next_index(uri)
            ident = rest.get(self.id_column)
            name = f"box-{index}" if ident in (None, "") or len(boxes) > 1 else _safe_id(ident)
            yield (f"{uri}#{name}", box_rel_key(rel_key, name),
                   {**rest, BOX_KEY: list(box.values), FORMAT_KEY: box.format, INDEX_KEY: index,
                    IMAGE_KEY: uri})

    def _next_index(self, uri: str) -> int:
        digest = hashlib.blake2b(uri.encode(), digest_size=8).digest()
        index = self._counts.get(digest, 0)
        self._counts[digest] = index + 1
        return index


def box_rel_key(rel_key: str, name: str) -> str:
    """``photos/a.jpg`` + ``box-1`` → ``photos/a.box-1.jpg`` (the output swaps the extension)."""
    stem, ext = posixpath.splitext(rel_key)
    return f"{stem}.{name}{ext}"


def _safe_id(ident) -> str:
    text = str(ident).strip().replace("/", "_").replace("\\", "_")
    return text if text not in ("", ".", "..") else "id"


def expand_rows(rows: Iterable[tuple[str, str, dict | None]], expander: BoxExpander | None):
    """Every row through ``expander`` (None: rows pass unchanged)."""
    for uri, rel_key, extra in rows:
        if expander is None:
            yield uri, rel_key, extra
        else:
            yield from expander.expand(uri, rel_key, extra)


def box_expander(spec) -> BoxExpander:
    """The expander a job's spec asks for (its box column and format)."""
    return BoxExpander(spec.box_column, spec.box_format, images=spec.images,
                       classes=spec.annotation_classes)


def add_box_arguments(parser) -> None:
    """``--box-column``, ``--box-format`` and ``--images`` for ``run`` and ``submit`` (``--crop``
    is a pipeline option: it changes the output's pixels)."""
    group = parser.add_argument_group("box hints (list files with a box column, COCO annotations)")
    group.add_argument("--box-column", default=DEFAULT_BOX_COLUMN,
                       help="list-file column holding each object's box (default bbox): a CSV cell "
                            "\"x,y,w,h\" or a JSON/Parquet list of 4 numbers (or a list of boxes)")
    group.add_argument("--box-format", default="xywh", choices=BOX_FORMATS,
                       help="xywh (default: pixels, COCO), xyxy, or 0-1 normalised xywhn / xyxyn")
    group.add_argument("--images", metavar="PREFIX",
                       help="where a COCO annotation file's images live (folder or s3:// prefix)")


def box_spec_fields(args) -> dict:
    """The job-spec fields the box flags set."""
    return {"box_column": args.box_column, "box_format": args.box_format, "images": args.images,
            "annotation_classes": annotation_classes(args)}


def annotation_classes(args) -> tuple[str, ...]:
    """With a COCO source, ``--classes`` picks the annotations to cut out (and is not a
    setting of the segmenter: a salient network takes no classes)."""
    from cutout.jobs.coco import is_coco_file

    sources = getattr(args, "sources", None) or getattr(args, "inputs", None) or []
    if not any(is_coco_file(source) for source in sources):
        return ()
    chosen = getattr(args, "_annotation_classes", None)
    if chosen is None:
        chosen = tuple(c.strip().lower() for c in (args.classes or "").split(",") if c.strip())
        args._annotation_classes, args.classes = chosen, None
    return chosen
