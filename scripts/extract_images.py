"""Split a sample grid (PNG, or MP4 for videos) into single images, and optionally re-tile chosen cells.

    python scripts/extract_images.py logs/run/a_cat_grid.png                 # every cell -> a_cat_grid_cell00.png ...
    python scripts/extract_images.py a_cat_grid.png --ids 0 3 5              # + a_cat_grid_extracted.png of those
    python scripts/extract_images.py old_grid.png -H 256 -W 256              # cell size of a grid without JSON
    python scripts/extract_images.py a_dog_grid.mp4                          # video grid -> one MP4 per cell

The layout comes from the JSON sample.py writes beside each grid; otherwise from -H/-W (cell size, 2 px padding),
otherwise from the black separator lines.
"""
import argparse
import json
import os
import sys

import imageio.v2 as imageio
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.errors import ArgumentParser, UserError, first_line, run_cli  # noqa: E402
from utils.files import make_dir, read_text  # noqa: E402
from utils.image import write_png, write_video  # noqa: E402

PAD = 2
DARK = 24  # separators are black; lossy video codecs lift them a little


def _spans(is_content):
    """[(start, length)] of the runs of True."""
    spans, start = [], None
    for i, c in enumerate(list(is_content) + [False]):
        if c and start is None:
            start = i
        elif not c and start is not None:
            spans.append((start, i - start))
            start = None
    return spans


def grid_cells(frames, layout=None, cell_size=None, rows=None, cols=None, pad=PAD):
    """Boxes (top, left, height, width) of the cells of a grid, row-major. frames: (T, H, W, 3) uint8."""
    H, W = frames.shape[1:3]
    if layout:
        pad, ch, cw = layout["pad"], layout["cell_height"], layout["cell_width"]
        rows, cols = layout["rows"], layout["cols"]
        if rows * (ch + pad) + pad > H or cols * (cw + pad) + pad > W:
            raise UserError(f"the grid JSON describes {rows}x{cols} cells of {ch}x{cw} px ({rows * (ch + pad) + pad}"
                            f"x{cols * (cw + pad) + pad} px with padding) but the picture is {H}x{W} px: the JSON "
                            f"belongs to another grid; remove it, or pass -H/-W")
        boxes = [(pad + r * (ch + pad), pad + c * (cw + pad), ch, cw) for r in range(rows) for c in range(cols)]
        return boxes[:len(layout.get("cells", boxes))]
    if cell_size:
        ch, cw = cell_size
        rows, cols = (H - pad) // (ch + pad), (W - pad) // (cw + pad)
    elif rows and cols:
        ch, cw = (H - pad) // rows - pad, (W - pad) // cols - pad
    else:
        profile = frames.max(axis=(0, 3))
        row_spans, col_spans = _spans(profile.max(axis=1) > DARK), _spans(profile.max(axis=0) > DARK)
        return [(t, left, h, w) for t, h in row_spans for left, w in col_spans]
    if rows < 1 or cols < 1 or ch < 1 or cw < 1:
        raise UserError(f"cells of {ch}x{cw} px in {rows}x{cols} do not fit a {H}x{W} px grid")
    return [(pad + r * (ch + pad), pad + c * (cw + pad), ch, cw) for r in range(rows) for c in range(cols)]


LAYOUT_KEYS = ("rows", "cols", "cell_height", "cell_width", "pad")


def read_layout(path):
    """The grid JSON written by sample.py beside `path`, or None; a JSON that is not a grid layout is a UserError."""
    meta = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(meta):
        return None
    try:
        data = json.loads(read_text(meta, "grid JSON"))
    except json.JSONDecodeError as e:
        raise UserError(f"grid JSON {meta} is not valid JSON ({e.msg}, line {e.lineno}); remove it to split by the "
                        f"black borders, or pass -H/-W") from None
    if not isinstance(data, dict) or "rows" not in data:
        return None  # the JSON of a single sample, not of a grid
    bad = [k for k in LAYOUT_KEYS if not isinstance(data.get(k), int) or isinstance(data.get(k), bool)
           or data[k] < (0 if k == "pad" else 1)]
    if bad or not isinstance(data.get("cells", []), list):
        raise UserError(f"grid JSON {meta} has no valid {', '.join(bad) or 'cells'} (whole numbers, >= 1; pad >= 0); "
                        f"remove it, or pass -H/-W")
    return data


def read_frames(path):
    """(T, H, W, 3) uint8 of an image (T = 1) or a video, and the video fps (None for images)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found")
    try:
        if path.lower().endswith((".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif")):
            reader = imageio.get_reader(path)
            fps = reader.get_meta_data().get("fps", 16)
            return np.stack([f[..., :3] for f in reader]), fps
        image = imageio.imread(path)
    except Exception as e:  # imageio's readers fail in many ways on a file that is not a picture
        raise UserError(f"cannot read {path}: {first_line(e)}; pass a grid PNG or MP4") from None
    image = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]
    return image[None], None


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="grid .png (or .mp4)")
    parser.add_argument("--ids", type=int, nargs="*", default=None, help="cells to keep (row-major, from 0)")
    parser.add_argument("-H", "--height", type=positive, default=None, help="cell height in px (grids without JSON)")
    parser.add_argument("-W", "--width", type=positive, default=None, help="cell width in px (grids without JSON)")
    parser.add_argument("--output_dir", default=None, help="default: beside the input")
    args = parser.parse_args(argv)
    frames, fps = read_frames(args.input)
    cell_size = (args.height or args.width, args.width or args.height) if (args.height or args.width) else None
    boxes = grid_cells(frames, read_layout(args.input), cell_size)
    ids = list(range(len(boxes))) if args.ids is None else args.ids
    bad = [i for i in ids if not 0 <= i < len(boxes)]
    if bad:
        raise UserError(f"ids {bad} are outside the {len(boxes)} cells of this grid (0..{len(boxes) - 1})")
    if not boxes:
        raise UserError(f"found no cells in {args.input} (no black borders); pass the cell size with -H/-W")
    out_dir = make_dir(args.output_dir or os.path.dirname(os.path.abspath(args.input)))
    stem = os.path.join(out_dir, os.path.splitext(os.path.basename(args.input))[0])
    cells = [frames[:, t:t + h, left:left + w] for t, left, h, w in (boxes[i] for i in ids)]
    for i, cell in zip(ids, cells):
        if fps is None:
            write_png(f"{stem}_cell{i:02d}.png", cell[0])
        else:
            write_video(f"{stem}_cell{i:02d}.mp4", cell, fps)
    if args.ids is not None and fps is None:
        h, w = max(c.shape[1] for c in cells), max(c.shape[2] for c in cells)
        strip = np.zeros((h + 2 * PAD, len(cells) * (w + PAD) + PAD, 3), dtype=np.uint8)
        for k, c in enumerate(cells):
            strip[PAD:PAD + c.shape[1], PAD + k * (w + PAD):PAD + k * (w + PAD) + c.shape[2]] = c[0]
        write_png(f"{stem}_extracted.png", strip)
    print(f"wrote {len(cells)} cell(s) to {out_dir}")
    return 0


def positive(text):
    """argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


if __name__ == "__main__":
    sys.exit(run_cli(main))
