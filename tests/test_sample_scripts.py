"""The launcher scripts under torchrun (1 and 2 processes, CPU/gloo) and the grid-splitting scripts."""
import json
import os
import subprocess

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

import sample
from scripts import extract_image_from_video, extract_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, model, out, nprocs, *args):
    env = dict(os.environ, CONFIG=model["config"], CKPT=model["pth"], OUTPUT_DIR=str(out), NGPUS=str(nprocs),
               OMP_NUM_THREADS="1", PATH=os.path.dirname(os.sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(["bash", f"scripts/{script}", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


def load(path):
    with open(path) as f:
        return json.load(f)


def test_image_script_and_grid_split(tiny_t2i, tmp_path):
    out = launch("test_sample_image.sh", tiny_t2i, tmp_path / "img", 1, "a film still of a cat playing piano")
    stem = "a_film_still_of_a_cat_playing_piano"
    singles = [np.asarray(Image.open(out / f"{stem}_{i:04d}.png")) for i in range(8)]  # --sample_batch_size 8
    assert all(s.shape == (32, 32, 3) for s in singles)
    info = load(out / f"{stem}_0003.json")
    assert (info["seed"], info["cfg"], info["jacobi_block_size"]) == (999 + 3, 3.6, 16)
    grid = out / f"{stem}_grid.png"
    assert Image.open(grid).size == (4 * 34 + 2, 2 * 34 + 2)  # 2 rows x 4 columns, as the original
    assert extract_images.main([str(grid), "--output_dir", str(tmp_path / "cells")]) == 0
    for i in range(8):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "cells" / f"{stem}_grid_cell{i:02d}.png")), singles[i])
    os.remove(out / f"{stem}_grid.json")  # without the JSON: separators or the cell size give the same cells
    for flags in ([], ["-H", "32", "-W", "32"]):
        assert extract_images.main([str(grid), "--ids", "6", "1", "--output_dir", str(tmp_path / "x"), *flags]) == 0
        assert np.array_equal(np.asarray(Image.open(tmp_path / "x" / f"{stem}_grid_cell06.png")), singles[6])
    strip = np.asarray(Image.open(tmp_path / "x" / f"{stem}_grid_extracted.png"))
    assert strip.shape == (36, 2 * 34 + 2, 3) and np.array_equal(strip[2:34, 36:68], singles[1])


def test_video_script_two_ranks_split_prompts_long_video(tiny_t2v, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\na handwritten digit seven\n")
    flags = ["--cfg", 2, "--context_length", 1]
    out = launch("test_sample_video.sh", tiny_t2v, tmp_path / "dist", 2, prompts, "none", 9, *flags)
    infos = [load(out / f"prompts_{i:04d}.json") for i in range(3)]
    assert [i["prompt"] for i in infos] == ["a red circle", "a blue square", "a handwritten digit seven"]
    assert [i["rank"] for i in infos] == [0, 1, 0]  # one prompt per rank per round; rank 1 pads the last round
    assert [(i["width"], i["height"], i["frames"], i["fps"]) for i in infos] == [(48, 32, 9, 16)] * 3
    single = tmp_path / "single"
    assert sample.main(["--model_config_path", tiny_t2v["config"], "--checkpoint_path", tiny_t2v["pth"],
                        "--caption", str(prompts), "--sample_batch_size", "1", "--cfg", "2", "--aspect_ratio", "16:9",
                        "--seed", "99", "--out_fps", "16", "--jacobi", "1", "--jacobi_th", "0.001",
                        "--jacobi_block_size", "32", "--target_length", "9", "--context_length", "1",
                        "--output_dir", str(single)]) == 0
    for i in range(3):
        a = np.stack(imageio.mimread(out / f"prompts_{i:04d}.mp4")).astype(int)
        b = np.stack(imageio.mimread(single / f"prompts_{i:04d}.mp4")).astype(int)
        assert a.shape == b.shape == (9, 32, 48, 3) and np.abs(a - b).mean() < 2  # same per-sample seeds
    # the grid video splits back into the three videos (lossy codec: compare loosely)
    assert extract_image_from_video.main([str(out / "prompts_grid.mp4"), str(tmp_path / "cells")]) == 0
    grid = np.stack(imageio.mimread(out / "prompts_grid.mp4")).astype(int)
    assert grid.shape == (9, 3 * 34 + 2, 48 + 4, 3)  # 3 rows x 1 column
    for i in range(3):
        cell = np.stack(imageio.mimread(tmp_path / "cells" / f"video_{i:02d}_r{i}_c0.mp4")).astype(int)
        first = np.asarray(Image.open(tmp_path / "cells" / f"video_{i:02d}_r{i}_c0" / "frame_000000.png"))
        assert cell.shape == (9, 32, 48, 3) and len(os.listdir(tmp_path / "cells" / f"video_{i:02d}_r{i}_c0")) == 9
        region = grid[:, 2 + i * 34:2 + i * 34 + 32, 2:50]
        assert np.array_equal(first, region[0]) and np.abs(cell - region).mean() < 3


@pytest.mark.parametrize("script,args,echo", [
    ("test_sample_image.sh", ["a red fox"], "caption: a red fox | input image: none"),
    ("test_sample_video.sh", ["a red fox", "none", "161"], "caption: a red fox | input image: none | frames: 161"),
])
def test_scripts_read_their_positional_arguments(script, args, echo, tmp_path):
    """The original positional arguments are read as documented; a missing checkpoint is one error line."""
    env = dict(os.environ, CKPT=str(tmp_path / "missing.pth"), NGPUS="1")
    proc = subprocess.run(["bash", f"scripts/{script}", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and echo in proc.stdout
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing.pth'} not found (the official checkpoints are at " \
                                  "huggingface.co/apple/starflow: download them into ckpts/)"
