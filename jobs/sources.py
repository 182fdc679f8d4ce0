"""Turn the user's sources into a stream of inputs, each with a relative key for its output.

A source is one of:
  * a local folder (``photos/``): every image below it, recursively;
  * a glob (``photos/**/*.jpg``, also ``s3://bucket/photos/**/*.png``);
  * an S3 prefix (``s3://bucket/photos/``) or a single S3 object;
  * a list file, recognised by its extension: ``.txt`` (one URI per line, ``#`` comments),
    ``.csv`` (column ``uri`` or ``url``, else the first column), ``.jsonl`` (key ``uri`` or
    ``url``) or ``.parquet`` (column ``uri`` or ``url``, read in batches). Other columns of a
    ``.csv`` with a header, ``.jsonl`` object or ``.parquet`` travel with the item as ``extra``
    and end up in its manifest row (img2dataset's ``save_additional_columns``);
  * an S3 Inventory report: its ``manifest.json`` (``s3://inv/.../manifest.json``), CSV or
    Parquet (``cutout.jobs.inventory``);
  * a single URI or file (``https://host/a.jpg``, ``s3://b/k.png``, ``cat.jpg``).

Order is deterministic (sorted walks, S3's lexicographic listing, list-file order), so the
same sources always give the same shards. Everything streams: a million-line list file
never sits in memory. Hidden files (``.name``) are skipped in folder walks, and only image
extensions are kept unless ``all_files=True``.

Relative keys (where an output lands below the destination):
  * folder / prefix / glob: the path below the folder, prefix or the glob's literal part;
  * listed or single ``s3://b/k``: ``b/k``; ``http(s)://host/p``: ``host/p`` (a query string
    adds a short hash to the name so ``?id=1`` and ``?id=2`` stay apart);
  * listed local paths: relative to the list file's folder when below it (relative entries
    are resolved against that folder), else the absolute path without its leading ``/``;
  * a single local file given directly: its file name.
"""
from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
import os
import posixpath
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from cutout.jobs import storage
from cutout.jobs.boxes import BoxExpander
from cutout.jobs.coco import is_coco_file, iter_coco_items
from cutout.jobs.errors import ConfigError, NotFoundError
from cutout.jobs.inventory import is_inventory_manifest, iter_inventory

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
LIST_EXTENSIONS = frozenset({".txt", ".csv", ".jsonl", ".parquet"})
URI_COLUMNS = ("uri", "url")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class SourceItem:
    uri: str
    rel_key: str
    # Extra columns of the list-file row this input came from (None for every other source).
    extra: dict | None = field(default=None, compare=False, hash=False)


def iter_source_items(sources: Iterable[str], *, all_files: bool = False,
                      skips: storage.ListingSkips | None = None,
                      boxes: BoxExpander | None = None) -> Iterator[SourceItem]:
    """Every input of every source, in a stable order; ``ConfigError`` for a missing source.

    Folder entries that are not regular files (pipes, sockets, devices, broken links, symlink
    loops) are skipped with a warning and counted in ``skips``. A list-file row with a box
    column gives one input per box (``boxes``: which column, which format; default ``bbox``,
    ``xywh``; see ``cutout.jobs.boxes``).
    """
    skips = skips if skips is not None else storage.ListingSkips()
    boxes = boxes if boxes is not None else BoxExpander()
    for source in sources:
        if is_coco_file(source.strip()):
            for uri, rel_key, extra in iter_coco_items(source.strip(), boxes.images, boxes.classes):
                yield SourceItem(uri, rel_key, extra)
            continue
        for item in _iter_one(source.strip(), all_files, skips):
            yield from _with_boxes(item, boxes, source)


def _with_boxes(item: SourceItem, boxes: BoxExpander, source: str) -> Iterator[SourceItem]:
    """A listed item as is, or one item per box its row carries."""
    if not item.extra:
        yield item
        return
    for uri, rel_key, extra in boxes.expand(item.uri, item.rel_key, item.extra, where=f"{source}: "):
        yield SourceItem(uri, rel_key, extra)


def input_identity(uri: str) -> str:
    """The one name of an input: a local file is its absolute path, whether written as a path,
    a relative path or ``file://``; other URIs are themselves. Inputs are listed, recorded and
    looked up (``redo``/``retry-failed --input``) by this name."""
    if storage.scheme_of(uri) != "local":
        return uri
    return os.path.abspath(storage._local_path(uri))


def is_list_file(source: str) -> bool:
    path = urllib.parse.urlsplit(source).path if "://" in source else source
    return posixpath.splitext(path)[1].lower() in LIST_EXTENSIONS


def is_image_name(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _iter_one(source: str, all_files: bool, skips: storage.ListingSkips) -> Iterator[SourceItem]:
    if not source:
        raise ConfigError("empty source")
    kind = storage.scheme_of(source)
    if is_inventory_manifest(source):
        yield from _expect_some(source, _iter_inventory(source, all_files),
                              "(an S3 Inventory report) " + _nothing_matched(all_files))
    elif is_list_file(source):
        yield from _expect_some(source, _iter_list_file(source), "is an empty list file")
    elif kind == "http":
        yield SourceItem(source, rel_key_for_uri(source))
    elif _has_glob(source):
        found = _iter_glob(source, all_files, skips)
        yield from _expect_some(source, found, _nothing_matched(all_files))
    elif kind == "s3":
        yield from _iter_s3(source, all_files)
    else:
        yield from _iter_local(source, all_files, skips)


def _expect_some(source: str, items: Iterator[SourceItem], why: str) -> Iterator[SourceItem]:
    """Pass items through; a source that yields nothing is almost always a typo, so say so."""
    empty = True
    for item in items:
        empty = False
        yield item
    if empty:
        raise ConfigError(f"source {source!r} {why}")


def _nothing_matched(all_files: bool) -> str:
    if all_files:
        return "matched no files"
    return "matched no image files (" + " ".join(sorted(IMAGE_EXTENSIONS)) + "); use all_files to take every file"


def _has_glob(source: str) -> bool:
    return any(ch in _GLOB_CHARS for ch in source)


# --- local folders and files --------------------------------------------------------------------
def _iter_local(source: str, all_files: bool, skips: storage.ListingSkips) -> Iterator[SourceItem]:
    path = input_identity(source)
    if os.path.isdir(path):
        found = _iter_tree(path, path, all_files, None, skips)
        yield from _expect_some(source, found, _nothing_matched(all_files))
    elif os.path.isfile(path):
        yield SourceItem(path, os.path.basename(path))
    elif os.path.lexists(path):
        raise ConfigError(f"source {source!r} is not a regular file or folder (a pipe, socket, device or broken link)")
    else:
        raise ConfigError(f"source {source!r} does not exist (no such file or folder: {path})")


def _iter_tree(root: str, folder: str, all_files: bool, match, skips) -> Iterator[SourceItem]:
    for uri in storage.list_uris(folder, skips=skips):
        rel = os.path.relpath(uri, root).replace(os.sep, "/")
        if _keep(rel, all_files) and (match is None or match(rel)):
            yield SourceItem(uri, rel)


def _keep(rel: str, all_files: bool) -> bool:
    if any(part.startswith(".") for part in rel.split("/")):
        return False  # hidden files and folders, including our own in-flight temp files
    return all_files or is_image_name(rel)


# --- S3 prefixes and objects --------------------------------------------------------------------
def _iter_s3(source: str, all_files: bool) -> Iterator[SourceItem]:
    bucket, key = storage._split_s3(source)
    if key and not key.endswith("/"):
        try:
            if storage.exists(source):
                yield SourceItem(source, f"{bucket}/{key}")
                return
        except NotFoundError:
            pass  # a missing bucket: reported below as a missing source
        source, key = source + "/", key + "/"
    found = _iter_s3_prefix(source, bucket, key, all_files, match=None)
    yield from _expect_some(source, found, "has no objects (" + _nothing_matched(all_files) + ")")


def _iter_s3_prefix(prefix_uri: str, bucket: str, prefix: str, all_files: bool, match) -> Iterator[SourceItem]:
    start = len(f"s3://{bucket}/{prefix}")
    try:
        for uri in storage.list_tree(prefix_uri):
            rel = uri[start:]
            if _keep(rel, all_files) and (match is None or match(rel)):
                yield SourceItem(uri, rel)
    except NotFoundError as exc:
        raise ConfigError(f"source {prefix_uri!r}: {exc}") from exc


def _iter_inventory(source: str, all_files: bool) -> Iterator[SourceItem]:
    for uri, _bucket, key in iter_inventory(source):
        if _keep(key, all_files):
            yield SourceItem(uri, key)


# --- globs ------------------------------------------------------------------------------------
def _iter_glob(source: str, all_files: bool, skips: storage.ListingSkips) -> Iterator[SourceItem]:
    """Walk the glob's literal leading folder in sorted order and keep the paths that match.

    ``**`` matches any number of folders (including none); ``*``, ``?`` and ``[..]`` match
    within one path segment, as in ``glob.glob(recursive=True)``.
    """
    if storage.scheme_of(source) == "s3":
        bucket, key = storage._split_s3(source)
        literal, pattern = _split_glob(key)
        prefix = f"{literal}/" if literal else ""
        matcher = _segment_matcher(pattern)
        return _iter_s3_prefix(f"s3://{bucket}/{prefix}", bucket, prefix, all_files, matcher)
    path = storage._local_path(source)
    absolute = path.startswith("/")
    literal, pattern = _split_glob(path.lstrip("/") if absolute else path)
    root = os.path.abspath(("/" if absolute else "") + literal if literal or absolute else ".")
    return _iter_tree(root, root, all_files, _segment_matcher(pattern), skips)


def _split_glob(path: str) -> tuple[str, str]:
    parts = path.split("/")
    for index, part in enumerate(parts):
        if _has_glob(part):
            return "/".join(parts[:index]), "/".join(parts[index:])
    return "/".join(parts[:-1]), parts[-1]


def _segment_matcher(pattern: str):
    segments = [s for s in pattern.split("/") if s]

    def match(rel: str) -> bool:
        return _match_segments(segments, rel.split("/"))

    return match


def _match_segments(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    head = pattern[0]
    if head == "**":
        return any(_match_segments(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and _match_segments(pattern[1:], parts[1:])


# --- list files ---------------------------------------------------------------------------------
def _iter_list_file(source: str) -> Iterator[SourceItem]:
    ext = posixpath.splitext(urllib.parse.urlsplit(source).path if "://" in source else source)[1].lower()
    local, cleanup = _local_copy_of(source)
    try:
        base = os.path.dirname(os.path.abspath(local)) if storage.scheme_of(source) == "local" else None
        readers = {".txt": _uris_from_txt, ".csv": _uris_from_csv, ".jsonl": _uris_from_jsonl,
                   ".parquet": _uris_from_parquet}
        for uri, extra in readers[ext](local, source):
            item = _listed_item(uri, base)
            yield SourceItem(item.uri, item.rel_key, extra) if extra else item
    finally:
        if cleanup:
            os.remove(local)


def _local_copy_of(source: str) -> tuple[str, bool]:
    """A local path to read the list file from (remote list files are downloaded first)."""
    if storage.scheme_of(source) == "local":
        path = storage._local_path(source)
        if not os.path.isfile(path):
            raise ConfigError(f"list file {source!r} does not exist")
        return path, False
    try:
        data = storage.read_bytes(source)
    except NotFoundError as exc:
        raise ConfigError(f"list file {source!r} does not exist") from exc
    fd, path = tempfile.mkstemp(suffix=posixpath.splitext(source)[1])
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path, True


def _listed_item(uri: str, base: str | None) -> SourceItem:
    kind = storage.scheme_of(uri)
    if kind != "local":
        return SourceItem(uri, rel_key_for_uri(uri))
    path = storage._local_path(uri)
    if not os.path.isabs(path) and base is not None:
        path = os.path.join(base, path)
    path = os.path.normpath(os.path.abspath(path))
    if base is not None and (path + os.sep).startswith(base.rstrip(os.sep) + os.sep):
        rel = os.path.relpath(path, base)
    else:
        rel = path.lstrip("/")
    return SourceItem(path, rel.replace(os.sep, "/"))


def rel_key_for_uri(uri: str) -> str:
    """``s3://b/k`` → ``b/k``; ``https://host:8080/p/a.jpg?x=1`` → ``host_8080/p/a-<hash>.jpg``."""
    if storage.scheme_of(uri) == "s3":
        bucket, key = storage._split_s3(uri)
        return f"{bucket}/{key}"
    parts = urllib.parse.urlsplit(uri)
    host = (parts.hostname or "host") + (f"_{parts.port}" if parts.port else "")
    path = urllib.parse.unquote(parts.path) or "/index"
    if path.endswith("/"):
        path += "index"
    if parts.query:
        stem, ext = posixpath.splitext(path)
        path = f"{stem}-{hashlib.sha1(parts.query.encode()).hexdigest()[:8]}{ext}"
    return host + path


def _uris_from_txt(path: str, source: str) -> Iterator[tuple[str, dict | None]]:
    with open(path, encoding="utf-8-sig") as handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line, None


def _uris_from_csv(path: str, source: str) -> Iterator[tuple[str, dict | None]]:
    """Column ``uri``/``url`` when the header names one; otherwise the first column, and the
    first row counts as a header unless it already looks like a URI or an image path. With a
    header, the other columns come along as extras."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return
        names = [h.strip().lower() for h in header]
        column = next((names.index(c) for c in URI_COLUMNS if c in names), None)
        extras = [h.strip() for h in header]
        if column is None:
            column = 0
            first = header[0].strip() if header else ""
            if _looks_like_uri(first):
                extras = []  # no header: the columns have no names to carry
                yield first, None
        for row in reader:
            if len(row) > column and row[column].strip():
                extra = {name: value for i, (name, value) in enumerate(zip(extras, row))
                         if i != column and name}
                yield row[column].strip(), extra or None


def _looks_like_uri(text: str) -> bool:
    return "://" in text or text.startswith("/") or is_image_name(text)


def _uris_from_jsonl(path: str, source: str) -> Iterator[tuple[str, dict | None]]:
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{source} line {number}: not JSON ({exc})") from exc
            if isinstance(value, str):
                yield value, None
                continue
            key = next((c for c in URI_COLUMNS if isinstance(value, dict) and c in value), None)
            if key is None or not isinstance(value[key], str):
                raise ConfigError(f"{source} line {number}: expected an object with 'uri' or 'url'")
            yield value[key], {k: v for k, v in value.items() if k != key} or None


def _uris_from_parquet(path: str, source: str) -> Iterator[tuple[str, dict | None]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ConfigError("parquet list files need pyarrow: pip install 'cutout[parquet]'") from exc
    parquet = pq.ParquetFile(path)
    names = {name.lower(): name for name in parquet.schema_arrow.names}
    column = next((names[c] for c in URI_COLUMNS if c in names), None)
    if column is None:
        raise ConfigError(f"{source}: no 'uri' or 'url' column (columns: {', '.join(names.values())})")
    for batch in parquet.iter_batches(batch_size=65536):
        for row in batch.to_pylist():
            if row.get(column):
                yield row[column], {k: v for k, v in row.items() if k != column} or None


__all__ = ["SourceItem", "iter_source_items", "rel_key_for_uri", "is_list_file", "IMAGE_EXTENSIONS"]
