"""Every reader sees the picture a viewer shows: 16-bit scaled, EXIF orientation applied, huge files refused."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segflow.data.imageio import image_size, read_image, read_mask
from segflow.errors import SegflowError

ROTATED = 6  # EXIF Orientation "rotate 90 degrees clockwise to display", as phones write it


def png_header(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels: what a decompression bomb looks like to
    a reader before it decodes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))
    return path


def with_orientation(image: Image.Image, path: Path, orientation: int = ROTATED, **save_args) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, **save_args)
    return path


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped(tmp_path, suffix):
    values = np.array([[0, 255, 256, 32767], [32768, 40000, 65280, 65535]], dtype=np.uint16)
    path = tmp_path / f"gray16{suffix}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"

    image = read_image(path)

    assert image.shape == (2, 4, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], [[0, 0, 1, 127], [128, 156, 255, 255]])
    assert (image == image[..., :1]).all()  # gray in every channel


@pytest.mark.parametrize(("dtype", "kind"), [(np.int32, "32-bit integer"), (np.float32, "floating-point")])
def test_wider_samples_are_refused_naming_the_file(tmp_path, dtype, kind):
    path = tmp_path / "wide.tif"
    Image.fromarray(np.full((3, 3), 70000, dtype=dtype)).save(path)
    with pytest.raises(SegflowError, match=kind) as raised:
        read_image(path)
    assert str(raised.value).startswith(f"{path}: ")


def test_exif_orientation_is_applied_to_images_and_masks_alike(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)  # as the camera stored it: 40 wide, 20 high
    stored[:10, :10] = 255  # a bright block in the stored top-left corner
    photo = with_orientation(Image.fromarray(stored), tmp_path / "photo.jpg", quality=95)
    stored_mask = (stored[..., 0] > 0).astype(np.uint8)
    mask = with_orientation(Image.fromarray(stored_mask), tmp_path / "mask.png")

    image = read_image(photo)

    assert image.shape == (40, 20, 3) and image_size(photo) == (20, 40)
    # Turned a quarter clockwise for display, the stored top-left corner is the top-right one.
    assert image[:10, 10:, 0].min() > 200 and image[10:, :, 0].max() < 50 and image[:, :10, 0].max() < 50
    np.testing.assert_array_equal(read_mask(mask), (image[..., 0] > 127).astype(np.uint8))


@pytest.mark.parametrize(("width", "height", "size"), [
    (30000, 30000, "900,000,000 pixels"),  # past twice PIL's limit: PIL itself refuses to open it
    (10000, 9000, "10000x9000 (90,000,000 pixels)"),  # between the limit and twice it: PIL only warns
])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_images_past_the_decompression_bomb_limit_are_refused_naming_file_and_size(tmp_path, width, height, size):
    bomb = png_header(tmp_path / "bomb.png", width, height)
    for reader in (read_image, read_mask, image_size):
        with pytest.raises(SegflowError, match="decompression-bomb limit") as raised:
            reader(bomb)
        assert str(raised.value).startswith(f"{bomb}: the image is {size}, more than the 89,478,485 pixels")


def test_a_bomb_among_the_inputs_ends_the_command_with_exit_2_and_no_traceback(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    png_header(tmp_path / "images" / "bomb.png", 30000, 30000)
    Image.new("L", (8, 8)).save(tmp_path / "masks" / "bomb.png")

    result = subprocess.run(
        [str(Path(sys.executable).parent / "segflow"), "ingest", "masks", "--images", "images", "--masks", "masks",
         "--out", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=120)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "images/bomb.png: the image is 900,000,000 pixels" in result.stderr
    assert not (tmp_path / "out").exists()
