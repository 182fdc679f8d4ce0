"""COCO-style annotation files as a source: one input per annotated object.

``cutout submit instances.json --images s3://bucket/images/ --to s3://out/`` reads the file's
``images`` (``id``, ``file_name``), ``annotations`` (``image_id``, ``bbox`` as COCO's pixel
``[x, y, w, h]``, ``category_id``, ``id``) and ``categories`` (``id``, ``name``), and yields
one item per annotation: it reads ``<images>/<file_name>``, is named ``<file_name stem>.<id>``
and carries its box, category name, annotation and image ids to its manifest row. Items come
grouped by image (in the file's image order), each image's objects in the file's annotation
order, so an image is read once for all its objects. ``--classes cup,spoon`` keeps only those
categories; ``iscrowd`` regions (not one object) are left out.

Why streamed: a COCO file is one JSON document, and loading it whole takes about 2 GB for
train2017 (860k objects) and cannot be done at 10^7-10^8 objects. It is parsed with ijson (C
backend), reading the source (a local file, or an S3/HTTP object streamed, never held whole)
three times: ``categories``, then ``images``, then ``annotations`` (keys come in any order; a
pull parser per list is three times faster than one read pushed to several parsers).

Grouping without holding the annotations (an external sort): each object becomes a record keyed
by (image order, annotation order); ``RUN_RECORDS`` objects at most are sorted in memory (flat
buffers, about 120 bytes per object: 60 MB), more spill sorted runs to a private temp folder
(about 50 bytes per object), merged ``MERGE_FAN_IN`` runs at a time (``heapq.merge``,
``READ_RECORDS`` records read ahead per run: 5 MB for all 64).

What stays in memory for the whole read: the categories (a few hundred names) and the image
table: each image's id as a 64-bit key (an integer id as itself, any other id a 64-bit digest),
sorted, with its place in the file and its count of objects so far: 24 bytes per image
(10^7 images: 0.24 GB; ``benchmarks/bench_coco.py`` measures the whole). Image file names go to
the temp folder in file order and are read back in that order.
"""
from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import marshal
import os
import posixpath
import shutil
import tempfile
from array import array
from typing import Iterable, Iterator

import ijson
import numpy as np

from cutout.jobs import storage
from cutout.jobs.boxes import BOX_KEY, FORMAT_KEY, IMAGE_KEY, INDEX_KEY, box_rel_key, parse_box
from cutout.jobs.errors import ConfigError, NotFoundError

RUN_RECORDS = 500_000  # objects sorted in memory at once (about 60 MB)
MERGE_FAN_IN = 64  # runs merged at once; more runs are first merged into longer runs
READ_RECORDS = 256  # records per chunk written, so read ahead per run while merging: a record is about
# 0.3 KB as Python objects, so 64 runs hold 5 MB (2,048 held 40 MB; at 10^7's 20 runs, the file's peak)
CHUNK_BYTES = 1 << 16  # bytes parsed at a time (the objects of one chunk are built at once: 1 MiB took 8 MB)
WHAT = "annotation file"


def is_coco_file(source: str) -> bool:
    """A ``.json`` source is COCO annotations, except an S3 Inventory ``manifest.json``
    (``cutout.jobs.sources`` asks that first)."""
    return source.lower().endswith(".json")


def iter_coco_items(source: str, images: str | None, classes: tuple[str, ...] = ()):
    """``(object uri, rel key, extra)`` per kept annotation; ``ConfigError`` for a file that
    is not COCO, a missing ``--images`` or a class the file does not name."""
    if not images:
        raise ConfigError(f"COCO annotations {source!r} need --images PREFIX (where file_name is found)")
    folder = tempfile.mkdtemp(prefix="cutout-coco-")
    try:
        categories = _read_categories(source)
        wanted = {c.lower() for c in classes}
        unknown = wanted - {name.lower() for name in categories.values()}
        if unknown:
            _check_shape(source)  # a file that is not COCO says so first
            raise ConfigError(f"{source}: no category named {', '.join(sorted(unknown))} "
                              f"(it has {len(categories)}, e.g. {', '.join(list(categories.values())[:5])})")
        table = _read_images(source, folder)
        records = _sorted_records(source, table, categories, wanted, folder)
        yield from _items(records, _image_names(folder), images, categories)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- passes 1 and 2: categories and images --------------------------------------------------------------
class ImageTable:
    """Image id → the image's places in the file (an id listed twice has two), and each
    place's count of objects so far (an object's ``box_index``): numpy arrays, no dict."""

    def __init__(self, keys: array):
        ids = np.frombuffer(keys, dtype=np.int64) if len(keys) else np.zeros(0, np.int64)
        self.order = np.argsort(ids, kind="stable")
        self.keys = ids[self.order]
        self.counts = np.zeros(len(ids), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def places(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(row, place)`` pairs: for each of ``keys`` (by its row), every image place with
        that id; rows of ids with no image are absent."""
        low = np.searchsorted(self.keys, keys, side="left")
        high = np.searchsorted(self.keys, keys, side="right")
        many = high - low
        rows = np.repeat(np.arange(len(keys)), many)
        offsets = np.arange(len(rows)) - np.repeat(np.cumsum(many) - many, many)
        return rows, self.order[np.repeat(low, many) + offsets]


def image_key(image_id) -> int:
    """An image id as a signed 64-bit key: an integer id is itself; any other id (a string)
    a 64-bit digest of its type and value (two ids share one with odds of about n²/2^65)."""
    if type(image_id) is int and -(1 << 63) <= image_id < (1 << 63):
        return image_id
    text = f"{type(image_id).__name__}:{image_id!r}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)


def _read_categories(source: str) -> dict:
    """Pass 1: category id → name."""
    return dict(_category(c) for c in _parsed(source, "categories.item"))


def _read_images(source: str, folder: str) -> ImageTable:
    """Pass 2: the image table; each image's ``(id, file_name)`` goes to ``folder/images`` in
    file order, ``READ_RECORDS`` at a time."""
    keys = array("q")
    with open(os.path.join(folder, "images"), "wb") as names:
        for batch in _batches(_parsed(source, "images.item"), READ_RECORDS):
            fields = [_image_fields(source, image, len(keys) + n) for n, image in enumerate(batch)]
            keys.extend(image_key(image_id) for image_id, _ in fields)
            marshal.dump(fields, names)
    if not keys:
        _check_shape(source)
    return ImageTable(keys)


def _image_fields(source: str, image, place: int) -> tuple:
    try:
        return image["id"], str(image["file_name"])
    except (KeyError, TypeError):
        raise ConfigError(f"{source}: image {place} (from 0) lacks 'id' or 'file_name'") from None


def _category(category) -> tuple:
    return category["id"], str(category["name"])


def _image_names(folder: str) -> Iterator[tuple]:
    """``(image id, file_name)`` in the file's image order, read back from pass 1's file."""
    with open(os.path.join(folder, "images"), "rb") as names:
        while True:
            try:
                yield from marshal.load(names)
            except EOFError:
                return


# --- pass 3: annotations, sorted by (image order, annotation order) -----------------------------
def _sorted_records(source: str, table: ImageTable, categories: dict, wanted: set[str],
                    folder: str) -> Iterator[tuple]:
    """Every kept annotation as ``(place, seq, box_index, id, category_id, box)``, sorted by
    image place then file order; memory holds at most one run (``RUN_RECORDS`` objects)."""
    runs, seq, batch = [], 0, _Batch()
    for key, fields in _objects(source, _parsed(source, "annotations.item"), categories, wanted):
        batch.add(key, fields)
        if len(batch) == RUN_RECORDS:
            runs.append(_write_run(folder, len(runs), _run(source, batch, seq, table)))
            seq, batch = seq + RUN_RECORDS, _Batch()
    if len(batch):
        runs.append(_write_run(folder, len(runs), _run(source, batch, seq, table)))
    elif not runs:
        _check_shape(source)
    return _merge(folder, runs)


def _objects(source: str, annotations: Iterator, categories: dict,
             wanted: set[str]) -> Iterator[tuple[int, tuple | None]]:
    """Each annotation that is one object (not ``iscrowd``), as it is parsed: its image key and
    ``(id, category_id, has bbox, bbox)``, or None for one ``--classes`` does not keep (it
    still counts toward its image's ``box_index``)."""
    for annotation in annotations:
        if not isinstance(annotation, dict) or "image_id" not in annotation:
            where = annotation.get("id") if isinstance(annotation, dict) else annotation
            raise ConfigError(f"{source}: annotation {where}: no image_id")
        if annotation.get("iscrowd"):
            continue
        category_id = annotation.get("category_id")
        kept = not wanted or categories.get(category_id, "").lower() in wanted
        fields = (annotation.get("id"), category_id, "bbox" in annotation, annotation.get("bbox"))
        yield image_key(annotation["image_id"]), fields if kept else None


class _Batch:
    """One run's objects in flat buffers (image keys; fields marshalled end to end), not a
    Python object each: small objects kept while the parser's dicts come and go would pin the
    allocator's pages (measured: 1.1 KB of RSS per kept tuple against 0.1 KB here)."""

    def __init__(self):
        self.keys, self.ends, self.blob = array("q"), array("q"), bytearray()

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: int, fields: tuple | None) -> None:
        self.keys.append(key)
        if fields is not None:
            self.blob += marshal.dumps(fields)
        self.ends.append(len(self.blob))

    def fields(self, row: int) -> tuple | None:
        start, end = self.ends[row - 1] if row else 0, self.ends[row]
        return marshal.loads(self.blob[start:end]) if end > start else None


def _run(source: str, batch: _Batch, seq0: int, table: ImageTable) -> Iterator[tuple]:
    """One batch of objects (file order, the first one the file's ``seq0``-th) as records
    sorted by (place, seq); objects of images not in the file are dropped, those not kept
    after counting toward ``box_index``; a kept object's box is checked here."""
    rows, places = table.places(np.frombuffer(batch.keys, dtype=np.int64))
    sort = np.argsort(places, kind="stable")  # by place, then file order (rows ascend)
    rows, places = rows[sort], places[sort]
    starts = np.flatnonzero(np.r_[True, places[1:] != places[:-1]]) if len(places) else places
    sizes = np.diff(np.r_[starts, len(places)])
    indexes = table.counts[places] + np.arange(len(places)) - np.repeat(starts, sizes)
    table.counts[places[starts]] += sizes
    for start in range(0, len(rows), READ_RECORDS):  # as Python ints a slice at a time
        part = slice(start, start + READ_RECORDS)
        for row, place, index in zip(rows[part].tolist(), places[part].tolist(), indexes[part].tolist()):
            fields = batch.fields(row)
            if fields is not None:
                annotation_id, category_id, has_box, bbox = fields
                yield (place, seq0 + row, index, annotation_id, category_id,
                       _box(source, annotation_id, bbox if has_box else _NO_BOX))


_NO_BOX = object()  # an annotation without "bbox" (an error only if it is kept)


def _box(source: str, annotation_id, bbox) -> tuple:
    try:
        if bbox is _NO_BOX:
            raise KeyError("bbox")
        return parse_box(bbox, "xywh").values
    except (ConfigError, KeyError) as exc:
        raise ConfigError(f"{source}: annotation {annotation_id}: {exc}") from None


def _write_run(folder: str, number: int, records: Iterable[tuple]) -> str:
    path = os.path.join(folder, f"run-{number}")
    with open(path, "wb") as handle:
        for chunk in _batches(records, READ_RECORDS):
            marshal.dump(chunk, handle)
    return path


def _read_run(path: str) -> Iterator[tuple]:
    with open(path, "rb") as handle:
        while True:
            try:
                chunk = marshal.load(handle)
            except EOFError:
                break
            yield from chunk
    os.remove(path)


def _merge(folder: str, runs: list[str]) -> Iterator[tuple]:
    """The runs as one sorted stream, ``MERGE_FAN_IN`` open at once (earlier groups are merged
    into longer runs first, so memory does not grow with the number of runs)."""
    runs, number = list(runs), len(runs)
    while len(runs) > MERGE_FAN_IN:
        group, runs = runs[:MERGE_FAN_IN], runs[MERGE_FAN_IN:]
        runs.append(_write_run(folder, number, heapq.merge(*map(_read_run, group))))
        number += 1
    return heapq.merge(*map(_read_run, runs))


# --- items --------------------------------------------------------------------------------------
def _items(records: Iterator[tuple], names: Iterator[tuple], images: str,
           categories: dict) -> Iterator[tuple]:
    """Records joined with their image's name (both come in image order)."""
    name_place, image = -1, None
    for place, _, index, annotation_id, category_id, box in records:
        while name_place < place:
            image, name_place = next(names), name_place + 1
        image_id, file_name = image
        uri = storage.join_uri(images, file_name)
        name = str(annotation_id if annotation_id is not None else f"box-{index}")
        extra = {BOX_KEY: list(box), FORMAT_KEY: "xywh", INDEX_KEY: index, IMAGE_KEY: uri,
                 "label": categories.get(category_id, ""), "category_id": category_id,
                 "annotation_id": annotation_id, "image_id": image_id}
        yield f"{uri}#{name}", box_rel_key(posixpath.normpath(file_name).lstrip("/"), name), extra


# --- reading the source -------------------------------------------------------------------------
@contextlib.contextmanager
def _reading(source: str) -> Iterator[storage.StreamReader]:
    try:
        with storage.open_stream(source) as stream:
            yield stream
    except NotFoundError as exc:  # only opening raises it
        raise ConfigError(f"{WHAT} {source!r} does not exist") from exc


def _parsed(source: str, prefix: str) -> Iterator:
    """The values at ``prefix`` (``"images.item"``: each image), one read of the source.
    (ijson's pull parser on a file-like keeps the whole pipeline in C: three times faster than
    pushing chunks to its coroutines, so each list gets its own read.)"""
    with _reading(source) as stream:
        try:
            yield from ijson.items(stream, prefix, buf_size=CHUNK_BYTES, use_float=True)
        except ijson.JSONError as exc:
            raise _not_json(source, exc) from None


def _not_json(source: str, exc: Exception) -> ConfigError:
    """yajl's message is several lines (the text, a pointer): its first line is enough."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ConfigError(f"{WHAT} {source}: not JSON ({first})")


def _check_shape(source: str) -> None:
    """A file without images or annotations: is it COCO at all? (One more pass, of events,
    only for a file whose images or annotations came out empty.)"""
    keys, top = set(), None
    with _reading(source) as stream:
        events = ijson.parse(stream, buf_size=CHUNK_BYTES)
        for prefix, event, value in events:
            if top is None:
                top = event
            if prefix == "" and event == "map_key":
                keys.add(value)
    if top != "start_map":
        raise ConfigError(f"{WHAT} {source}: expected a JSON object")
    if not {"images", "annotations"} <= keys:
        raise ConfigError(f"{source}: not a COCO annotation file (needs 'images' and 'annotations')")


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
