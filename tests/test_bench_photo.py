"""The photo profile's pieces: its anchors compute the same model input, and eight 36 MP JPEGs decoding at
once stay under the stated memory bound."""
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipcap_bench.photo_profile import memory_bound, peak_rss_growth, write_photo_jpeg
from clipcap_bench.photos import ORIENTATION, PIPELINES, photo_like

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_pipeline_computes_the_same_model_input(name):
    """A fair race: on a JPEG stored on its side (EXIF 6, no ICC profile: not every anchor manages colour)
    every pipeline that reads EXIF lands within a few levels of clipcap's input (their kernels differ)."""
    pipeline = PIPELINES[name]
    if pipeline.module is not None:
        pytest.importorskip(pipeline.module)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    buffer = io.BytesIO()
    photo_like(800, 600).save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    data = buffer.getvalue()
    reference, _ = PIPELINES["clipcap"].run(data, 224)
    pixels, stages = pipeline.run(data, 224)
    assert pixels.shape == reference.shape == (3, 224, 224)
    assert stages["total"] > 0
    if name != "simplejpeg":  # reads no EXIF: the stored, sideways picture
        difference = np.abs(np.asarray(pixels) - np.asarray(reference))  # numpy or torch, by pipeline
        assert float(difference.mean()) * 0.27 * 255 <= 6  # mean level difference, std ~0.27


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_eight_36_mp_jpegs_decoding_at_once_stay_under_the_bound(tmp_path):
    """Eight threads each turning a 6000x6000 JPEG into model input at once, in a fresh process: the peak
    RSS grows by no more than `memory_bound` (1/8-scale decodes; a full decode needs ~1.2 GB)."""
    count, side = 8, 6000
    path = write_photo_jpeg(tmp_path / "photo.jpg", side, side)
    growth = peak_rss_growth(path, count, 224, False, ROOT)
    print(f"\npeak RSS growth, {count} x {side}x{side} JPEGs at once: {growth / 1e6:.0f} MB "
          f"(bound {memory_bound(count, side, side) / 1e6:.0f} MB)")
    assert growth <= memory_bound(count, side, side)
