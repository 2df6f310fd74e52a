"""One batch of image bytes -> output rows: load each image's pixels, caption the good ones together, record the bad.

Shared by the local engine and the Ray actors, so both write exactly the same rows. A bad image
(unreadable, not an image, over the pixel limit) becomes a row with `error` set and no caption; it
never costs the other images of its batch their captions.
"""
from __future__ import annotations

import numpy as np

import clipcap.arrays as arrays
from clipcap.captioner import Captioner
from clipcap.decoding import DecodingOptions
from clipcap.images import ImageError


def caption_rows(captioner: Captioner, ids: list[str], paths: list[str], blobs: list[bytes | None],
                 read_errors: list[str | None], options: DecodingOptions, embeddings: bool,
                 formats: tuple[str, ...]) -> list[dict]:
    """Rows (id, path, caption, token_ids, [embedding], error) in input order.

    `blobs[i]` is None when reading failed, with the reason in `read_errors[i]`; an image in none of
    `formats` fails its row.
    """
    rows, loaded, good = [], [], []
    for index, (image_id, path, data, read_error) in enumerate(zip(ids, paths, blobs, read_errors)):
        row = {"id": image_id, "path": path, "caption": None, "token_ids": None, "error": read_error}
        if embeddings:
            row["embedding"] = None
        if data is not None:
            try:
                loaded.append(captioner.load_pixels(data, formats))
                good.append(index)
            except ImageError as error:
                row["error"] = str(error)
        rows.append(row)
    if loaded:
        pixels = np.stack(loaded)
        if embeddings:
            clip = arrays.to_numpy(captioner.runtime.encode_image(pixels)).astype(np.float32)  # computed once: captioned and stored
            captions = captioner.caption_embeddings(clip, options).captions
            for index, vector in zip(good, clip):
                rows[index]["embedding"] = vector.tolist()
        else:
            captions = captioner.caption_pixels(pixels, options).captions
        for index, caption in zip(good, captions):
            rows[index]["caption"] = caption.caption
            rows[index]["token_ids"] = list(caption.token_ids)
    return rows
