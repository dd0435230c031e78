"""Editing, inpainting, interpolation and video continuation by flow inversion (STARFlowPipeline.edit / inpaint /
interpolate / input_video, and sample.py's --edit_image, --input_image --mask, --interpolate_from/_to,
--input_video), on tiny models and the shipped demos."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from utils import recipe
from utils.errors import UserError
from utils.image import write_video
from utils.pipeline import STARFlowPipeline

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "checkpoints" / "demo_mnist_t2i"
VIDEO_DEMO = ROOT / "checkpoints" / "demo_moving_mnist_t2v"


@pytest.fixture(scope="module")
def demo():
    return STARFlowPipeline.from_pretrained(DEMO, device="cpu")


@pytest.fixture(scope="module")
def pictures(demo):
    """Four demo samples of 'a red seven' (16x16 RGB)."""
    out = demo(["a red seven"] * 4, cfg=3, generator=[torch.Generator().manual_seed(i) for i in range(4)])
    return out.images


def lower_half_mask(path, size=16):
    mask = np.zeros((size, size), np.uint8)
    mask[size // 2:] = 255
    Image.fromarray(mask).save(path)
    return path


def gen(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("cfg", [0.0, 3.0])
def test_edit_with_the_same_prompt_gives_the_picture_back(demo, pictures, cfg):
    """Encoding with the guided map that decoding inverts: the same prompt and guidance, no added noise and no
    refresh return the pixels exactly."""
    out = demo.edit(pictures, "a red seven", source_prompt="a red seven", cfg=cfg, noise_std=0, generator=gen(4))
    for a, b in zip(pictures, out.images):
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() == 0
    assert out.denoiser == "none"


def test_noisy_latents_round_trip_exactly(tiny_t2i):
    """A latent model: the noisy latents the flow encodes come back from decoding to float precision."""
    pipe = STARFlowPipeline.from_pretrained(tiny_t2i["config"], tiny_t2i["pth"])
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    out = pipe.edit(image, "a blue square", source_prompt="a blue square", cfg=2.0, generator=gen(1), jacobi=True,
                    jacobi_block_size=4, jacobi_th=1e-12, jacobi_max_iter=64)
    request = pipe.check_inputs(["x"], gen(1), cfg=0.0)
    x0 = pipe.encode_images([image], request)
    noisy = x0 + pipe.config.noise_std * pipe._randn(x0.shape, gen(1))
    torch.testing.assert_close(out.noisy_latents, noisy, atol=1e-4, rtol=0)


def test_video_latents_round_trip_exactly(tiny_t2v):
    """Video: the guided likelihood pass and decoding are each other's inverse, frame-causal blocks included."""
    pipe = STARFlowPipeline.from_pretrained(tiny_t2v["config"], tiny_t2v["pth"])
    request = pipe.check_inputs(["a cat"], gen(2), "16:9", num_samples=2, cfg=2.0)
    _, _, y = pipe.encode_prompt(request, "16:9")
    x = torch.randn(request.latent_shape, generator=torch.Generator().manual_seed(3))
    z, nll = pipe.likelihood(x, y, guidance=2.0)
    assert nll.shape == (2,)
    torch.testing.assert_close(pipe.decode(z, y, request), x, atol=1e-4, rtol=0)


def test_edit_under_another_prompt_changes_colour_not_shape(demo, pictures):
    out = demo.edit(pictures, "a blue seven", source_prompt="a red seven", generator=gen(4))
    before = np.stack([np.asarray(p) for p in pictures]).astype(float) / 255
    after = np.stack([np.asarray(p) for p in out.images]).astype(float) / 255
    assert (after[..., 2] > after[..., 0]).mean() > (before[..., 2] > before[..., 0]).mean()  # blue over red
    ink_before, ink_after = before.max(-1) > 0.25, after.max(-1) > 0.25
    assert (ink_before & ink_after).sum() / (ink_before | ink_after).sum() > 0.3  # much of the stroke stays


def test_refresh_and_blocks_are_checked(demo, pictures):
    with pytest.raises(ValueError, match=r"refresh must be in \[0, 1\]"):
        demo.edit(pictures[0], "a red one", refresh=1.5)
    with pytest.raises(ValueError, match="blocks must be one of all, deep"):
        demo.edit(pictures[0], "a red one", blocks="shallow")
    a = demo.edit(pictures[0], "a red one", blocks="deep", generator=gen(1))  # cond_top_only: the same as all
    b = demo.edit(pictures[0], "a red one", blocks="all", generator=gen(1))
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    c = demo.edit(pictures[0], "a red one", refresh=0.5, generator=gen(1))
    assert not np.array_equal(np.asarray(b.images[0]), np.asarray(c.images[0]))


def test_inpainting_keeps_the_rest_exactly_and_changes_the_hole(demo, pictures, tmp_path):
    mask = lower_half_mask(tmp_path / "mask.png")
    out = demo.inpaint(pictures[0], mask, ["a red one", "a red seven"], cfg=3, generator=gen(2), rounds=2,
                       candidates=2)
    source = np.asarray(pictures[0]).astype(int)
    for image in out.images:
        image = np.asarray(image).astype(int)
        assert np.array_equal(image[:8], source[:8])  # pixel space: outside the mask, the pixels themselves
        assert np.abs(image[8:] - source[8:]).max() > 32
    assert not np.array_equal(np.asarray(out.images[0])[8:], np.asarray(out.images[1])[8:])


def test_inpainting_latents_outside_the_mask_are_exact(tiny_t2i, tmp_path):
    pipe = STARFlowPipeline.from_pretrained(tiny_t2i["config"], tiny_t2i["pth"])
    image = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 20:] = 255  # columns 20.. cover latent columns 2 and 3 (x8 VAE, patch 1)
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = pipe.inpaint(image, tmp_path / "m.png", "a dot", generator=gen(1), rounds=1, candidates=2)
    request = pipe.check_inputs(["x"], gen(1), cfg=0.0)
    x0 = pipe.encode_images([image], request)
    assert torch.equal(out.latents[..., :2], x0[..., :2])
    assert not torch.allclose(out.latents[..., 2:], x0[..., 2:])


@pytest.mark.parametrize("case, match", [
    ("wrong_size", "the mask is 8x8 px but the image is 16x16"),
    ("empty", "the mask is empty"),
    ("not_an_image", "cannot read mask"),
    ("unreadable_image", "cannot read input image"),
])
def test_inpainting_input_errors(demo, pictures, tmp_path, case, match):
    image, mask = pictures[0], tmp_path / "mask.png"
    if case == "wrong_size":
        Image.fromarray(np.full((8, 8), 255, np.uint8)).save(mask)
    elif case == "empty":
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(mask)
    elif case == "not_an_image":
        mask.write_text("not a picture")
    else:
        lower_half_mask(mask)
        image = tmp_path / "broken.png"
        image.write_bytes(b"\x89PNG broken")
    with pytest.raises(UserError, match=match):
        demo.inpaint(image, mask, "a red seven")


def test_editing_needs_a_text_conditional_image_model(demo, pictures):
    encoder, demo.text_encoder = demo.text_encoder, None
    try:
        with pytest.raises(UserError, match="needs a text-conditional model"):
            demo.edit(pictures[0], "a red one")
    finally:
        demo.text_encoder = encoder


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_interpolation_starts_and_ends_at_the_pictures(tiny_t2i, cfg):
    """The path's ends decode to both pictures' noisy latents (the same noise on both) to float precision; the
    points between are the slerp of their encodings, decoded."""
    pipe = STARFlowPipeline.from_pretrained(tiny_t2i["config"], tiny_t2i["pth"])
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(2)]
    out = pipe.interpolate(images, "a blue square", steps=4, cfg=cfg, generator=torch.Generator().manual_seed(5),
                           output_type="latent")
    request = pipe.check_inputs(["a blue square"], cfg=cfg, num_samples=4)
    x0 = pipe.encode_images(images, request)
    noisy = x0 + pipe.config.noise_std * torch.randn((1, *x0.shape[1:]), generator=torch.Generator().manual_seed(5))
    assert out.noisy_latents.shape == (4, *x0.shape[1:])
    torch.testing.assert_close(out.noisy_latents[[0, -1]], noisy, atol=1e-4, rtol=0)
    _, _, y = pipe.encode_prompt(request, None)
    pair = torch.cat([part[:2] for part in y.split(4)])  # the prompt (and the null prompt) for both ends
    z, _ = pipe.likelihood(noisy, pair, cfg)
    torch.testing.assert_close(pipe.likelihood(out.noisy_latents, y, cfg)[0],
                               recipe.slerp(z[0], z[1], [0, 1 / 3, 2 / 3, 1]), atol=1e-4, rtol=0)
    middle = pipe.interpolate(images, "a blue square", steps=[0.5], cfg=cfg,
                              generator=torch.Generator().manual_seed(5), output_type="latent")
    assert (middle.noisy_latents[0] - noisy).flatten(1).abs().max(1).values.min() > 1e-2


def test_interpolating_demo_digits_gives_them_back_at_the_ends(demo, pictures):
    """No added noise and no denoising: the first and last pixels of the path are the pictures', exactly."""
    out = demo.interpolate(pictures[:2], "", steps=5, cfg=0.0, noise_std=0)
    assert out.denoiser == "none" and len(out.images) == 5
    for k, picture in ((0, pictures[0]), (-1, pictures[1])):
        assert np.array_equal(np.asarray(out.images[k]), np.asarray(picture))
    assert not np.array_equal(np.asarray(out.images[2]), np.asarray(pictures[0]))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(steps=1), ValueError, r"steps must be at least 2 \(the two pictures\), got 1"),
    (dict(steps=[0.5, 1.5]), ValueError, r"steps must be a count \(>= 2\) or a non-empty list of fractions in"),
    (dict(images="one"), ValueError, r"interpolate takes two pictures"),
    (dict(prompt=["a", "b"]), TypeError, r"prompt must be a string \(one prompt for the whole path\)"),
    (dict(generator=[torch.Generator()]), TypeError, r"generator must be one torch.Generator"),
])
def test_interpolation_input_errors(demo, pictures, kwargs, error, match):
    call = {"images": pictures[:2], "prompt": "a red seven", **kwargs}
    with pytest.raises(error, match=match):
        demo.interpolate(**call)


def test_interpolating_videos_starts_and_ends_at_the_clips(tiny_t2v, tmp_path):
    """A video model's path joins two clips: its ends decode to the clips' noisy latents (the Wan-style VAE's
    5 frames -> 2 latent frames); a clip shorter than the model's is one clear error."""
    pipe = STARFlowPipeline.from_pretrained(tiny_t2v["config"], tiny_t2v["pth"])
    clips = [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    make_clip(clips[0], 5, 32)
    write_video(clips[1], make_clip(tmp_path / "c.mp4", 5, 32)[::-1].copy(), 5)  # the square moving left
    out = pipe.interpolate(clips, "a square", steps=3, cfg=2.0, generator=torch.Generator().manual_seed(1))
    request = pipe.check_inputs(["a square"], cfg=2.0, num_samples=3)
    x0 = pipe.encode_clips(clips, request)
    noisy = x0 + pipe.config.noise_std * torch.randn((1, *x0.shape[1:]), generator=torch.Generator().manual_seed(1))
    assert x0.shape == (2, *request.latent_shape[1:]) and len(out.frames) == 3 and len(out.frames[0]) == 5
    torch.testing.assert_close(out.noisy_latents[[0, -1]], noisy, atol=1e-4, rtol=0)
    make_clip(tmp_path / "short.mp4", 3, 32)
    with pytest.raises(UserError, match="short.mp4' has 3 frames; this model's clips have 5"):
        pipe.interpolate([clips[0], tmp_path / "short.mp4"], "a square")
    with pytest.raises(UserError, match="interpolating videos takes two video files"):
        pipe.interpolate([clips[0], Image.new("RGB", (32, 32))], "a square")


def make_clip(path, frames, size):
    """A bright square moving right on black, (frames, size, size, 3) uint8, written as MP4."""
    clip = np.zeros((frames, size, size, 3), np.uint8)
    for t in range(frames):
        clip[t, 6:12, 2 + 2 * t:8 + 2 * t] = 255
    write_video(path, clip, 5)
    return clip


def test_video_continuation_keeps_the_observed_frames(tmp_path):
    pipe = STARFlowPipeline.from_pretrained(VIDEO_DEMO, device="cpu")
    make_clip(tmp_path / "clip.mp4", 3, pipe.config.img_size)
    request = pipe.check_inputs(["a one moving right"], gen(2), num_samples=2, input_video=tmp_path / "clip.mp4")
    pipe.prepare_noise(request)  # the call draws the sample's noise first, then the clip's
    known = pipe.encode_video_prefix(request, tmp_path / "clip.mp4")
    out = pipe(["a one moving right"], num_samples=2, generator=gen(2), input_video=tmp_path / "clip.mp4")
    assert known.shape[1] == 3 and len(out.frames[0]) == 5
    assert torch.equal(out.noisy_latents[:, :3], known.float())
    assert not torch.equal(out.noisy_latents[:, 3:], out.noisy_latents[:, 2:3].expand(-1, 2, -1, -1, -1))


@pytest.mark.parametrize("case, match", [
    ("one_frame", "target_length 1 leaves no frame to generate; ask for at least 2 frames"),
    ("damaged", "cannot read input video .*; pass an MP4 file"),
])
def test_video_continuation_input_errors(tmp_path, case, match):
    pipe = STARFlowPipeline.from_pretrained(VIDEO_DEMO, device="cpu")
    clip = tmp_path / "clip.mp4"
    if case == "damaged":
        clip.write_bytes(b"not a video")
    else:
        make_clip(clip, 3, pipe.config.img_size)
    with pytest.raises(UserError, match=match) as error:
        pipe("a one moving right", input_video=clip, target_length=1 if case == "one_frame" else None)
    assert "\n" not in str(error.value)  # not ffmpeg's whole log


def test_sample_cli_edit_inpaint_and_continue(demo, pictures, tmp_path):
    pictures[0].save(tmp_path / "seven.png")
    lower_half_mask(tmp_path / "mask.png")
    edit = ["--checkpoint_path", str(DEMO), "--caption", "a blue seven", "--edit_image", str(tmp_path / "seven.png"),
            "--source_caption", "a red seven", "--num_samples", "2", "--output_dir", str(tmp_path / "edit")]
    assert sample.main(edit) == 0
    info = json.loads((tmp_path / "edit" / "a_blue_seven_0001.json").read_text())
    assert (info["mode"], info["source_image"], info["source_caption"]) == ("edit", str(tmp_path / "seven.png"),
                                                                           "a red seven")
    inpaint = ["--checkpoint_path", str(DEMO), "--caption", "a red one", "--input_image", str(tmp_path / "seven.png"),
               "--mask", str(tmp_path / "mask.png"), "--num_samples", "1", "--inpaint_rounds", "1",
               "--output_dir", str(tmp_path / "inpaint")]
    assert sample.main(inpaint) == 0
    info = json.loads((tmp_path / "inpaint" / "a_red_one_0000.json").read_text())
    assert (info["mode"], info["mask"], info["inpaint_rounds"]) == ("inpaint", str(tmp_path / "mask.png"), 1)
    make_clip(tmp_path / "clip.mp4", 3, 20)
    video = ["--checkpoint_path", str(VIDEO_DEMO), "--caption", "a one moving right", "--input_video",
             str(tmp_path / "clip.mp4"), "--num_samples", "1", "--output_dir", str(tmp_path / "video")]
    assert sample.main(video) == 0
    assert json.loads((tmp_path / "video" / "a_one_moving_right_0000.json").read_text())["input_video"] == \
        str(tmp_path / "clip.mp4")


def test_sample_cli_interpolates(demo, pictures, tmp_path):
    """sample.py draws the path as --num_samples points, each JSON says where on it, and the grid is the path;
    regenerating gives the same path."""
    for k in range(2):
        pictures[k].save(tmp_path / f"seven{k}.png")
    argv = ["--checkpoint_path", str(DEMO), "--caption", "a red seven", "--interpolate_from",
            str(tmp_path / "seven0.png"), "--interpolate_to", str(tmp_path / "seven1.png"), "--num_samples", "4",
            "--sample_batch_size", "3", "--seed", "7", "--output_dir", str(tmp_path / "path")]
    assert sample.main(argv) == 0
    infos = [json.loads((tmp_path / "path" / f"a_red_seven_{i:04d}.json").read_text()) for i in range(4)]
    assert [i["fraction"] for i in infos] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert {i["seed"] for i in infos} == {7} and {i["mode"] for i in infos} == {"interpolate"}
    assert (tmp_path / "path" / "a_red_seven_grid.png").is_file()
    command = shlex.split(infos[2]["command"])
    assert command[command.index("--num_samples") + 1] == "4" and command[command.index("--seed") + 1] == "7"
    assert sample.main(command[2:]) == 0
    for i in range(4):
        again = Image.open(tmp_path / "path" / "regenerated" / f"a_red_seven_{i:04d}.png")
        assert np.array_equal(np.asarray(again), np.asarray(Image.open(tmp_path / "path" / f"a_red_seven_{i:04d}.png")))


def test_interpolation_under_torchrun_equals_one_process(pictures, tmp_path):
    """Two ranks share a path's points (rounds of 2 x 2, the last padded) and draw the same pixels as one process."""
    for k in range(2):
        pictures[k].save(tmp_path / f"seven{k}.png")
    flags = ["--checkpoint_path", str(DEMO), "--caption", "a red seven", "--interpolate_from",
             str(tmp_path / "seven0.png"), "--interpolate_to", str(tmp_path / "seven1.png"), "--num_samples", "5",
             "--sample_batch_size", "2", "--jacobi", "0"]
    assert sample.main(flags + ["--output_dir", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "sample.py", *flags, "--output_dir", str(tmp_path / "two")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for i in range(5):
        one, two = (np.asarray(Image.open(tmp_path / d / f"a_red_seven_{i:04d}.png")) for d in ("one", "two"))
        assert np.array_equal(one, two), i
    assert [json.loads((tmp_path / "two" / f"a_red_seven_{i:04d}.json").read_text())["rank"] for i in range(5)] == \
        [0, 0, 1, 1, 0]


def test_sample_cli_interpolates_clips(tmp_path):
    """sample.py on the video demo: a path between two clips, an MP4 per point and the grid MP4."""
    make_clip(tmp_path / "a.mp4", 5, 20)
    write_video(tmp_path / "b.mp4", make_clip(tmp_path / "c.mp4", 5, 20)[::-1].copy(), 5)
    argv = ["--checkpoint_path", str(VIDEO_DEMO), "--caption", "", "--cfg", "0", "--interpolate_from",
            str(tmp_path / "a.mp4"), "--interpolate_to", str(tmp_path / "b.mp4"), "--num_samples", "3",
            "--output_dir", str(tmp_path / "path")]
    assert sample.main(argv) == 0
    infos = [json.loads((tmp_path / "path" / f"unconditional_{i:04d}.json").read_text()) for i in range(3)]
    assert [i["fraction"] for i in infos] == [0.0, 0.5, 1.0] and {i["frames"] for i in infos} == {5}
    assert (tmp_path / "path" / "unconditional_grid.mp4").is_file()
    with pytest.raises(UserError, match="interpolation draws clips of the training length"):
        sample.main(argv + ["--target_length", "9"])


@pytest.mark.parametrize("flags, match", [
    (["--mask", "m.png"], "--mask inpaints --input_image"),
    (["--edit_image", "a.png", "--input_video", "v.mp4"], "separate modes"),
    (["--edit_image", "missing.png"], "'edit_image': 'missing.png' does not exist"),
    (["--edit_refresh", "2"], "edit_refresh' must be between 0.0 and 1.0"),
    (["--interpolate_from", "a.png"], "interpolation needs both ends: give --interpolate_from and --interpolate_to"),
    (["--interpolate_from", "a.png", "--interpolate_to", "a.png", "--num_samples", "1"],
     "interpolation draws one path of --num_samples points, both ends included"),
    (["--interpolate_from", "a.png", "--interpolate_to", "a.png", "--edit_image", "a.png"], "separate modes"),
    (["--interpolate_from", "a.png", "--interpolate_to", "a.png", "--aspect_ratio", "random"],
     "--aspect_ratio random picks a size per batch, and a path's points share one"),
    (["--interpolate_from", "a.png", "--interpolate_to", "a.png", "--prior_temp", "0.8"],
     "--prior_temp scales the noise that sampling starts from"),
])
def test_sample_cli_mode_errors(flags, match, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "m.png", "v.mp4"):
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.setattr("sys.argv", ["sample.py", "--checkpoint_path", str(DEMO), "--caption", "a red seven", *flags])
    with pytest.raises(SystemExit) as exit_info:
        sample.cli()
    assert exit_info.value.code == 2 and match in capsys.readouterr().err
