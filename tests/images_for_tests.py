"""Image files the tests write: every kind of good and bad input."""

import struct
import zlib
from pathlib import Path

import numpy as np
from conftest import SAMPLES
from PIL import Image


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming ``width x height`` (a decompression bomb's signature) and no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def write_test_images(folder: Path) -> dict[str, Path]:
    """Good images in several modes and formats, and bad files of every kind, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.open(SAMPLES / "chelsea.jpg").convert("RGB")
    files = {}
    files["jpeg"] = folder / "cat.jpg"
    photo.save(files["jpeg"], quality=90)
    files["png"] = folder / "cat_png.png"
    photo.save(files["png"])
    files["bmp"] = folder / "cat_bmp.bmp"
    photo.save(files["bmp"])
    files["tiff"] = folder / "cat_tiff.tif"
    photo.save(files["tiff"])
    files["webp"] = folder / "cat_webp.webp"
    photo.save(files["webp"], quality=90)
    files["grey"] = folder / "grey.png"
    photo.convert("L").save(files["grey"])
    files["palette"] = folder / "palette.png"
    photo.convert("P").save(files["palette"])
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    files["rgba"] = folder / "rgba.png"
    rgba.save(files["rgba"])
    sixteen = (np.asarray(photo.convert("L"), np.uint16) * 257).astype(np.uint16)
    files["16bit"] = folder / "sixteen.png"
    Image.fromarray(sixteen).save(files["16bit"])
    # Stored turned 90 degrees clockwise; EXIF orientation 8 tells a viewer to turn it 90 counter-clockwise.
    rotated = photo.transpose(Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = 8
    files["exif"] = folder / "exif_rotated.jpg"
    rotated.save(files["exif"], exif=exif.tobytes(), quality=90)
    files["empty"] = folder / "empty.jpg"
    files["empty"].write_bytes(b"")
    files["text"] = folder / "notes.png"
    files["text"].write_text("this is not an image\n")
    data = files["jpeg"].read_bytes()
    files["truncated"] = folder / "truncated.jpg"
    files["truncated"].write_bytes(data[: len(data) // 3])
    corrupt = bytearray(data)
    corrupt[200:1200] = bytes(1000)
    files["corrupt"] = folder / "corrupt.jpg"
    files["corrupt"].write_bytes(bytes(corrupt))
    files["huge"] = png_header_only(folder / "huge.png", 100_000, 100_000)
    return files
