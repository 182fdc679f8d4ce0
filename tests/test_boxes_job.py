"""Box hints in a distributed job on real services (redis-server, moto S3, real ``cutout worker``
processes), and COCO annotations as a source: one record, one output and one manifest row
per annotated object; a bad box fails alone."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.test_job_integration import (  # noqa: F401  (fixtures: services, fleet)
    fleet,
    make_spec,
    new_bucket,
    read_manifest,
    services,
    submit,
    upload,
    wait_for_job,
)

pytestmark = pytest.mark.integration


def two_objects_png() -> bytes:
    """A dark disc (left) and a dark square (right) on a light, slightly noisy card."""
    rng = np.random.default_rng(3)
    rgb = np.clip(rng.normal(225, 3, (120, 200, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:120, 0:200]
    rgb[(yy - 60) ** 2 + (xx - 50) ** 2 < 28 ** 2] = (20, 40, 160)
    rgb[35:85, 125:175] = (150, 30, 20)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def alpha_of(uri: str) -> np.ndarray:
    from cutout.jobs import storage

    return np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGBA"))[..., 3]


def test_a_box_list_job_gives_one_cutout_per_object(fleet, services):
    source, dest = new_bucket("boxsrc"), new_bucket("boxdst")
    photo = two_objects_png()
    upload(source, "in/", {"card.png": photo, "plain.png": photo})
    rows = ["uri,bbox,label",
            f's3://{source}/in/card.png,"15,25,70,70",disc',
            f's3://{source}/in/card.png,"300,300,10,10",nothing',
            f's3://{source}/in/card.png,"118,28,64,64",square',
            f"s3://{source}/in/plain.png,,"]
    upload(source, "", {"objects.csv": ("\n".join(rows) + "\n").encode()})
    spec = make_spec([f"s3://{source}/objects.csv"], f"s3://{dest}/out")
    result = submit(spec, services["redis_url"])
    assert result.items_total == 4
    wait_for_job(result.job_prefix, result.shards_total, fleet)
    by_uri = {r["input_uri"]: r for r in read_manifest(result.job_prefix)}
    card = f"s3://{source}/in/card.png"
    assert set(by_uri) == {f"{card}#box-0", f"{card}#box-1", f"{card}#box-2", f"s3://{source}/in/plain.png"}
    disc, bad, square = by_uri[f"{card}#box-0"], by_uri[f"{card}#box-1"], by_uri[f"{card}#box-2"]
    assert bad["status"] == "failed" and bad["error_class"] == "InvalidBoxError" and bad["stage"] == "box"
    assert disc["status"] == square["status"] == "done"
    assert disc["output_uris"] == [f"s3://{dest}/out/{source}/in/card.box-0.png"]
    assert square["output_uris"] == [f"s3://{dest}/out/{source}/in/card.box-2.png"]
    assert disc["label"] == "disc" and square["label"] == "square"
    assert disc["box"] == [15.0, 25.0, 70.0, 70.0] and disc["image_uri"] == card
    assert by_uri[f"s3://{source}/in/plain.png"]["status"] == "done"
    left, right = alpha_of(disc["output_uris"][0]), alpha_of(square["output_uris"][0])
    assert left.shape == right.shape == (120, 200)  # the input's size: aligned with the source
    assert left[50:70, 40:60].min() > 200 and left[:, 110:].max() == 0
    assert right[50:70, 140:160].min() > 200 and right[:, :100].max() == 0


def test_coco_annotations_are_a_source_filtered_by_class(fleet, services):
    source, dest = new_bucket("cocosrc"), new_bucket("cocodst")
    photo = two_objects_png()
    upload(source, "images/", {"a/card.png": photo, "other.png": photo})
    coco = {
        "images": [{"id": 1, "file_name": "a/card.png", "width": 200, "height": 120},
                   {"id": 2, "file_name": "other.png", "width": 200, "height": 120}],
        "annotations": [
            {"id": 11, "image_id": 1, "bbox": [15, 25, 70, 70], "category_id": 5, "iscrowd": 0},
            {"id": 12, "image_id": 1, "bbox": [118, 28, 64, 64], "category_id": 7, "iscrowd": 0},
            {"id": 21, "image_id": 2, "bbox": [118, 28, 64, 64], "category_id": 7, "iscrowd": 0},
            {"id": 22, "image_id": 2, "bbox": [0, 0, 200, 120], "category_id": 7, "iscrowd": 1},
        ],
        "categories": [{"id": 5, "name": "disc"}, {"id": 7, "name": "square"}],
    }
    upload(source, "", {"instances.json": json.dumps(coco).encode()})
    from cutout.jobs.spec import JobSpec

    base = make_spec([f"s3://{source}/instances.json"], f"s3://{dest}/out")
    spec = JobSpec(**{**base.model_dump(), "images": f"s3://{source}/images/",
                      "annotation_classes": ("square",)})
    result = submit(spec, services["redis_url"])
    assert result.items_total == 2  # the disc is filtered out, the crowd region left out
    wait_for_job(result.job_prefix, result.shards_total, fleet)
    rows = {r["input_uri"]: r for r in read_manifest(result.job_prefix)}
    card = f"s3://{source}/images/a/card.png#12"
    assert set(rows) == {card, f"s3://{source}/images/other.png#21"}
    assert all(r["status"] == "done" for r in rows.values()), rows
    assert rows[card]["output_uris"] == [f"s3://{dest}/out/a/card.12.png"]
    assert rows[card]["label"] == "square" and rows[card]["annotation_id"] == "12"
    alpha = alpha_of(rows[card]["output_uris"][0])
    assert alpha[50:70, 140:160].min() > 200 and alpha[:, :100].max() == 0
