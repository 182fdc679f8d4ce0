"""Demo inputs: scikit-image's bundled photos (no download) plus a few broken files, uploaded
to an S3 prefix, so the demo shows both cutouts and failure accounting."""
from __future__ import annotations

import io
import sys

import boto3
import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "cat", "rocket", "hubble_deep_field", "immunohistochemistry",
          "coins", "camera", "horse", "logo", "retina", "page", "moon")


def sample_photos():
    from skimage import data

    for name in PHOTOS:
        loader = getattr(data, name, None)
        if loader is None:
            continue
        array = np.asarray(loader())
        if array.dtype == bool:
            array = (array * 255).astype(np.uint8)
        if array.dtype != np.uint8:
            array = np.clip(array, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        fmt, ext = ("JPEG", "jpg") if array.ndim == 3 and array.shape[2] == 3 else ("PNG", "png")
        Image.fromarray(array).save(buffer, format=fmt)
        yield f"skimage/{name}.{ext}", buffer.getvalue()


BROKEN = {
    "broken/empty.jpg": b"",
    "broken/notes.png": b"this is a text file with an image name\n",
    "broken/truncated.jpg": None,  # filled from a real JPEG below
}


def main(bucket: str, prefix: str) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    count = 0
    first_jpeg = None
    for key, data in sample_photos():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)
        first_jpeg = first_jpeg or (data if key.endswith(".jpg") else None)
        count += 1
    for key, data in BROKEN.items():
        body = data if data is not None else first_jpeg[: len(first_jpeg) // 3]
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=body)
        count += 1
    print(f"uploaded {count} files to s3://{bucket}/{prefix}/ ({len(BROKEN)} deliberately broken)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
