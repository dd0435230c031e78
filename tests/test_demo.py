"""The shipped MNIST demos: their checkpoints load with their configs and draw the prompted digit with a clean black
background, in the prompted colour (text to image) or moving the prompted way (text to video), in a few seconds."""
import json
import os
import sys
from pathlib import Path

import imageio
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sample
from dataset import COLOURS, DIGIT_NAMES, DIRECTIONS, MNISTDataset, MovingMNISTDataset, moving_digit_size
from utils.config import load_config, parse_vid_size
from utils.pipeline import STARFlowPipeline

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "checkpoints" / "demo_mnist_t2i"
VIDEO_DEMO = ROOT / "checkpoints" / "demo_moving_mnist_t2v"
sys.path.insert(0, str(ROOT / "bench"))
import demo_quality  # noqa: E402
from demo_quality import COLOUR_NAMES, colour_of, ink, mnist_at, pixel_noise, score  # noqa: E402
from demo_video_quality import DIRECTION_NAMES, digit_windows, direction_of  # noqa: E402

# Pixel noise (background std) of these samples: one score step of denoising leaves 0.005, the demos' 8 leave 0.0023.
MAX_BACKGROUND_STD = 0.004
# The video demo's learned self-denoiser leaves 0.0017 on its 10 clips below, its flow's 8 score steps 0.0036.
MAX_VIDEO_BACKGROUND_STD = 0.0028


def nearest_digits(pictures, size):
    """The labels of the MNIST train digits nearest (cosine) to (N, 1, size, size) pictures: no classifier to train."""
    train, labels = mnist_at(size, "train")
    unit = lambda x: F.normalize(x.flatten(1), dim=1)  # noqa: E731
    return labels[(unit(pictures) @ unit(train).T).argmax(1)]


def test_a_benchmark_process_starts_as_the_entry_points_do(monkeypatch):
    """The demo benchmarks time what sample.py and evaluate.py run: their threads, and freed memory kept."""
    kept = []
    monkeypatch.setattr(demo_quality, "retain_freed_memory", lambda: kept.append(True) or True)
    threads = torch.get_num_threads()
    try:
        demo_quality.start_process(1)
        assert torch.get_num_threads() == 1 and kept == [True]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["demo_mnist_t2i", "demo_moving_mnist_t2v"])
def test_demo_config_matches_shipped_config(name):
    """The shipped weights were trained from configs/<name>.yaml: every model and data key agrees."""
    recipe = load_config(ROOT / "configs" / f"{name}.yaml").to_dict()
    shipped = load_config(ROOT / "checkpoints" / name / "config.yaml").to_dict()
    differ = {k for k in recipe if recipe[k] != shipped[k]} - {"model_config_path", "logdir", "wandb_name", "text"}
    assert not differ, {k: (recipe[k], shipped[k]) for k in differ}
    assert shipped["text"] == "sentence-transformers/all-MiniLM-L6-v2"  # resolves offline, on any machine


def test_shipped_checkpoint_draws_prompted_digits_and_colours_on_black():
    pipe = STARFlowPipeline.from_pretrained(DEMO, device="cpu")
    colours = [COLOUR_NAMES[d % len(COLOUR_NAMES)] for d in range(10)]
    prompts = [f"a {colour} {DIGIT_NAMES[d]}" for d, colour in enumerate(colours)]
    out = pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))])
    size = pipe.config.img_size
    assert [im.size for im in out.images] == [(size, size)] * len(prompts)
    images = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in out.images])
    assert (images.amax(1) > 0.5).float().mean((1, 2)).min() > 0.03  # every image has ink
    assert [COLOUR_NAMES[i] for i in colour_of(images)] == colours
    assert (nearest_digits(ink(images), size) == torch.arange(10)).sum() >= 9
    assert pixel_noise(images)["background_std"] < MAX_BACKGROUND_STD


def test_sample_cli_with_the_demo_checkpoint_writes_pngs(tmp_path):
    argv = ["--checkpoint_path", str(DEMO), "--caption", "a green seven", "--num_samples", "2",
            "--output_dir", str(tmp_path)]
    assert sample.main(argv) == 0
    size = load_config(DEMO / "config.yaml").img_size
    for i in range(2):
        assert Image.open(tmp_path / f"a_green_seven_{i:04d}.png").size == (size, size)
        assert json.load(open(tmp_path / f"a_green_seven_{i:04d}.json"))["prompt"] == "a green seven"
    assert os.path.isfile(tmp_path / "a_green_seven_grid.png")


def test_quality_scoring_on_real_tinted_digits():
    """The benchmark's colour rule and scoring give full marks to real tinted test digits and none to wrong tints."""
    data = MNISTDataset(16, colour=True, split="test")
    items = [data.load(i, seed=0) for i in range(60)]
    images = torch.stack([(p + 1) / 2 for p, _, _ in items])
    tints = [meta["key"].split(":")[1] for _, _, meta in items]
    assert [COLOUR_NAMES[i] for i in colour_of(images)] == tints

    class Oracle(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.from_numpy(data.labels[:60]), 10).float()

    prompts = [(int(data.labels[i]), tints[i], "") for i in range(60)]
    holdout = {prompts[0][:2]}
    result = score(Oracle(), images, prompts, holdout)
    assert result["all"] == {"digit": 1.0, "colour": 1.0, "both": 1.0, "n": 60}
    assert result["held_out"]["n"] == sum(p[:2] in holdout for p in prompts)
    wrong = [(d, COLOUR_NAMES[(COLOUR_NAMES.index(c) + 1) % len(COLOURS)], "") for d, c, _ in prompts]
    assert score(Oracle(), images, wrong, holdout)["all"]["colour"] == 0.0


def test_shipped_video_checkpoint_moves_digits_as_prompted(tmp_path):
    """sample.py on the video demo writes MP4s whose digits move the prompted way."""
    captions = ["a seven moving left", "a three moving up", "a one moving right", "a zero moving down"]
    (tmp_path / "prompts.txt").write_text("\n".join(captions))
    argv = ["--checkpoint_path", str(VIDEO_DEMO), "--caption", str(tmp_path / "prompts.txt"), "--num_samples", "1",
            "--output_dir", str(tmp_path / "out")]
    assert sample.main(argv) == 0
    config = load_config(VIDEO_DEMO / "config.yaml")
    frames, _ = parse_vid_size(config.vid_size)
    clips = torch.stack([torch.from_numpy(np.stack(imageio.mimread(tmp_path / "out" / f"prompts_{i:04d}.mp4")))
                         for i in range(len(captions))]).permute(0, 1, 4, 2, 3).float() / 255
    assert clips.shape == (len(captions), frames, 3, config.img_size, config.img_size)
    assert [DIRECTION_NAMES[i] for i in direction_of(clips)] == ["left", "up", "right", "down"]
    assert os.path.isfile(tmp_path / "out" / "prompts_grid.mp4")


def test_shipped_video_checkpoint_draws_prompted_digits_on_black():
    """Every digit, each moving one of the four ways: the frames show the prompted digit on a clean background."""
    pipe = STARFlowPipeline.from_pretrained(VIDEO_DEMO, device="cpu")
    directions = [DIRECTION_NAMES[d % len(DIRECTION_NAMES)] for d in range(10)]
    prompts = [f"a {DIGIT_NAMES[d]} moving {direction}" for d, direction in enumerate(directions)]
    out = pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))], output_type="np")
    clips = torch.from_numpy(out.frames).permute(0, 1, 4, 2, 3).float() / 255
    assert out.denoiser == "learned"
    assert [DIRECTION_NAMES[i] for i in direction_of(clips)] == directions
    size = moving_digit_size(pipe.config.img_size)
    frames = nearest_digits(digit_windows(clips, size).flatten(0, 1), size).view(len(prompts), -1)
    assert ((frames == torch.arange(10)[:, None]).float().mean(1) > 0.5).sum() >= 9  # most frames show the digit
    assert pixel_noise(clips.flatten(0, 1))["background_std"] < MAX_VIDEO_BACKGROUND_STD


def test_video_quality_scoring_on_real_clips():
    """The video benchmark reads the direction of every real moving-MNIST clip and crops the whole digit."""
    data = MovingMNISTDataset(24, 6, 6.0, split="test")
    items = [data.load(i, seed=1) for i in range(40)]
    clips = torch.stack([(p + 1) / 2 for p, _, _ in items])
    assert [DIRECTION_NAMES[i] for i in direction_of(clips)] == [meta["key"].split(":")[1] for _, _, meta in items]
    windows = digit_windows(clips, data.digit_size)
    assert torch.allclose(windows.sum((2, 3, 4)), clips.amax(2).sum((2, 3)), atol=1e-4)
    assert set(DIRECTION_NAMES) == set(DIRECTIONS)
