"""Image geometry and media files: aspect buckets, crop and resize, uint8 conversion, grids, PNG and MP4 writing.

The one place that turns tensors into pictures and pictures into tensors, below the data, the pipeline and the
entry points. Pixels are float in [-1, 1], channels first; pictures are uint8, channels last.
"""
import math
import os

import imageio.v2 as imageio
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from utils.errors import UserError
from utils.files import atomic_path

ASPECT_RATIOS = ["1:1", "2:3", "3:2", "16:9", "9:16", "4:5", "5:4", "21:9", "9:21"]  # W:H, the trained buckets
MAX_ASPECT = 8.0
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}  # what data and image folders read


def parse_aspect_ratio(aspect):
    """'W:H' -> float W/H, validated."""
    try:
        w, h = (float(v) for v in str(aspect).split(":"))
    except ValueError:
        raise UserError(f"aspect ratio must look like 'W:H' (e.g. 16:9), got {aspect!r}") from None
    if not (w > 0 and h > 0) or not 1 / MAX_ASPECT <= w / h <= MAX_ASPECT:
        raise UserError(f"aspect ratio {aspect!r} is impossible: W and H must be positive with W/H within "
                        f"1/{MAX_ASPECT:g}..{MAX_ASPECT:g}; the trained buckets are {', '.join(ASPECT_RATIOS)}")
    return w / h


def aspect_ratio_to_image_size(target, ratio, multiple=8):
    """(h, w) with h*w near target**2 and w/h near ratio ('W:H' string or float); sides are multiples of `multiple`."""
    if ratio is None:
        ratio = 1.0
    if isinstance(ratio, str):
        ratio = parse_aspect_ratio(ratio)
    area = float(target) ** 2
    h = max(multiple, round(math.sqrt(area / ratio) / multiple) * multiple)
    w = max(multiple, round(math.sqrt(area * ratio) / multiple) * multiple)
    return int(h), int(w)


def nearest_bucket(width, height):
    """The aspect bucket whose ratio is closest (in log space) to width/height."""
    r = math.log(width / height)
    return min(ASPECT_RATIOS, key=lambda a: abs(math.log(parse_aspect_ratio(a)) - r))


def crop_resize(img, size, flip=False):
    """Centre-crop a PIL image to the aspect of size=(h, w), resize (bicubic), optionally flip; (3, h, w) in [-1, 1]."""
    h, w = size
    W, H = img.size
    if W * h > H * w:  # too wide
        cw = round(H * w / h)
        img = img.crop(((W - cw) // 2, 0, (W - cw) // 2 + cw, H))
    else:
        ch = round(W * h / w)
        img = img.crop((0, (H - ch) // 2, W, (H - ch) // 2 + ch))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).clamp_(-1, 1)


def load_image(image, size):
    """A path or PIL image -> (1, 3, h, w) in [-1, 1], centre-cropped to the aspect of size=(h, w) and resized."""
    if not isinstance(image, Image.Image):
        if not os.path.isfile(image):
            raise UserError(f"input image '{image}' not found")
        try:
            with Image.open(image) as f:
                image = f.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot read input image '{image}': {e}; pass a PNG/JPEG/WebP file") from None
    return crop_resize(image.convert("RGB"), size)[None]


def to_uint8(pixels):
    """[-1, 1] float -> uint8 HWC numpy, channels last."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()


def grid_shape(n, tall=False):
    """(rows, cols): the largest divisor of n not above sqrt(n) is the row count, or the column count if tall
    (the original's layouts: 8 images -> 2x4, 8 videos -> 4x2)."""
    short = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return (n // short, short) if tall else (short, n // short)


def make_grid(arrays, pad=2, tall=False):
    """Tile uint8 arrays (..., H, W, 3) into one, `pad` black pixels around cells; smaller cells sit top-left."""
    rows, cols = grid_shape(len(arrays), tall)
    H, W = max(a.shape[-3] for a in arrays), max(a.shape[-2] for a in arrays)
    grid = np.zeros((*arrays[0].shape[:-3], rows * (H + pad) + pad, cols * (W + pad) + pad, 3), dtype=np.uint8)
    for i, a in enumerate(arrays):
        top, left = pad + (i // cols) * (H + pad), pad + (i % cols) * (W + pad)
        grid[..., top:top + a.shape[-3], left:left + a.shape[-2], :] = a
    return grid, dict(rows=rows, cols=cols, cell_height=H, cell_width=W, pad=pad)


def write_png(path, array):
    """uint8 (H, W, 3) or (H, W) -> PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(array)).save(tmp, format="PNG")


def write_video(path, frames, fps):
    """uint8 (T, H, W, 3) -> H.264 MP4 at `fps`, atomically; sides padded to even sizes for yuv420p."""
    T, H, W, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))
    with atomic_path(path) as tmp:
        imageio.mimwrite(tmp, list(frames), fps=fps, codec="libx264", macro_block_size=1, quality=None,
                         ffmpeg_params=["-crf", "10"], ffmpeg_log_level="error")
