"""Image geometry and media files: aspect buckets, crop and resize, uint8 conversion, grids, PNG and MP4 writing.

The one place that turns tensors into pictures and pictures into tensors, below the data, the pipeline and the
entry points. Pixels are float in [-1, 1], channels first; pictures are uint8, channels last.
"""
import errno
import math
import os
import shutil
import struct

import imageio.v2 as imageio
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.errors import UserError, first_line
from utils.files import atomic_path

ASPECT_RATIOS = ["1:1", "2:3", "3:2", "16:9", "9:16", "4:5", "5:4", "21:9", "9:21"]  # W:H, the trained buckets
MAX_ASPECT = 8.0
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}  # what data and image folders read
VIDEO_EXTS = {".mp4", ".webm", ".mov", ".avi", ".mkv"}  # what video data folders read


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


def crop_resize(img, size, flip=False, resample=Image.Resampling.BICUBIC):
    """Centre-crop a PIL image to the aspect of size=(h, w), resize (bicubic), optionally flip; (3, h, w) in [-1, 1]."""
    h, w = size
    W, H = img.size
    if W * h > H * w:  # too wide
        cw = round(H * w / h)
        img = img.crop(((W - cw) // 2, 0, (W - cw) // 2 + cw, H))
    else:
        ch = round(W * h / w)
        img = img.crop((0, (H - ch) // 2, W, (H - ch) // 2 + ch))
    img = img.resize((w, h), resample)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).clamp_(-1, 1)


EXIF_ORIENTATION = 0x0112  # its values 5..8 store the picture turned by 90 degrees


def upright_size(image):
    """(w, h) of a PIL image as a viewer shows it: swapped when its EXIF orientation turns it by 90 degrees."""
    w, h = image.size
    return (h, w) if image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8) else (w, h)


def to_rgb(image):
    """A PIL image of any mode as 8-bit RGB, upright (its EXIF orientation applied, as a viewer and diffusers'
    load_image do: phone photos are stored turned). 16-bit greyscale (modes I;16*, and I as PNG loads it) is scaled by
    255/65535 and float greyscale (F) in [0, 1] by 255: PIL's own convert clips them at 255 (mid-grey turns white)."""
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # (exif_transpose would copy an upright picture too)
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        grey = np.asarray(image).astype(np.float64)
        if image.mode == "F":
            grey = grey * 255 if grey.size and grey.max() <= 1.0 else grey
        else:
            grey = grey * (255 / 65535)
        image = Image.fromarray(np.clip(grey.round(), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def check_image(image, what="input image"):
    """UserError unless `image` is a PIL image or names a file that PIL can read as an image (header only)."""
    if isinstance(image, Image.Image):
        return
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"{what.replace(' ', '_')} must be a path or a PIL image, got {type(image).__name__}")
    if not os.path.isfile(image):
        raise UserError(f"{what} '{image}' not found" if not os.path.isdir(image) else
                        f"{what} '{image}' is a folder; pass an image file")
    open_image(image, what, header_only=True)


def open_image(image, what="input image", header_only=False):
    """A path or PIL image -> 8-bit RGB PIL image; a missing or unreadable file is one clear error."""
    if not header_only:
        check_image(image, what)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    try:
        with Image.open(image) as f:
            return None if header_only else to_rgb(f)
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read {what} '{image}': {e}; pass a PNG/JPEG/WebP file") from None


def load_image(image, size):
    """A path or PIL image -> (1, 3, h, w) in [-1, 1], centre-cropped to the aspect of size=(h, w) and resized."""
    return crop_resize(open_image(image), size)[None]


def load_mask(mask, image, size):
    """A mask drawn on the image's canvas (white = regenerate) -> (h, w) bool at size=(h, w), cropped like the image;
    a pixel is masked where any of the image pixels it covers is."""
    mask, image = open_image(mask, "mask"), open_image(image)
    if mask.size != image.size:
        raise UserError(f"the mask is {mask.size[0]}x{mask.size[1]} px but the image is {image.size[0]}x"
                        f"{image.size[1]}; draw the mask on a canvas of the image's size")
    grey = mask.convert("L").point(lambda v: 255 if v >= 128 else 0)
    covered = crop_resize(grey.convert("RGB"), size, resample=Image.Resampling.BOX)[0] > -1
    if not covered.any():
        raise UserError("the mask is empty (no white pixels): paint the region to regenerate white")
    return covered


def read_frames(video, max_frames=None, what="input video"):
    """The first max_frames frames (all where None) of an MP4 or any ffmpeg-readable video, uint8 RGB (T, H, W, 3)."""
    if not os.path.isfile(video):
        raise UserError(f"{what} '{video}' not found")
    try:
        with imageio.get_reader(video, "ffmpeg") as reader:
            frames = []
            for frame in reader:
                frames.append(np.asarray(Image.fromarray(frame).convert("RGB")))
                if len(frames) == max_frames:
                    break
    except (OSError, RuntimeError, ValueError, IndexError) as e:
        raise UserError(f"cannot read {what} '{video}': {first_line(e)}; pass an MP4 file") from None
    if not frames:
        raise UserError(f"{what} '{video}' has no frames")
    return np.stack(frames)


def load_video(video, size, max_frames=None):
    """An MP4 (or any ffmpeg-readable video) -> (T, 3, h, w) in [-1, 1], each frame cropped and resized like an
    image; at most max_frames frames from the start."""
    return torch.stack([crop_resize(Image.fromarray(frame), size) for frame in read_frames(video, max_frames)])


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
    """uint8 (T, H, W, 3) -> H.264 MP4 at `fps`, atomically; sides padded to even sizes for yuv420p. ffmpeg's
    failures (a full disk) do not reach imageio's caller, so the file is checked to be a whole MP4 before it
    takes its name."""
    T, H, W, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))
    with atomic_path(path) as tmp:
        try:
            imageio.mimwrite(tmp, list(frames), fps=fps, codec="libx264", macro_block_size=1, quality=None,
                             ffmpeg_params=["-crf", "10"], ffmpeg_log_level="error")
        except OSError:  # ffmpeg died (a broken pipe); whether the disk is full is decided below
            pass
        if not mp4_complete(tmp):
            if shutil.disk_usage(os.path.dirname(tmp)).free < max(2**20, frames.nbytes // 100):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            raise UserError(f"ffmpeg could not write a complete video {path} (its message is above)")


def mp4_complete(path):
    """True when `path` is a whole MP4: its top-level boxes tile the file and include ftyp, mdat and moov (which
    ffmpeg writes last)."""
    if not os.path.isfile(path):
        return False
    size, pos, kinds = os.path.getsize(path), 0, set()
    with open(path, "rb") as f:
        while pos < size:
            f.seek(pos)
            head = f.read(16)
            if len(head) < 8:
                return False
            length, kind = struct.unpack(">I4s", head[:8])
            if length == 1 and len(head) == 16:
                length = struct.unpack(">Q", head[8:16])[0]
            elif length == 0:  # the box runs to the end of the file
                length = size - pos
            if length < 8:
                return False
            kinds.add(kind)
            pos += length
    return pos == size and {b"ftyp", b"mdat", b"moov"} <= kinds
