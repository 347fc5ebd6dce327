"""The reference-image rule: how an ``input_reference`` image becomes a frame of the requested size.

Torch-free (Pillow only), so the gateway can apply or describe the same rule the encoder applies.

The rule, **cover then center-crop**:

1. EXIF orientation is applied (a phone photo is used the way it is shown);
2. transparency is flattened onto black, and the image is converted to 8-bit RGB;
3. the largest centered region of the image with the requested aspect ratio is kept (the image is
   cropped on its two longer sides equally, never padded or stretched);
4. that region is resized to exactly ``width × height`` with a Lanczos filter (up or down).

So a 1920×1080 image asked for at 128×128 keeps its central 1080×1080 square; asked for at
128×96, its central 1440×1080.
"""

from __future__ import annotations

from PIL import Image, ImageOps


def cover_crop_box(src_width: int, src_height: int, width: int, height: int) -> tuple[float, float, float, float]:
    """The ``(left, top, right, bottom)`` region of a ``src_width × src_height`` image that rule step 3 keeps.

    ValueError when any side is not positive.
    """
    for name, value in (("src_width", src_width), ("src_height", src_height), ("width", width), ("height", height)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if src_width * height > src_height * width:  # wider than asked: trim left and right
        keep = src_height * width / height
        left = (src_width - keep) / 2
        return (left, 0.0, left + keep, float(src_height))
    keep = src_width * height / width  # taller than asked (or the same shape): trim top and bottom
    top = (src_height - keep) / 2
    return (0.0, top, float(src_width), top + keep)


def fit_reference(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` as an RGB frame of exactly ``width × height`` by the module's rule (a new image)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(flat, rgba)
    image = image.convert("RGB")
    box = cover_crop_box(image.width, image.height, width, height)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box)


REFERENCE_FORMATS = ("PNG", "JPEG", "WEBP")  # what the gateway accepts (farm.api.uploads.ALLOWED_FORMATS)


def open_reference(data: bytes) -> Image.Image:
    """A stored reference image's bytes → a loaded Pillow image; ValueError for anything else.

    The gateway checked format, size and pixel count before storing them; this decodes only the
    same formats, so bytes that are not such an image fail here, by name.
    """
    import io

    try:
        image = Image.open(io.BytesIO(data), formats=list(REFERENCE_FORMATS))
        image.load()
    except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError…
        raise ValueError(f"input_reference: the stored bytes are not a {'/'.join(REFERENCE_FORMATS)} image "
                         f"({type(exc).__name__})") from None
    return image
