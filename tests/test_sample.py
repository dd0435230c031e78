"""sample.py end to end on tiny random models: T2I, T2V, TI2V, long video, Jacobi, seeds, torchrun, bad input."""
import json
import os
import re
import shlex
import sys
import warnings

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import sample
from utils import recipe
from utils.config import load_config
from utils.errors import InputWarning, UserError, run_cli
from utils.image import load_image
from utils.pipeline import STARFlowPipeline
from utils.vae import load_vae


def run(model, out, *flags, checkpoint="pth"):
    argv = ["--model_config_path", model["config"], "--checkpoint_path", model[checkpoint], "--output_dir", str(out),
            *map(str, flags)]
    assert sample.main(argv) == 0
    return out


def meta(path):
    with open(os.path.splitext(path)[0] + ".json") as f:
        return json.load(f)


@pytest.mark.parametrize("aspect,size", [("1:1", (32, 32)), ("16:9", (40, 24))])
def test_t2i_writes_pngs_grid_and_json(tiny_t2i, tmp_path, aspect, size):
    out = run(tiny_t2i, tmp_path, "--caption", "a blue square", "--sample_batch_size", 2, "--num_samples", 3,
              "--aspect_ratio", aspect, "--cfg", 2, "--seed", 5)
    singles = sorted(p for p in os.listdir(out) if p.endswith(".png") and "grid" not in p)
    assert singles == [f"a_blue_square_{i:04d}.png" for i in range(3)]
    for i, name in enumerate(singles):
        assert Image.open(out / name).size == size
        info = meta(out / name)
        assert (info["prompt"], info["seed"], info["width"], info["height"]) == ("a blue square", 5 + i, *size)
        assert "--seed " + str(5 + i) in info["command"]
    grid = json.load(open(out / "a_blue_square_grid.json"))
    assert (grid["rows"], grid["cols"]) == (1, 3)
    assert Image.open(out / "a_blue_square_grid.png").size == (3 * (size[0] + 2) + 2, size[1] + 4)


def test_a_rerun_finishes_an_interrupted_run_and_another_request_numbers_on(tiny_t2i, tmp_path, capsys):
    """The same command again draws only the rounds its interrupted run did not finish, into the same names (the
    others are not written again); once all are drawn it draws none; any other setting is another run (-2)."""
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    flags = ("--caption", tmp_path / "p.txt", "--num_samples", 2, "--sample_batch_size", 2, "--jacobi", 0)
    out = run(tiny_t2i, tmp_path / "out", *flags)
    files = sorted(os.listdir(out))
    first = {n: ((out / n).stat().st_mtime_ns, (out / n).read_bytes()) for n in files}
    os.remove(out / "p_0003.json")  # interrupted in the second round, before this sample's JSON
    capsys.readouterr()
    run(tiny_t2i, out, *flags)
    assert "holds 2 of the 4 samples of this command" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == files
    again = {n: ((out / n).stat().st_mtime_ns, (out / n).read_bytes()) for n in files}
    for i in range(4):
        name = f"p_{i:04d}.png"
        assert again[name][1] == first[name][1]
        assert (again[name][0] == first[name][0]) == (i < 2)  # the first round is not drawn again
    assert again["p_grid.png"][1] == first["p_grid.png"][1]
    run(tiny_t2i, out, *flags)
    assert "holds all 4 samples of this command, drawn by an earlier run of it; writing the grids only" in \
        capsys.readouterr().out
    assert all((out / f"p_{i:04d}.png").stat().st_mtime_ns == again[f"p_{i:04d}.png"][0] for i in range(4))
    run(tiny_t2i, out, *flags, "--attn_temp", 0.9)
    assert "this run writes p-2_*" in capsys.readouterr().out and len(os.listdir(out)) == 2 * len(files)


@pytest.mark.parametrize("jacobi, tolerance", [("0", 1), ("auto", 8)])
def test_same_seed_same_image_and_regeneration(tiny_t2i, tmp_path, jacobi, tolerance):
    """Token-by-token decoding regenerates a sample alone exactly (up to float rounding); Jacobi schedules decide
    convergence over the whole batch, so alone a sample can differ by a few levels."""
    flags = ("--caption", "a red circle", "--num_samples", 2, "--sample_batch_size", 2, "--jacobi", jacobi)
    a, b = run(tiny_t2i, tmp_path / "a", *flags), run(tiny_t2i, tmp_path / "b", *flags)
    img = [np.asarray(Image.open(d / f"a_red_circle_{i:04d}.png")) for d in (a, b) for i in range(2)]
    assert np.array_equal(img[0], img[2]) and np.array_equal(img[1], img[3])
    assert not np.array_equal(img[0], img[1])
    # sample 1 alone, in a batch of one, by the command its JSON records
    command = shlex.split(meta(a / "a_red_circle_0001.png")["command"])
    assert command[:2] == ["python", "sample.py"] and "--seed" in command
    assert sample.main(command[2:]) == 0
    again = np.asarray(Image.open(a / "regenerated" / "a_red_circle_0000.png")).astype(int)
    assert np.abs(again - img[1].astype(int)).max() <= tolerance


def test_jacobi_matches_sequential(tiny_t2i, device):
    pipe = STARFlowPipeline.from_pretrained(tiny_t2i["config"], tiny_t2i["pth"], device=device, dtype=torch.float32)
    kwargs = dict(num_samples=2, cfg=2.0, aspect_ratio="16:9")
    seq = pipe("a corgi", generator=torch.Generator().manual_seed(1), **kwargs)
    jac = pipe("a corgi", generator=torch.Generator().manual_seed(1), jacobi=True, jacobi_block_size=4,
               jacobi_th=1e-10, jacobi_max_iter=64, **kwargs)
    torch.testing.assert_close(jac.noisy_latents, seq.noisy_latents, atol=1e-4, rtol=1e-4)
    for a, b in zip(seq.images, jac.images):
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1


def test_pipe_to_equals_loading_on_that_device_in_that_dtype(tiny_t2i, device):
    """pipe.to(device, dtype), as in diffusers: the samples of a pipeline loaded there; None keeps a setting."""
    want = STARFlowPipeline.from_pretrained(tiny_t2i["config"], tiny_t2i["pth"], device=device, dtype="bfloat16")
    pipe = STARFlowPipeline.from_pretrained(tiny_t2i["config"], tiny_t2i["pth"], device="cpu")
    assert pipe.to(device, "bfloat16") is pipe and pipe.to() is pipe
    assert (pipe.device, pipe.dtype) == (device, torch.bfloat16)
    assert {(p.device, p.dtype) for p in pipe.model.parameters()} == {(device, torch.bfloat16)}
    assert {p.device for p in [*pipe.vae.parameters(), *pipe.text_encoder.parameters()]} == {device}
    kwargs = dict(num_samples=2, cfg=2.0, output_type="latent")
    torch.testing.assert_close(pipe("a corgi", generator=torch.Generator().manual_seed(1), **kwargs).latents,
                               want("a corgi", generator=torch.Generator().manual_seed(1), **kwargs).latents,
                               atol=0, rtol=0)


def read_video(path):
    reader = imageio.get_reader(path)
    frames = [f for f in reader]
    return np.stack(frames), reader.get_meta_data()["fps"]


@pytest.mark.parametrize("length,flags", [(None, []), (13, ["--jacobi", 1, "--context_length", 1])])
def test_t2v_mp4_frames_and_fps(tiny_t2v, tmp_path, length, flags):
    extra = [] if length is None else ["--target_length", length]
    out = run(tiny_t2v, tmp_path, "--caption", "a corgi dog looks at the camera", "--sample_batch_size", 2,
              "--cfg", 2, "--out_fps", 12, *extra, *flags)
    frames, fps = read_video(out / "a_corgi_dog_looks_at_the_camera_0000.mp4")
    assert frames.shape == (length or 5, 32, 32, 3) and fps == 12
    info = meta(out / "a_corgi_dog_looks_at_the_camera_0000.mp4")
    assert info["text"] == "Noise Level 500:\nA video with 12 fps:\na corgi dog looks at the camera\n\n" \
                           " in a 1:1 aspect ratio.\n"
    assert info["denoiser"] == "learned"
    grid, _ = read_video(out / "a_corgi_dog_looks_at_the_camera_grid.mp4")
    assert grid.shape == (length or 5, 2 * 34 + 2, 34 + 2, 3)  # two videos stacked: 2 rows x 1 column


def test_ti2v_keeps_the_image_as_first_latent_frame(tiny_t2v, tmp_path):
    rng = np.random.default_rng(0)
    vae = load_vae(yaml.safe_load(open(tiny_t2v["config"]))["vae"])
    latents, images = [], []
    for k in range(2):
        path = tmp_path / f"in{k}.png"
        Image.fromarray(rng.integers(0, 255, (30, 44, 3), dtype=np.uint8)).save(path)
        out = run(tiny_t2v, tmp_path / f"out{k}", "--caption", "a cat", "--input_image", path, "--num_samples", 2,
                  "--sample_batch_size", 2, "--cfg", 2, "--save_latents", 1)
        latents.append(load_file(out / "a_cat_latents_0000.safetensors")["noisy_latents"])
        images.append(vae.encode(load_image(str(path), (32, 32)), sample=False))
        assert read_video(out / "a_cat_0001.mp4")[0].shape == (5, 32, 32, 3)
    # same seed, so the first latent frames differ exactly by the difference of the two image latents
    torch.testing.assert_close(latents[0][:, 0] - latents[1][:, 0], (images[0] - images[1]).expand(2, -1, -1, -1),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(latents[0][:, 1], latents[1][:, 1])  # later frames are generated from the image


def test_long_video_denoiser_windows_cover_every_frame(tiny_t2v):
    """Windows of 2 latent frames, overlap 1: frame t comes from the window ending at t, which sees noisy input."""
    pipe = STARFlowPipeline.from_pretrained(tiny_t2v["config"], tiny_t2v["safetensors"])
    pipe.model.denoise = lambda x, y: x.cumsum(1)  # context dependent: depends on the window's earlier frames
    x = torch.randn(3, 5, 48, 2, 2)
    out = recipe.denoise(pipe.model, x, None, 0.5, "learned", torch.float32, window=2,
                         overlap=pipe.config.denoiser_window, batch_size=2)
    want = torch.cat([x[:, :2] - 0.3 * x[:, :2].cumsum(1)] +
                     [x[:, t:t + 1] - 0.3 * (x[:, t - 1] + x[:, t])[:, None] for t in range(2, 5)], 1)
    torch.testing.assert_close(out, want)


def test_finetuned_vae_replaces_denoising(tiny_t2i, tiny_sd_vae_dir, tmp_path):
    base = run(tiny_t2i, tmp_path / "base", "--caption", "a dot", "--num_samples", 1, "--save_latents", 1)
    tuned = run(tiny_t2i, tmp_path / "tuned", "--caption", "a dot", "--num_samples", 1, "--save_latents", 1,
                "--finetuned_vae", tiny_sd_vae_dir)
    a = load_file(base / "a_dot_latents_0000.safetensors")
    b = load_file(tuned / "a_dot_latents_0000.safetensors")
    torch.testing.assert_close(a["noisy_latents"], b["noisy_latents"])
    assert not torch.allclose(a["latents"], a["noisy_latents"])  # score step moved the latents
    torch.testing.assert_close(b["latents"], b["noisy_latents"])  # no denoising with a fine-tuned decoder
    assert meta(tuned / "a_dot_0000.png")["denoiser"] == "none"


def bad_config(model, tmp_path, **changes):
    path = tmp_path / f"bad_{'_'.join(changes)}.yaml"
    path.write_text(yaml.safe_dump(dict(yaml.safe_load(open(model["config"])), **changes)))
    return str(path)


@pytest.mark.usefixtures("time_limit")
@pytest.mark.parametrize("case,match", [
    ("missing_checkpoint", "checkpoint_path.*nope.pth.* does not exist; .*huggingface.co/apple/starflow"),
    ("missing_config", "config file not found"),
    ("unknown_key", "unknown config key 'jacobi_treshold'; did you mean 'jacobi_th'"),
    ("unknown_yaml_key", "unknown config key 'chanels'; did you mean 'channels'"),
    ("misfit", r"does not fit the model: .*shape mismatches"),
    ("corrupt_image", "cannot read input image"),
    ("image_for_t2i", "needs a video model"),
    ("aspect_zero", "impossible"),
    ("aspect_text", "must look like 'W:H'"),
    ("aspect_extreme", "impossible"),
    ("missing_prompts", "caption file .* not found"),
    ("bad_length", "1 \\+ 4k frames, e.g. 5 or 9"),
    ("long_without_jacobi", "needs --jacobi 1"),
    ("missing_text_encoder", "text encoder folder .* does not exist"),
    ("no_checkpoint", r"--checkpoint_path is required: a train.py checkpoint folder .* or weights"),
    ("weights_without_config", r"--model_config_path is required: .*tiny_t2i.pth is not a checkpoint folder"),
    ("negative_without_guidance", r"a negative prompt acts through classifier-free guidance, which cfg 0 turns off"),
    ("negative_when_editing", r"--negative_prompt steers sampling from noise; editing, inpainting and interpolation"),
    ("prior_temp_when_inpainting", r"--prior_temp scales the noise that sampling starts from; editing, inpainting and"),
])
def test_bad_input_one_clear_error(tiny_t2i, tiny_t2v, tmp_path, capsys, monkeypatch, case, match):
    bad_png = tmp_path / "broken.png"
    bad_png.write_bytes(b"\x89PNG not really")
    t2i = ["--model_config_path", tiny_t2i["config"], "--checkpoint_path", tiny_t2i["pth"], "--caption", "x"]
    t2v = ["--model_config_path", tiny_t2v["config"], "--checkpoint_path", tiny_t2v["pth"], "--caption", "x"]
    argv = {
        "missing_checkpoint": t2i[:3] + [str(tmp_path / "nope.pth"), "--caption", "x"],
        "missing_config": [t2i[0], str(tmp_path / "nope.yaml")] + t2i[2:],
        "unknown_key": t2i + ["--jacobi_treshold", "0.1"],
        "unknown_yaml_key": ["--model_config_path", bad_config(tiny_t2i, tmp_path, chanels=3)] + t2i[2:],
        "misfit": ["--model_config_path", bad_config(tiny_t2i, tmp_path, channels=64)] + t2i[2:],
        "corrupt_image": t2v + ["--input_image", str(bad_png)],
        "image_for_t2i": t2i + ["--input_image", str(bad_png)],
        "aspect_zero": t2i + ["--aspect_ratio", "0:1"],
        "aspect_text": t2i + ["--aspect_ratio", "wide"],
        "aspect_extreme": t2i + ["--aspect_ratio", "40:1"],
        "missing_prompts": t2i[:4] + ["--caption", str(tmp_path / "prompts.txt")],
        "bad_length": t2v + ["--target_length", "7"],
        "long_without_jacobi": t2v + ["--target_length", "9", "--jacobi", "0"],
        "missing_text_encoder": t2i + ["--text", str(tmp_path / "no_t5")],
        "no_checkpoint": ["--caption", "x"],
        "weights_without_config": t2i[2:],
        "negative_without_guidance": t2i + ["--negative_prompt", "blurry", "--cfg", "0"],
        "negative_when_editing": t2i + ["--negative_prompt", "blurry", "--edit_image", str(bad_png)],
        "prior_temp_when_inpainting": t2i + ["--prior_temp", "0.7", "--input_image", str(bad_png), "--mask",
                                             str(bad_png)],
    }[case]
    monkeypatch.setattr(sys, "argv", ["sample.py", *argv, "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:
        sample.cli()
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # earlier lines can only be loading progress bars
    assert e.value.code == 2 and last.startswith("error: ") and "Traceback" not in err
    assert re.search(match, last), err


def test_train_checkpoint_folder_with_saved_config(tiny_t2i, tmp_path):
    """A train.py checkpoint folder (model.safetensors + config.yaml from save_config) samples without
    --model_config_path; the saved config's train-only num_samples/sample_batch_size (4096/256) do not apply."""
    import shutil
    from utils.config import load_config, save_config
    folder = tmp_path / "checkpoints" / "step_0000010"
    folder.mkdir(parents=True)
    shutil.copy(tiny_t2i["safetensors"], folder / "model.safetensors")
    save_config(load_config(tiny_t2i["config"]), folder / "config.yaml")
    assert sample.main(["--checkpoint_path", str(folder), "--caption", "a dot", "--sample_batch_size", "2",
                        "--output_dir", str(tmp_path / "out")]) == 0
    assert sorted(p for p in os.listdir(tmp_path / "out") if p.endswith(".png")) == \
        ["a_dot_0000.png", "a_dot_0001.png", "a_dot_grid.png"]


def test_output_types(tiny_t2i):
    pipe = STARFlowPipeline.from_pretrained(tiny_t2i["config"], tiny_t2i["pth"])
    draw = lambda kind: pipe("a corgi", num_samples=2, generator=torch.Generator().manual_seed(3),  # noqa: E731
                             output_type=kind)
    pil, arrays, latent = draw("pil"), draw("np"), draw("latent")
    assert arrays.images.dtype == np.uint8 and arrays.images.shape == (2, 32, 32, 3)
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(pil.images, arrays.images))
    assert latent.images is None and torch.equal(latent.latents, pil.latents)
    assert pil.denoiser == "score"
    with pytest.raises(ValueError, match="output_type must be one of pil, np, latent"):
        draw("tensor")


@pytest.mark.parametrize("kind", ["t2i", "t2v"])
def test_negative_prompt_takes_the_null_prompts_place_in_guidance(tiny_t2i, tiny_t2v, tmp_path, kind):
    """Guidance pushes away from the negative prompt: the flow decoded with its text as the second branch, by hand
    (images and videos); the null prompt as the negative prompt is the default; sample.py records it and
    regenerates with it."""
    model = {"t2i": tiny_t2i, "t2v": tiny_t2v}[kind]
    # the tiny video model's 8 text tokens hold its prompt's fps and noise lines alone: without them it reads the prompt
    plain_prompts = {"fps_cond": 0, "cond_noise_level": 0} if kind == "t2v" else None
    pipe = STARFlowPipeline.from_pretrained(model["config"], model["pth"], overrides=plain_prompts)
    draw = lambda **kw: pipe(["a corgi", "a cat"], cfg=2.0, output_type="latent",  # noqa: E731
                             generator=[torch.Generator().manual_seed(i) for i in range(2)], **kw)
    plain, away = draw(), draw(negative_prompt=["a dog", "blurry"])
    torch.testing.assert_close(draw(negative_prompt="").noisy_latents, plain.noisy_latents, rtol=0, atol=0)
    request = pipe.check_inputs(["a corgi"])
    noise = torch.stack([torch.randn(request.latent_shape[1:], generator=torch.Generator().manual_seed(i))
                         for i in range(2)])
    decorate = lambda texts: [recipe.decorate_prompt(pipe.config, t, request.fps, None,  # noqa: E731
                                                     pipe.config.noise_std) for t in texts]
    y = torch.cat([pipe.encode_text(decorate(["a corgi", "a cat"])), pipe.encode_text(decorate(["a dog", "blurry"]))])
    by_hand = pipe.model(noise, y, mode="reverse", guidance=2.0)
    torch.testing.assert_close(away.noisy_latents, by_hand, rtol=1e-5, atol=1e-5)
    assert (away.noisy_latents - plain.noisy_latents).abs().max() > 1e-3
    with pytest.raises(ValueError, match="got 1 negative prompts for 2 prompts; give one, or one per prompt"):
        draw(negative_prompt=["a dog"])
    with pytest.raises(TypeError, match="negative_prompt must be a string or a list of strings"):
        draw(negative_prompt=3)
    out = run(model, tmp_path, "--caption", "a corgi", "--num_samples", 1, "--negative_prompt", "a dog")
    info = meta(out / ("a_corgi_0000.png" if kind == "t2i" else "a_corgi_0000.mp4"))
    assert info["negative_prompt"] == "a dog" and "--negative_prompt 'a dog'" in info["command"]


@pytest.mark.parametrize("kind", ["t2i", "t2v"])
def test_prior_temperature_scales_the_noise_that_decoding_starts_from(tiny_t2i, tiny_t2v, tmp_path, kind):
    """prior_temp T decodes T x the seed's noise (checked by inverting the samples: the likelihood pass gives that
    noise back); 1 is the default exactly; 0 decodes the prior's mode, the same for every seed; sample.py records
    the temperature and regenerates with it."""
    model = {"t2i": tiny_t2i, "t2v": tiny_t2v}[kind]
    pipe = STARFlowPipeline.from_pretrained(model["config"], model["pth"])
    draw = lambda seeds, **kw: pipe(["a corgi"] * len(seeds), cfg=0.0, output_type="latent",  # noqa: E731
                                    generator=[torch.Generator().manual_seed(i) for i in seeds], **kw)
    shape = pipe.check_inputs(["a corgi"]).latent_shape[1:]
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    y = pipe.encode_text([recipe.decorate_prompt(pipe.config, "a corgi", pipe.check_inputs("a corgi").fps, None,
                                                 pipe.config.noise_std)] * 2)
    cool = draw([0, 1], prior_temp=0.6)
    z, _ = pipe.likelihood(cool.noisy_latents, y)
    torch.testing.assert_close(z, 0.6 * noise, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(draw([0, 1], prior_temp=1.0).noisy_latents, draw([0, 1]).noisy_latents, rtol=0, atol=0)
    assert (cool.noisy_latents - draw([0, 1]).noisy_latents).abs().max() > 1e-3
    mode = draw([0, 1], prior_temp=0.0).noisy_latents
    torch.testing.assert_close(mode[0], mode[1], rtol=0, atol=0)
    if kind == "t2i":
        out = run(model, tmp_path, "--caption", "a corgi", "--num_samples", 1, "--prior_temp", 0.6)
        info = meta(out / "a_corgi_0000.png")
        assert info["prior_temp"] == 0.6 and "--prior_temp 0.6" in info["command"]



def test_compiled_decoding_draws_the_eager_samples(tiny_t2i, tmp_path):
    """--compile_decode 1: the same pictures as eager decoding (latents to 1e-4, pixels within a level), for
    --jacobi 0 and auto; the JSON records it and its command regenerates with it."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()  # graphs of earlier tests count towards dynamo's recompile limit, past which it runs eagerly
    counters.clear()
    for jacobi in ("0", "auto"):
        flags = ["--caption", "a corgi", "--num_samples", 2, "--cfg", 2, "--jacobi", jacobi, "--save_latents", 1]
        eager = run(tiny_t2i, tmp_path / f"eager{jacobi}", *flags)
        compiled = run(tiny_t2i, tmp_path / f"compiled{jacobi}", *flags, "--compile_decode", 1)
        for name in ("a_corgi_0000.png", "a_corgi_0001.png"):
            a, b = (np.asarray(Image.open(folder / name)).astype(int) for folder in (eager, compiled))
            assert np.abs(a - b).max() <= 1, (jacobi, name)
        (noisy_eager, noisy_compiled) = (load_file(next(folder.glob("*.safetensors")))["noisy_latents"]
                                         for folder in (eager, compiled))
        torch.testing.assert_close(noisy_compiled, noisy_eager, rtol=0, atol=1e-4)
        info = meta(compiled / "a_corgi_0000.png")
        assert info["compile_decode"] == 1 and "--compile_decode 1" in info["command"]
        assert meta(eager / "a_corgi_0000.png")["compile_decode"] == 0
    assert counters["stats"]["unique_graphs"] >= 1  # compiled, not run eagerly


def test_a_failed_compile_is_one_clear_error(tiny_t2i, tmp_path, monkeypatch):
    """Where torch.compile cannot build the step (no C++ compiler, say), --compile_decode 1 ends in one UserError (an
    `error:` line) that names the way out."""
    import torch._dynamo.exc
    import transformer_flow

    def fails(device_type):
        def step(*args):
            raise torch._dynamo.exc.InternalTorchDynamoError("InvalidCxxCompiler: No working C++ compiler found")
        return step

    monkeypatch.setattr(transformer_flow, "compiled_next_tokens", fails)
    message = ("compile_decode: torch.compile could not build the decoding step (InvalidCxxCompiler: No working C++ "
               "compiler found); decode without it (--compile_decode 0)")
    with pytest.raises(UserError, match=re.escape(message)):
        run(tiny_t2i, tmp_path, "--caption", "a corgi", "--num_samples", 1, "--jacobi", 0, "--compile_decode", 1)

def test_score_denoise_steps_come_from_the_config_or_the_call(tiny_t2i):
    """The config's score_denoise_steps (a sample.py flag like any config key) sets the steps; a call can override."""
    pipe = STARFlowPipeline.from_pretrained(tiny_t2i["config"], tiny_t2i["pth"], overrides={"score_denoise_steps": 2})
    out = pipe("a corgi", generator=torch.Generator().manual_seed(3), output_type="latent")
    x = out.noisy_latents
    y = pipe.encode_text(out.prompts)
    twice = pipe.model.score_denoise(pipe.model.score_denoise(x, y, pipe.config.noise_std), y, pipe.config.noise_std)
    torch.testing.assert_close(out.latents, twice)
    once = pipe("a corgi", generator=torch.Generator().manual_seed(3), output_type="latent", score_denoise_steps=1)
    torch.testing.assert_close(once.latents, pipe.model.score_denoise(x, y, pipe.config.noise_std))


def test_a_prompt_past_txt_size_warns_once_what_it_loses(tiny_t2i, tmp_path, capsys):
    """The text encoder keeps txt_size tokens (8 here); a longer prompt says what the model never sees."""
    pipe = STARFlowPipeline.from_pretrained(tiny_t2i["config"], tiny_t2i["pth"], overrides={"mix_aspect": 0})
    with warnings.catch_warnings():  # (mix_aspect 1 would add "in a 1:1 aspect ratio.", past 8 tokens)
        warnings.simplefilter("error", InputWarning)
        out = pipe("a cat", output_type="latent")
    assert len(pipe.text_encoder.tokenizer(out.prompts[0]).input_ids) <= 8  # it fits: no warning above
    with pytest.warns(InputWarning, match=r"reads the first 8 tokens \(txt_size\) of a prompt: 'a corgi dog .*' "
                                          r"loses '.*camera"):
        pipe("a corgi dog looks at the camera", num_samples=2, output_type="latent")
    with warnings.catch_warnings():  # as outside pytest (pytest.ini silences the tiny models' cut prompts)
        warnings.simplefilter("default", InputWarning)
        run_cli(sample.main, ["--model_config_path", tiny_t2i["config"], "--checkpoint_path", tiny_t2i["pth"],
                              "--caption", "a film still of a cat playing piano", "--num_samples", "3",
                              "--sample_batch_size", "1", "--output_dir", str(tmp_path)])
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len([line for line in warned if "'a film still of a cat" in line]) == 1  # one line for three batches
    assert all(line.startswith("warning: the text encoder reads") for line in warned)  # (the null prompt's too)


def test_a_prompt_file_saved_with_a_byte_order_mark(tiny_t2i, tmp_path):
    """A BOM (U+FEFF) that a Windows editor put first is not part of the first prompt."""
    (tmp_path / "prompts.txt").write_text("\ufeffa cat\na dog\n", encoding="utf-8")
    out = run(tiny_t2i, tmp_path / "out", "--caption", tmp_path / "prompts.txt", "--jacobi", 0)
    assert [meta(out / f"prompts_{i:04d}.png")["prompt"] for i in range(2)] == ["a cat", "a dog"]


def test_an_empty_caption_samples_unconditionally(tiny_t2i, tmp_path):
    """--caption '' is the null prompt (what caption dropout trained), not a missing flag; other text keys keep ''
    as none."""
    out = run(tiny_t2i, tmp_path, "--caption", "", "--cfg", 0, "--num_samples", 2, "--jacobi", 0)
    assert meta(out / "unconditional_0001.png")["prompt"] == ""
    pipe = STARFlowPipeline.from_pretrained(tiny_t2i["config"], tiny_t2i["pth"])
    want = pipe("", num_samples=2, cfg=0, output_type="np",
                generator=[torch.Generator().manual_seed(sample.SAMPLE_KEYS["seed"].default + i) for i in range(2)])
    for i in range(2):
        assert np.array_equal(np.asarray(Image.open(out / f"unconditional_{i:04d}.png")), want.images[i])
    cfg = load_config(None, ["--caption", "", "--text", ""], extra_keys=sample.SAMPLE_KEYS)
    assert cfg.caption == "" and cfg.text is None
