"""Group inputs into shards and give every input a deterministic, safe output key.

Output keys: ``DEST/<relative key with the new extension>``, e.g. ``photos/cat.jpg`` →
``DEST/photos/cat.png`` (``suffix`` goes before the extension: ``cat_cutout.png``).

Safety: a key can never leave DEST. Backslashes become ``/``; empty, ``.`` and ``..``
segments and leading ``/`` are dropped; control characters, an empty result or a key inside
our own ``_cutout/`` area raise ``UnsafeKeyError`` (``iter_shards`` then falls back to
``_unnamed/<hash of the URI>``, so one hopeless name never stops a job).

Collisions: two inputs that would share an output (``a.jpg`` and ``a.png`` → ``a.png``)
never overwrite each other. The first in source order gets the natural name; a later one
keeps its full source name before the new extension (``a.png.png``), then ``~2``, ``~3``...
Source order is deterministic, so the same sources always give the same keys. Detection
holds a 64-bit digest per output key (``cutout.jobs.digests``: 8 bytes per input, large runs on temp disk).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from cutout.jobs import storage
from cutout.jobs.digests import DigestSet, digest
from cutout.jobs.errors import StorageError, UnsafeKeyError
from cutout.jobs.layout import CONTROL_PREFIX, JobLayout
from cutout.jobs.sources import SourceItem

SHARD_ID_WIDTH = 6
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ShardItem:
    uri: str
    rel_key: str
    output_uri: str
    extra: dict | None = field(default=None, compare=False, hash=False)  # list-file columns


@dataclass
class Shard:
    shard_id: str
    items: list[ShardItem] = field(default_factory=list)


def shard_id_for(index: int) -> str:
    return f"s{index:0{SHARD_ID_WIDTH}d}"


def shard_index(shard_id: str) -> int:
    """Numeric order of shard ids (``s1000000`` sorts after ``s999999``)."""
    return int(shard_id[1:])


def safe_key(rel_key: str) -> str:
    """The relative key with every way out of the destination removed (see module docstring)."""
    if _CONTROL_CHARS.search(rel_key):
        raise UnsafeKeyError(f"key {rel_key!r} contains control characters")
    parts = [p for p in rel_key.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if not parts:
        raise UnsafeKeyError(f"key {rel_key!r} has no usable path segment")
    if parts[0] == CONTROL_PREFIX:
        raise UnsafeKeyError(f"key {rel_key!r} would land in the job's own {CONTROL_PREFIX}/ area")
    return "/".join(parts)


def output_key(rel_key: str, extension: str, suffix: str = "", *, keep_source_extension: bool = False) -> str:
    """Relative output key: ``a/b.jpg`` → ``a/b<suffix>.png``; ``keep_source_extension`` → ``a/b.jpg<suffix>.png``."""
    key = safe_key(rel_key)
    ext = extension if extension.startswith(".") or not extension else "." + extension
    folder, _, name = key.rpartition("/")  # str methods: this runs once per input at submit
    stem = name if keep_source_extension else posixpath.splitext(name)[0] or name
    if "/" in suffix or "\\" in suffix or ".." in suffix:
        raise UnsafeKeyError(f"suffix {suffix!r} must not contain path separators or '..'")
    return f"{folder}/{stem}{suffix}{ext}" if folder else f"{stem}{suffix}{ext}"


def output_uri(destination: str, rel_key: str, extension: str, suffix: str = "") -> str:
    """Where the output of the input with ``rel_key`` goes (always below ``destination``)."""
    return storage.join_uri(destination, output_key(rel_key, extension, suffix))


def with_extension(uri: str, extension: str) -> str:
    """Swap the last extension of an already-computed output URI (keeps collision renames)."""
    ext = extension if extension.startswith(".") else "." + extension
    folder, name = posixpath.split(uri)
    return posixpath.join(folder, posixpath.splitext(name)[0] + ext)


# Default shard size by position in the job: the shard that starts after ``n`` inputs holds
# the size of the last threshold ``n`` has passed. A small job keeps short shards (a lost shard
# costs little); a huge one gets fewer, longer shards (10^8 inputs: about 123,000 shards, not
# 3 million). It depends only on the order of the inputs, so it works while a listing streams
# and an incremental submit continues it where the job stopped.
AUTO_SHARD_SIZES: tuple[tuple[int, int], ...] = (
    (0, 32), (100_000, 64), (300_000, 128), (1_000_000, 256), (3_000_000, 512), (10_000_000, 1000),
)


def auto_shard_size(items_before: int) -> int:
    """The default size of the shard that starts after ``items_before`` inputs."""
    size = AUTO_SHARD_SIZES[0][1]
    for threshold, value in AUTO_SHARD_SIZES:
        if items_before >= threshold:
            size = value
    return size


class KeyClaims:
    """Output keys handed out so far in this job, as 64-bit digests (about 8 bytes each).

    Keys are claimed a shard at a time, in source order: the shard's natural keys are checked
    against the earlier claims in one vectorised lookup; a clash (rare) takes the slow path.
    """

    def __init__(self) -> None:
        self._seen = DigestSet()

    def take(self, key: str) -> None:
        """A key already handed out (an incremental submit's earlier shards)."""
        self._seen.add(digest(key))
        self._seen.settle()

    def claim_batch(self, items: list[SourceItem], extension: str, suffix: str) -> list[str]:
        naturals = [_natural_key(item, extension, suffix) for item in items]
        digests = [digest(key) for key in naturals]
        taken_before = self._seen.in_runs(np.array(digests, dtype=np.uint64))
        keys = []
        for item, key, value, taken in zip(items, naturals, digests, taken_before):
            if not taken and value not in self._seen._recent:
                self._seen.add(value)
                keys.append(key)
            else:
                keys.append(self._renamed(item, key, extension, suffix))
        self._seen.settle()
        return keys

    def _claim_one(self, key: str) -> bool:
        value = digest(key)
        if value in self._seen:
            return False
        self._seen.add(value)
        return True

    def _renamed(self, item: SourceItem, natural: str, extension: str, suffix: str) -> str:
        """The natural name is taken: keep the source extension, then number (``~2``, ``~3``)."""
        kept = output_key(item.rel_key, extension, suffix, keep_source_extension=True) \
            if not natural.startswith("_unnamed/") else natural
        candidate, number = kept, 1
        while not self._claim_one(candidate):
            number += 1
            stem, ext = posixpath.splitext(kept)
            candidate = f"{stem}~{number}{ext}"
        return candidate


def _natural_key(item: SourceItem, extension: str, suffix: str) -> str:
    try:
        return output_key(item.rel_key, extension, suffix)
    except UnsafeKeyError:
        fallback = "_unnamed/" + hashlib.sha1(item.uri.encode()).hexdigest()[:16]
        return output_key(fallback, extension, suffix)


def iter_shards(
    items: Iterable[SourceItem],
    *,
    destination: str,
    extension: str,
    suffix: str = "",
    shard_size: int | None = None,
    first_index: int = 0,
    items_before: int = 0,
    claims: KeyClaims | None = None,
) -> Iterator[Shard]:
    """Cut the item stream into shards (the last may be smaller), streamed.

    ``shard_size`` None follows ``AUTO_SHARD_SIZES``. ``first_index``, ``items_before`` and
    ``claims`` (output keys of earlier shards) let an incremental submit append shards that
    continue the job's sizes and never collide with the outputs already handed out.
    """
    if shard_size is not None and shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    claims = claims if claims is not None else KeyClaims()
    base = storage.join_uri(destination, "x")[:-1]  # the destination with one trailing "/"
    stream = iter(items)
    index, placed = first_index, items_before
    while True:
        size = shard_size or auto_shard_size(placed)
        batch = list(itertools.islice(stream, size))  # one shard read ahead, no more
        if not batch:
            return
        keys = claims.claim_batch(batch, extension, suffix)
        yield Shard(shard_id_for(index), [
            ShardItem(item.uri, item.rel_key, base + key, getattr(item, "extra", None))
            for item, key in zip(batch, keys)
        ])
        index, placed = index + 1, placed + len(batch)


def split_by_size(items: list, shard_size: int | None) -> Iterator[list]:
    """A list cut as ``iter_shards`` cuts a stream: ``shard_size``, or the default sizes."""
    start = 0
    while start < len(items):
        size = shard_size or auto_shard_size(start)
        yield items[start : start + size]
        start += size


def batches(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- durable shard files ------------------------------------------------------------------------
def job_prefix(destination: str, job_id: str) -> str:
    return JobLayout(destination, job_id).prefix


def shard_uri(job_prefix: str, shard_id: str) -> str:
    """Checked ids only (cutout.jobs.layout): a shard id from a message is never joined raw."""
    return JobLayout.from_prefix(job_prefix).shard(shard_id)


# One encoder for every line: ``json.dumps`` with options builds a new encoder per call.
_SHARD_LINE = json.JSONEncoder(ensure_ascii=False, default=str)


def write_shard(job_prefix: str, shard: Shard) -> str:
    lines = (
        _SHARD_LINE.encode({"uri": i.uri, "rel_key": i.rel_key, "output_uri": i.output_uri,
                            **({"extra": i.extra} if i.extra else {})})
        for i in shard.items
    )
    uri = shard_uri(job_prefix, shard.shard_id)
    storage.write_bytes(uri, ("\n".join(lines) + "\n").encode(), content_type="application/x-ndjson")
    return uri


def read_shard(job_prefix: str, shard_id: str) -> Shard:
    """The shard's items; ``UnsafeKeyError`` when one would write outside the destination."""
    layout = JobLayout.from_prefix(job_prefix)
    uri = layout.shard(shard_id)
    items = []
    for number, line in enumerate(storage.read_bytes(uri).decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            items.append(ShardItem(data["uri"], data["rel_key"], data["output_uri"], data.get("extra")))
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"{uri} line {number} is not a shard item: {exc}") from exc
        if not isinstance(items[-1].output_uri, str) or not layout.holds_output(items[-1].output_uri):
            raise UnsafeKeyError(f"{uri} line {number}: output outside the job's destination")
    return Shard(shard_id, items)
