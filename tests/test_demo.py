"""The shipped MNIST demo: its checkpoint loads with its config and draws the prompted colour (a few seconds)."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import sample
from dataset import COLOURS, MNISTDataset
from utils.config import load_config
from utils.pipeline import STARFlowPipeline

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "checkpoints" / "demo_mnist_t2i"
sys.path.insert(0, str(ROOT / "bench"))
from demo_quality import COLOUR_NAMES, colour_of, score  # noqa: E402


def test_demo_config_matches_shipped_config():
    """The shipped weights were trained from configs/demo_mnist_t2i.yaml: every model and data key agrees."""
    recipe = load_config(ROOT / "configs" / "demo_mnist_t2i.yaml").to_dict()
    shipped = load_config(DEMO / "config.yaml").to_dict()
    differ = {k for k in recipe if recipe[k] != shipped[k]} - {"model_config_path", "logdir", "text"}
    assert not differ, {k: (recipe[k], shipped[k]) for k in differ}
    assert shipped["text"] == "sentence-transformers/all-MiniLM-L6-v2"  # resolves offline, on any machine


def test_shipped_checkpoint_samples_prompted_colours():
    pipe = STARFlowPipeline.from_pretrained(DEMO / "config.yaml", DEMO, device="cpu")
    prompts = ["a green seven", "the digit 3 in red", "a blue handwritten digit one", "a purple four"]
    out = pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))])
    size = pipe.config.img_size
    assert [im.size for im in out.images] == [(size, size)] * len(prompts)
    images = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in out.images])
    assert (images.amax(1) > 0.5).float().mean((1, 2)).min() > 0.03  # every image has ink
    assert [COLOUR_NAMES[i] for i in colour_of(images)] == ["green", "red", "blue", "purple"]


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
