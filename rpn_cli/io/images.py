"""Reading images from disk into 8-bit RGB, whatever their mode, orientation or size."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Pillow's own guard is 89.5 million pixels (a 1 GiB RGBA raster) and only warns below twice that.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# Pillow's warning is replaced by the max_pixels check in load_image. Filtered once here, not per call:
# warnings.catch_warnings is not thread-safe, and images are decoded in threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode: 16/32-bit greyscale rescaled, alpha composited over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit data: 65535 maps to 255; 32-bit integer images are taken as 16-bit too.
        image = Image.fromarray(np.clip(values / 257.0, 0, 255).round().astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if values.size and values.max() <= 1.0 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def load_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``path`` as upright 8-bit RGB (EXIF orientation applied).

    Raises :class:`ImageError` naming the file for a missing, empty, corrupt,
    truncated or too large (``max_pixels``) image.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageError(
                    f"{path}: {width}x{height} is over the limit of {max_pixels} pixels "
                    "(decompression bomb guard; raise it with --max-pixels, in Python max_pixels=)"
                )
            image.load()
            upright = ImageOps.exif_transpose(image)
            return to_rgb(upright)
    except ImageError:
        raise
    except FileNotFoundError as error:
        raise ImageError(f"{path}: no such file") from error
    except IsADirectoryError as error:
        raise ImageError(f"{path}: is a directory") from error
    except Image.DecompressionBombError as error:
        raise ImageError(f"{path}: too many pixels (decompression bomb guard)") from error
    except UnidentifiedImageError as error:
        what = "empty file" if path.exists() and path.stat().st_size == 0 else "not an image Pillow can read"
        raise ImageError(f"{path}: {what}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path}: cannot decode ({error})") from error
