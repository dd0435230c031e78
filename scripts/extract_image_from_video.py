"""Split a grid video into its cells: per cell a folder of PNG frames and a single MP4.

    python scripts/extract_image_from_video.py logs/run/a_corgi_grid.mp4 [output_dir] [-H rows] [-W cols]
    python scripts/extract_image_from_video.py --input_video grid.mp4 --output_dir out/

Writes <output_dir>/video_{id:02d}_r{row}_c{col}/frame_{n:06d}.png and video_{id:02d}_r{row}_c{col}.mp4.
The layout comes from the JSON sample.py writes beside each grid; otherwise from -H/-W (rows, columns), otherwise
from the black separator lines. The default output_dir is <video>_extracted_frames beside the input.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from extract_images import grid_cells, positive, read_frames, read_layout  # noqa: E402
from utils.errors import ArgumentParser, run_cli  # noqa: E402
from utils.files import check_output_dir, make_dir  # noqa: E402
from utils.image import write_png, write_video  # noqa: E402


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", nargs="?", help="grid video (.mp4)")
    parser.add_argument("output", nargs="?", help="output folder")
    parser.add_argument("--input_video", default=None, help="same as the first positional argument")
    parser.add_argument("--output_dir", default=None, help="same as the second positional argument")
    parser.add_argument("-H", "--rows", type=positive, default=None, help="grid rows (grids without JSON)")
    parser.add_argument("-W", "--cols", type=positive, default=None, help="grid columns (grids without JSON)")
    args = parser.parse_args(argv)
    video = args.input_video or args.input
    if not video:
        parser.error("give the grid video as the first argument or with --input_video")
    out_dir = args.output_dir or args.output or os.path.splitext(video)[0] + "_extracted_frames"
    check_output_dir(out_dir)
    frames, fps = read_frames(video)
    layout = read_layout(video)
    boxes = grid_cells(frames, layout, rows=args.rows, cols=args.cols)
    cols = layout["cols"] if layout else (args.cols or len({left for _, left, _, _ in boxes}))
    for i, (top, left, h, w) in enumerate(boxes):
        name = os.path.join(out_dir, f"video_{i:02d}_r{i // cols}_c{i % cols}")
        make_dir(name)
        cell = frames[:, top:top + h, left:left + w]
        for n, frame in enumerate(cell):
            write_png(os.path.join(name, f"frame_{n:06d}.png"), frame)
        write_video(name + ".mp4", cell, fps or 16)
    print(f"wrote {len(boxes)} video(s) to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
