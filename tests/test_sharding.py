"""cutout.jobs.sharding: safe, deterministic, collision-free output keys and shard files."""
from __future__ import annotations

import itertools
import posixpath

import pytest

from cutout.jobs import sharding, storage
from cutout.jobs.errors import UnsafeKeyError
from cutout.jobs.sources import SourceItem

DEST = "s3://out-bucket/results"


def test_output_uri_replaces_the_extension_and_keeps_the_key():
    assert sharding.output_uri(DEST, "photos/cat.jpg", ".png") == f"{DEST}/photos/cat.png"
    assert sharding.output_uri(DEST + "/", "cat.JPEG", "webp", "_cutout") == f"{DEST}/cat_cutout.webp"
    assert sharding.output_uri("/data/out", "noext", ".png") == "/data/out/noext.png"
    assert sharding.output_uri("/data/out", "a.b.c.jpg", ".png") == "/data/out/a.b.c.png"


@pytest.mark.parametrize(
    "rel_key, expected",
    [
        ("../../etc/passwd", "etc/passwd.png"),
        ("/etc/shadow.jpg", "etc/shadow.png"),
        ("a/../../b.jpg", "a/b.png"),
        ("..\\..\\windows\\x.jpg", "windows/x.png"),
        ("a//b/./c.jpg", "a/b/c.png"),
        ("...jpg", "...jpg.png"),  # a name, not a way up (leading dots: no extension)
    ],
)
def test_escape_attempts_stay_inside_the_destination(rel_key, expected):
    assert sharding.output_uri(DEST, rel_key, ".png") == f"{DEST}/{expected}"


@pytest.mark.parametrize("rel_key", ["", "/", "../..", "./.", "\\", "a\x00b.jpg", "a\nb.jpg",
                                     "_cutout/jobs/x/spec.json"])
def test_hopeless_keys_raise(rel_key):
    with pytest.raises(UnsafeKeyError):
        sharding.output_uri(DEST, rel_key, ".png")


def test_suffix_cannot_escape():
    with pytest.raises(UnsafeKeyError):
        sharding.output_uri(DEST, "a.jpg", ".png", suffix="/../../x")


def test_no_combination_of_segments_escapes():
    pieces = ["..", ".", "", "a", "\\", "b.jpg", "/"]
    for combo in itertools.product(pieces, repeat=4):
        rel_key = "/".join(combo)
        try:
            uri = sharding.output_uri("/srv/out", rel_key, ".png")
        except UnsafeKeyError:
            continue
        assert uri.startswith("/srv/out/")
        assert posixpath.normpath(uri).startswith("/srv/out/")
        assert ".." not in uri[len("/srv/out/"):].split("/")


def _items(*rel_keys):
    return [SourceItem(f"/in/{key}", key) for key in rel_keys]


def test_shards_are_cut_in_order_with_padded_ids():
    items = _items(*(f"{i:03d}.jpg" for i in range(7)))
    shards = list(sharding.iter_shards(items, destination="/out", extension=".png", shard_size=3))
    assert [s.shard_id for s in shards] == ["s000000", "s000001", "s000002"]
    assert [len(s.items) for s in shards] == [3, 3, 1]
    assert shards[2].items[0] == sharding.ShardItem("/in/006.jpg", "006.jpg", "/out/006.png")


def test_colliding_outputs_get_distinct_deterministic_names():
    items = _items("a.jpg", "a.png", "a.webp", "b.jpg", "a.png.jpg", "sub/a.jpg")

    def outputs():
        shards = sharding.iter_shards(items, destination="/out", extension=".png", shard_size=2)
        return [item.output_uri for shard in shards for item in shard.items]

    first = outputs()
    assert first == [
        "/out/a.png",  # first in source order keeps the natural name
        "/out/a.png.png",  # later ones keep their source extension
        "/out/a.webp.png",
        "/out/b.png",
        "/out/a.png.jpg.png",  # its natural name was taken by the second input's rename
        "/out/sub/a.png",
    ]
    assert len(set(first)) == len(first)
    clash = _items("a.jpg", "a.png", "a.png")  # the same key twice: numbered
    shard = next(sharding.iter_shards(clash, destination="/o", extension=".png", shard_size=5))
    assert [i.output_uri for i in shard.items] == ["/o/a.png", "/o/a.png.png", "/o/a.png~2.png"]
    assert outputs() == first


def test_unsafe_key_falls_back_to_a_hash_name():
    items = [SourceItem("s3://b/weird", ""), SourceItem("s3://b/other", "..")]
    shards = list(sharding.iter_shards(items, destination="/out", extension=".png", shard_size=10))
    uris = [item.output_uri for item in shards[0].items]
    assert all(u.startswith("/out/_unnamed/") and u.endswith(".png") for u in uris)
    assert uris[0] != uris[1]


def test_job_prefix():
    assert sharding.job_prefix("s3://b/out/", "0000000000abc123") == "s3://b/out/_cutout/jobs/0000000000abc123"


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_shard_files_round_trip(backend, tmp_path, request):
    dest = str(tmp_path) if backend == "local" else f"s3://{request.getfixturevalue('bucket')()}/out"
    prefix = sharding.job_prefix(dest, "000000000000000a")
    items = _items("x/ü nicode.jpg", 'quote"d.png')
    shard = next(sharding.iter_shards(items, destination=dest, extension=".webp", shard_size=5))
    uri = sharding.write_shard(prefix, shard)
    assert uri == storage.join_uri(prefix, "shards", "s000000.jsonl")
    assert sharding.read_shard(prefix, "s000000") == shard


def test_with_extension_keeps_renames():
    assert sharding.with_extension("/out/a.png.png", ".jpg") == "/out/a.png.jpg"


def test_collision_names_are_the_same_when_the_claims_live_in_sorted_runs(monkeypatch):
    """Claims move from a small set into merged sorted numpy runs (cutout.jobs.digests), then
    into runs on disk; a clash with a key claimed long before (now in a run) is still found,
    with the same names."""
    from cutout.jobs import digests

    names = [f"d{i % 7}/{i}.jpg" for i in range(60)] + ["d0/0.png", "d3/10.webp", "d0/0.jpg.jpg", "d0/0.jpg"]
    items = _items(*names)

    def outputs():
        shards = sharding.iter_shards(items, destination="/o", extension=".png", shard_size=3)
        return [item.output_uri for shard in shards for item in shard.items]

    in_a_set = outputs()
    monkeypatch.setattr(digests, "BUFFER_ENTRIES", 4)  # every few claims become a sorted run
    in_runs = outputs()
    assert in_runs == in_a_set
    monkeypatch.setattr(digests, "RAM_RUN_ENTRIES", 8)  # runs of more than 8 live in temp files
    monkeypatch.setattr(digests, "MERGE_CHUNK_ENTRIES", 3)
    opened, write_run = [], digests._write_run
    monkeypatch.setattr(digests, "_write_run", lambda path, chunks: opened.append(path) or write_run(path, chunks))
    on_disk = outputs()
    assert on_disk == in_a_set
    assert opened  # the claims really went through runs on disk
    assert in_runs[-4:] == ["/o/d0/0.png.png", "/o/d3/10.webp.png", "/o/d0/0.jpg.png", "/o/d0/0.jpg~2.png"]
    assert len(set(in_runs)) == len(in_runs)


def test_default_shard_sizes_grow_with_the_job():
    assert [sharding.auto_shard_size(n) for n in (0, 99_999, 100_000, 10**6, 10**7, 10**8)] == [32, 32, 64, 256, 1000, 1000]
    items = (SourceItem(f"s3://b/{i}.jpg", f"{i}.jpg") for i in range(100_100))
    sizes = [len(shard.items) for shard in sharding.iter_shards(items, destination="/o", extension=".png")]
    assert sizes[:3125] == [32] * 3125 and sizes[3125:] == [64, 36]
    assert [len(part) for part in sharding.split_by_size(list(range(100_100)), None)] == sizes
