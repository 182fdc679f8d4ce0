"""COCO annotation files as a source (cutout.jobs.coco): items, errors, and reading a file too
big to load: streamed, grouped by image through runs spilled to temp disk, memory bounded."""
from __future__ import annotations

import json
import random
import tracemalloc

import pytest

from cutout.jobs import coco, storage
from cutout.jobs.errors import ConfigError

CATEGORIES = [{"id": 5, "name": "disc"}, {"id": 7, "name": "square"}]


def write_coco(path, images, annotations, categories=CATEGORIES, first="annotations") -> str:
    """A COCO file; ``first`` puts that key first (keys may come in any order)."""
    data = {"images": images, "annotations": annotations, "categories": categories}
    ordered = {first: data.pop(first), **data}
    path.write_text(json.dumps(ordered))
    return str(path)


def items(source, images="s3://b/img/", classes=()):
    return list(coco.iter_coco_items(source, images, classes))


def test_items_carry_box_label_ids_and_box_index(tmp_path):
    images = [{"id": 1, "file_name": "a/card.png"}, {"id": 2, "file_name": "other.png"}]
    annotations = [
        {"id": 11, "image_id": 1, "bbox": [15, 25, 70, 70], "category_id": 5, "iscrowd": 0},
        {"id": 12, "image_id": 1, "bbox": [118, 28, 64, 64], "category_id": 7},
        {"id": 22, "image_id": 2, "bbox": [0, 0, 200, 120], "category_id": 7, "iscrowd": 1},
        {"id": 21, "image_id": 2, "bbox": [118.5, 28, 64, 64], "category_id": 7},
    ]
    source = write_coco(tmp_path / "instances.json", images, annotations)
    assert items(source) == [
        ("s3://b/img/a/card.png#11", "a/card.11.png",
         {"box": [15.0, 25.0, 70.0, 70.0], "box_format": "xywh", "box_index": 0,
          "image_uri": "s3://b/img/a/card.png", "label": "disc", "category_id": 5,
          "annotation_id": 11, "image_id": 1}),
        ("s3://b/img/a/card.png#12", "a/card.12.png",
         {"box": [118.0, 28.0, 64.0, 64.0], "box_format": "xywh", "box_index": 1,
          "image_uri": "s3://b/img/a/card.png", "label": "square", "category_id": 7,
          "annotation_id": 12, "image_id": 1}),
        ("s3://b/img/other.png#21", "other.21.png",
         {"box": [118.5, 28.0, 64.0, 64.0], "box_format": "xywh", "box_index": 0,
          "image_uri": "s3://b/img/other.png", "label": "square", "category_id": 7,
          "annotation_id": 21, "image_id": 2}),
    ]
    kept = items(source, classes=("SQUARE",))
    assert [(uri, extra["box_index"]) for uri, _, extra in kept] == [
        ("s3://b/img/a/card.png#12", 1), ("s3://b/img/other.png#21", 0)]


@pytest.mark.parametrize("first", ["annotations", "images", "categories"])
def test_interleaved_annotations_come_out_grouped_by_image_through_spilled_runs(tmp_path, monkeypatch, first):
    """Annotations shuffled across 40 images, runs of 7 objects merged 3 at a time: every image's
    objects come out together, in the file's image order, each image's in annotation order."""
    rng = random.Random(4)
    image_ids = rng.sample(range(1000, 2000), 40)
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in image_ids]
    annotations = [{"id": n, "image_id": rng.choice(image_ids + [9999]), "category_id": rng.choice([5, 7]),
                    "bbox": [n, 1, 2, 3], "iscrowd": int(rng.random() < 0.1)} for n in range(500)]
    source = write_coco(tmp_path / "shuffled.json", images, annotations, first=first)
    monkeypatch.setattr(coco, "RUN_RECORDS", 7)
    monkeypatch.setattr(coco, "MERGE_FAN_IN", 3)
    monkeypatch.setattr(coco, "READ_RECORDS", 2)
    runs = []
    write_run = coco._write_run
    monkeypatch.setattr(coco, "_write_run", lambda *a: runs.append(write_run(*a)) or runs[-1])

    out = items(source)
    assert len(runs) > 60  # the spill and the multi-level merge ran

    expected = []
    for image_id in image_ids:
        objects = [a for a in annotations if a["image_id"] == image_id and not a["iscrowd"]]
        expected += [(f"s3://b/img/{image_id}.jpg#{a['id']}", index) for index, a in enumerate(objects)]
    assert [(uri, extra["box_index"]) for uri, _, extra in out] == expected
    assert all(extra["box"][0] == extra["annotation_id"] for _, _, extra in out)


def test_reading_never_loads_the_file_whole(tmp_path, monkeypatch):
    """No json.load(s) of the document and no whole-object read: the file is parsed as it streams."""
    source = write_coco(tmp_path / "i.json", [{"id": 1, "file_name": "a.png"}],
                        [{"id": 3, "image_id": 1, "bbox": [1, 2, 3, 4], "category_id": 5}])

    def refuse(*args, **kwargs):
        raise AssertionError("the whole file was loaded")

    monkeypatch.setattr(json, "load", refuse)
    monkeypatch.setattr(json, "loads", refuse)
    monkeypatch.setattr(storage, "read_bytes", refuse)
    assert [uri for uri, _, _ in items(source)] == ["s3://b/img/a.png#3"]


def test_memory_stays_bounded_by_the_run_not_the_file(tmp_path, monkeypatch):
    """20,000 annotations (4 MB of JSON) read with runs of 1,000 objects: the peak of traced
    memory is a small fraction of what loading the file takes (json.load: about 21 MB)."""
    rng = random.Random(1)
    images = [{"id": i, "file_name": f"{i:06d}.jpg", "width": 640, "height": 480} for i in range(3000)]
    annotations = [{"id": n, "image_id": rng.randrange(3000), "category_id": 5, "iscrowd": 0, "area": 10.5,
                    "bbox": [1.5, 2.5, 30.25, 40.0], "segmentation": [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]}
                   for n in range(20000)]
    source = write_coco(tmp_path / "big.json", images, annotations)
    del annotations
    monkeypatch.setattr(coco, "RUN_RECORDS", 1000)
    monkeypatch.setattr(coco, "READ_RECORDS", 100)
    loaded = _traced_peak(lambda: json.loads((tmp_path / "big.json").read_bytes()))
    count, peak = _traced_peak(lambda: sum(1 for _ in coco.iter_coco_items(source, "img/")), with_result=True)
    assert count == 20000
    assert peak < loaded / 8, f"peak {peak / 2**20:.1f} MiB, loading {loaded / 2**20:.1f} MiB"


def _traced_peak(call, with_result=False):
    tracemalloc.start()
    try:
        result = call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return (result, peak) if with_result else peak


def test_string_and_repeated_image_ids(tmp_path):
    """Ids need not be integers; an image listed twice gets its objects at each listing."""
    images = [{"id": "b", "file_name": "b.png"}, {"id": 7, "file_name": "seven.png"},
              {"id": "b", "file_name": "b-again.png"}, {"id": "7", "file_name": "text-seven.png"}]
    annotations = [{"id": 1, "image_id": "b", "bbox": [1, 1, 2, 2]}, {"id": 2, "image_id": "7", "bbox": [1, 1, 2, 2]},
                   {"id": 3, "image_id": 7, "bbox": [1, 1, 2, 2]}]
    source = write_coco(tmp_path / "ids.json", images, annotations)
    assert [uri for uri, _, _ in items(source, "img")] == [
        "img/b.png#1", "img/seven.png#3", "img/b-again.png#1", "img/text-seven.png#2"]


def test_read_from_s3_streamed(bucket):
    name = bucket("coco")
    data = {"images": [{"id": 1, "file_name": "x.png"}], "categories": CATEGORIES,
            "annotations": [{"id": 4, "image_id": 1, "bbox": [1, 2, 3, 4], "category_id": 7}]}
    storage.write_bytes(f"s3://{name}/instances.json", json.dumps(data).encode())
    out = items(f"s3://{name}/instances.json", f"s3://{name}/images/")
    assert [(uri, extra["label"]) for uri, _, extra in out] == [(f"s3://{name}/images/x.png#4", "square")]
    with pytest.raises(ConfigError, match="does not exist"):
        items(f"s3://{name}/missing.json")


@pytest.mark.parametrize("text, message", [
    (json.dumps({"images": [{"id": 1, "file_name": "a"}]}), "not a COCO annotation file"),
    (json.dumps({"annotations": []}), "not a COCO annotation file"),
    (json.dumps({"foo": [1]}), "not a COCO annotation file"),
    ("[1, 2]", "expected a JSON object"),
    ('{"images": [', "not JSON"),
    ("", "not JSON"),
    (json.dumps({"images": [{"id": 1, "file_name": "a"}], "categories": CATEGORIES,
                 "annotations": [{"id": 5, "image_id": 1, "bbox": [1, 2, 3]}]}),
     "annotation 5: box .*expected four finite numbers"),
    (json.dumps({"images": [{"id": 1, "file_name": "a"}], "annotations": [{"id": 6, "image_id": 1}]}),
     "annotation 6: 'bbox'"),
])
def test_errors_name_the_problem(tmp_path, text, message):
    source = tmp_path / "bad.json"
    source.write_text(text)
    with pytest.raises(ConfigError, match=message):
        items(str(source))


def test_errors_before_reading(tmp_path):
    with pytest.raises(ConfigError, match="need --images"):
        items(str(tmp_path / "any.json"), images=None)
    with pytest.raises(ConfigError, match="does not exist"):
        items(str(tmp_path / "missing.json"))
    source = write_coco(tmp_path / "i.json", [{"id": 1, "file_name": "a"}], [])
    with pytest.raises(ConfigError, match="no category named spoon"):
        items(source, classes=("spoon",))
    assert items(write_coco(tmp_path / "empty.json", [], [])) == []
    # a bad box on an object no image lists, or of a class left out, is never read
    lax = write_coco(tmp_path / "lax.json", [{"id": 1, "file_name": "a"}],
                     [{"id": 1, "image_id": 99, "bbox": "x"}, {"id": 2, "image_id": 1, "bbox": "x", "category_id": 5}])
    assert items(lax, classes=("square",)) == []
