"""The Ray Data stages as plain functions, without Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from batchdet.preprocess import prepare
from batchdet.stages import IMAGE_SHAPE, prepare_batch
from photos import photo


def test_prepare_batch_packs_valid_images_and_keeps_errors_as_null():
    rocket, chelsea = photo("rocket.jpg"), photo("chelsea.png")
    batch = pa.table({
        "dataset": ["a"] * 5,
        "uri": ["rocket", "broken", "unread", "chelsea", "rocket2"],
        "data": pa.array([rocket, b"not an image", None, chelsea, rocket], pa.large_binary()),
        "error": [None, None, "NotFound: unread", None, None],
    })
    out = prepare_batch(batch)

    assert out.column_names == ["dataset", "uri", "image", "width", "height", "error"]
    assert out.column("uri").to_pylist() == batch.column("uri").to_pylist()
    errors = out.column("error").to_pylist()
    assert errors[0] is None and errors[3] is None and errors[4] is None
    assert errors[1].startswith("DecodeError") and errors[2] == "NotFound: unread"
    images = out.column("image")
    assert [images[i].is_valid for i in range(5)] == [True, False, False, True, True]
    assert out.column("width").to_pylist() == [640, None, None, 451, 640]
    assert out.column("height").to_pylist() == [427, None, None, 300, 427]
    # each valid row holds exactly what prepare() gives for that file, planar
    for i, data in ((0, rocket), (3, chelsea), (4, rocket)):
        got = np.frombuffer(images[i].as_py(), np.uint8).reshape(IMAGE_SHAPE)
        np.testing.assert_array_equal(got, prepare(data).image)
    # failed rows take no bytes: the column carries three images, nothing more
    assert images.chunk(0).buffers()[2].size == 3 * 3 * 1200 * 1200
