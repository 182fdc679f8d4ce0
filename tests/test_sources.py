"""cutout.jobs.sources: folders, globs, S3 prefixes and list files, in a stable order."""
from __future__ import annotations

import csv
import json
import os

import pytest

from cutout.jobs import storage
from cutout.jobs.errors import ConfigError
from cutout.jobs.sources import SourceItem, iter_source_items, rel_key_for_uri


def _touch(root, *names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def _rels(items):
    return [item.rel_key for item in items]


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    _touch(root, "b.jpg", "a/z.PNG", "a/sub/y.webp", "a-b/x.jpeg", "a.tif", "notes.txt",
           ".hidden.jpg", ".git/obj.jpg", "c/readme.md", "c/d/e/deep.gif")
    return root


def test_folder_is_walked_recursively_in_sorted_order(photos):
    items = list(iter_source_items([str(photos)]))
    expected = ["a-b/x.jpeg", "a.tif", "a/sub/y.webp", "a/z.PNG", "b.jpg", "c/d/e/deep.gif"]
    assert _rels(items) == expected  # same order as sorting the keys as strings
    assert all(item.uri == str(photos / item.rel_key) for item in items)


def test_all_files_keeps_non_images_but_not_hidden(photos):
    rels = _rels(iter_source_items([str(photos)], all_files=True))
    assert "notes.txt" in rels and "c/readme.md" in rels
    assert not any(r.startswith(".") or "/." in r for r in rels)


def test_file_uri_folder_and_single_file(photos):
    items = list(iter_source_items(["file://" + str(photos / "a"), str(photos / "b.jpg")]))
    assert _rels(items) == ["sub/y.webp", "z.PNG", "b.jpg"]


def test_glob_relative_and_absolute(photos, monkeypatch):
    monkeypatch.chdir(photos.parent)
    assert _rels(iter_source_items(["photos/**/*.jpg"])) == ["b.jpg"]
    assert _rels(iter_source_items([str(photos) + "/a/**/*"])) == ["sub/y.webp", "z.PNG"]
    assert _rels(iter_source_items([str(photos) + "/*/*.PNG"])) == ["a/z.PNG"]
    items = list(iter_source_items(["photos/a*/*"]))
    assert _rels(items) == ["a-b/x.jpeg", "a/z.PNG"]
    assert all(os.path.isabs(item.uri) for item in items)


@pytest.mark.parametrize("source", ["missing-folder/", "nothing/*.jpg", "missing.txt"])
def test_missing_sources_are_config_errors(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="source|list file"):
        list(iter_source_items([source]))


def test_folder_without_images_is_a_config_error(tmp_path):
    _touch(tmp_path, "readme.md")
    with pytest.raises(ConfigError, match="no image files"):
        list(iter_source_items([str(tmp_path)]))
    assert _rels(iter_source_items([str(tmp_path)], all_files=True)) == ["readme.md"]


def test_s3_prefix_with_more_than_one_page(bucket):
    name = bucket()
    client = storage.s3_client()
    keys = [f"in/{i:04d}.jpg" for i in range(1203)] + ["in/notes.txt", "other/x.jpg"]
    for key in keys:
        client.put_object(Bucket=name, Key=key, Body=b"")
    items = list(iter_source_items([f"s3://{name}/in/"]))
    assert len(items) == 1203
    assert items[0] == SourceItem(f"s3://{name}/in/0000.jpg", "0000.jpg")
    assert _rels(items) == sorted(_rels(items))
    # without the trailing slash the same prefix is meant; a single object is itself
    assert _rels(iter_source_items([f"s3://{name}/in"])) == _rels(items)
    assert list(iter_source_items([f"s3://{name}/other/x.jpg"])) == [
        SourceItem(f"s3://{name}/other/x.jpg", f"{name}/other/x.jpg")
    ]
    globbed = list(iter_source_items([f"s3://{name}/in/000?.jpg"]))
    assert _rels(globbed) == [f"000{i}.jpg" for i in range(10)]


def test_s3_missing_prefix_or_bucket(bucket):
    name = bucket()
    with pytest.raises(ConfigError):
        list(iter_source_items([f"s3://{name}/nothing/"]))
    with pytest.raises(ConfigError):
        list(iter_source_items(["s3://no-such-bucket-for-cutout/x/"]))


# --- list files ---------------------------------------------------------------------------------
LISTED = ["https://example.com/img/a.jpg", "s3://bkt/path/b.png", "rel/c.jpg", "/abs/d.jpg"]


def _expected_items(list_dir):
    return [
        SourceItem("https://example.com/img/a.jpg", "example.com/img/a.jpg"),
        SourceItem("s3://bkt/path/b.png", "bkt/path/b.png"),
        SourceItem(str(list_dir / "rel" / "c.jpg"), "rel/c.jpg"),
        SourceItem("/abs/d.jpg", "abs/d.jpg"),
    ]


def test_txt_list(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("# inputs\n\n" + "\n".join(f"  {u}  " for u in LISTED) + "\n# end\n")
    assert list(iter_source_items([str(path)])) == _expected_items(tmp_path)


def test_csv_list_with_header_column(tmp_path):
    path = tmp_path / "list.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "URL", "label"])
        for i, uri in enumerate(LISTED):
            writer.writerow([i, uri, "cat"])
    assert list(iter_source_items([str(path)])) == _expected_items(tmp_path)


def test_csv_list_without_header(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("\n".join(f"{u},x" for u in LISTED) + "\n")
    assert list(iter_source_items([str(path)])) == _expected_items(tmp_path)


def test_jsonl_list(tmp_path):
    path = tmp_path / "list.jsonl"
    lines = [json.dumps({"uri": u, "n": 1}) for u in LISTED[:2]] + [json.dumps({"url": LISTED[2]}),
                                                                    json.dumps(LISTED[3]), ""]
    path.write_text("\n".join(lines) + "\n")
    assert list(iter_source_items([str(path)])) == _expected_items(tmp_path)


def test_jsonl_list_with_bad_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"uri": "a.jpg"}\n{"name": "b.jpg"}\n')
    with pytest.raises(ConfigError, match="line 2"):
        list(iter_source_items([str(path)]))


def test_parquet_list_in_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    uris = [f"s3://bkt/img/{i:06d}.jpg" for i in range(70_000)]  # more than one batch
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"label": ["x"] * len(uris), "uri": uris}), path, row_group_size=20_000)
    items = list(iter_source_items([str(path)]))
    assert [item.uri for item in items] == uris
    assert items[-1].rel_key == "bkt/img/069999.jpg"


def test_parquet_without_uri_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": ["a.jpg"]}), path)
    with pytest.raises(ConfigError, match="no 'uri' or 'url' column"):
        list(iter_source_items([str(path)]))


def test_list_file_on_s3(bucket):
    name = bucket()
    storage.write_bytes(f"s3://{name}/lists/in.txt", "\n".join(LISTED[:2]).encode())
    assert list(iter_source_items([f"s3://{name}/lists/in.txt"])) == [
        SourceItem("https://example.com/img/a.jpg", "example.com/img/a.jpg"),
        SourceItem("s3://bkt/path/b.png", "bkt/path/b.png"),
    ]


def test_direct_uris_and_rel_keys():
    items = list(iter_source_items(["https://cdn.example.com:8080/a%20b/c.jpg"]))
    assert items == [SourceItem("https://cdn.example.com:8080/a%20b/c.jpg", "cdn.example.com_8080/a b/c.jpg")]
    one, two = rel_key_for_uri("https://h/img?id=1"), rel_key_for_uri("https://h/img?id=2")
    assert one != two and one.startswith("h/img-")
    assert rel_key_for_uri("https://h/") == "h/index"


def test_order_is_deterministic(photos, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(LISTED))
    sources = [str(listing), str(photos)]
    assert list(iter_source_items(sources)) == list(iter_source_items(sources))
