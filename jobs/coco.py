"""COCO-style annotation files as a source: one input per annotated object.

``cutout submit instances.json --images s3://bucket/images/ --to s3://out/`` reads the file's
``images`` (``id``, ``file_name``), ``annotations`` (``image_id``, ``bbox`` as COCO's pixel
``[x, y, w, h]``, ``category_id``, ``id``) and ``categories`` (``id``, ``name``), and yields
one item per annotation: it reads ``<images>/<file_name>``, is named ``<file_name stem>.<id>``
and carries its box, category name, annotation and image ids to its manifest row. Items come
grouped by image (in the file's image order), so an image is read once for all its objects.
``--classes cup,spoon`` keeps only those categories; ``iscrowd`` regions (not one object)
are left out. The file is read whole: a COCO file is one JSON document (train2017's
instances file takes about 2 GB of memory to load).
"""
from __future__ import annotations

import posixpath
from collections import defaultdict
from typing import Iterator

from cutout.jobs import storage
from cutout.jobs.boxes import BOX_KEY, FORMAT_KEY, IMAGE_KEY, INDEX_KEY, box_rel_key, parse_box
from cutout.jobs.errors import ConfigError


def is_coco_file(source: str) -> bool:
    """A ``.json`` source is COCO annotations, except an S3 Inventory ``manifest.json``
    (``cutout.jobs.sources`` asks that first)."""
    return source.lower().endswith(".json")


def iter_coco_items(source: str, images: str | None, classes: tuple[str, ...] = ()):
    """``(object uri, rel key, extra)`` per kept annotation; ``ConfigError`` for a file that
    is not COCO, a missing ``--images`` or a class the file does not name."""
    if not images:
        raise ConfigError(f"COCO annotations {source!r} need --images PREFIX (where file_name is found)")
    data = _load(source)
    categories = {c["id"]: str(c["name"]) for c in data.get("categories", [])}
    wanted = {c.lower() for c in classes}
    unknown = wanted - {name.lower() for name in categories.values()}
    if unknown:
        raise ConfigError(f"{source}: no category named {', '.join(sorted(unknown))} "
                          f"(it has {len(categories)}, e.g. {', '.join(list(categories.values())[:5])})")
    by_image = defaultdict(list)
    for annotation in data["annotations"]:
        if not annotation.get("iscrowd"):
            by_image[annotation["image_id"]].append(
                (annotation, categories.get(annotation.get("category_id"), "")))
    for image in data["images"]:
        yield from _image_items(source, images, image, by_image.get(image["id"], []), wanted)


def _image_items(source: str, images: str, image: dict, annotations: list,
                 wanted: set[str]) -> Iterator[tuple]:
    """The image's kept annotations; ``box_index`` counts all its (non-crowd) annotations, so
    an object keeps its index whatever ``--classes`` picks."""
    file_name = str(image["file_name"])
    uri = storage.join_uri(images, file_name)
    for index, (annotation, category) in enumerate(annotations):
        if wanted and category.lower() not in wanted:
            continue
        try:
            box = parse_box(annotation["bbox"], "xywh")
        except (ConfigError, KeyError) as exc:
            raise ConfigError(f"{source}: annotation {annotation.get('id')}: {exc}") from None
        name = str(annotation.get("id", f"box-{index}"))
        extra = {BOX_KEY: list(box.values), FORMAT_KEY: "xywh", INDEX_KEY: index, IMAGE_KEY: uri,
                 "label": category, "category_id": annotation.get("category_id"),
                 "annotation_id": annotation.get("id"), "image_id": image["id"]}
        yield f"{uri}#{name}", box_rel_key(posixpath.normpath(file_name).lstrip("/"), name), extra


def _load(source: str) -> dict:
    data = storage.read_json_object(source, "annotation file")
    if not {"images", "annotations"} <= data.keys():
        raise ConfigError(f"{source}: not a COCO annotation file (needs 'images' and 'annotations')")
    return data
