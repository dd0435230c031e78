"""finetune_decoder.py on tiny VAEs and real MNIST: noisy latents decode closer to the images, exact resume,
torchrun == one process, sample.py decodes with the result; LPIPS weight loading and errors; the discriminator."""
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import finetune_decoder as FD
import sample
from dataset import load_mnist_arrays
from misc.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from misc.lpips import LPIPS, TAP_CHANNELS, load_lpips
from utils.distributed import DistInfo
from utils.errors import InputWarning, UserError
from utils.image import to_uint8
from utils.pipeline import STARFlowPipeline
from utils.vae import load_vae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """On a busy 2-core machine two torch threads stall each other; one thread is faster and steadier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def args(logdir, vae, *flags):
    return ["--vae", vae, "--logdir", str(logdir), "--num_workers", 0, "--wandb", 0, "--train_seed", 0,
            "--log_every", 1, *flags]


def finetune(logdir, vae, *flags):
    return FD.finetune(FD.parse_config([str(a) for a in args(logdir, vae, *flags)]), CPU)


def mnist_pixels(start, count, size=32):
    """Held-out MNIST test digits as (N,3,size,size) in [-1,1] (fine-tuning reads the train split)."""
    digits = torch.from_numpy(load_mnist_arrays("test")[0][start:start + count]).float()[:, None] / 255
    return F.interpolate(digits, size=size, mode="bilinear").expand(-1, 3, -1, -1) * 2 - 1


@pytest.fixture(scope="module")
def mnist_vae(tmp_path_factory):
    """A tiny AutoencoderKL (x2, 2 latent channels) trained briefly on MNIST; latents scaled to unit std and a sharp
    posterior, like SD-VAE with its 0.18215 scaling."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=2,
                        mid_block_add_attention=False)
    x = mnist_pixels(0, 512)
    opt = torch.optim.Adam(vae.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = x[torch.randint(len(x), (16,), generator=g)]
        loss = F.mse_loss(vae.decode(vae.encode(batch).latent_dist.mean).sample, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        vae.quant_conv.weight[2:] = 0  # log-variance rows: posterior std exp(-6)
        vae.quant_conv.bias[2:] = -12
        std = vae.encode(x[:64]).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1 / std)
    out = tmp_path_factory.mktemp("mnist_vae")
    vae.save_pretrained(out)
    return str(out)


def noisy_decode_mse(vae_dir, decoder_file, pixels, noise_std):
    """L2 of base and fine-tuned decodes of the same noisy latents, computed here (not by the script), with the
    fine-tuned decoder loaded the way sampling loads it."""
    base, tuned = load_vae(vae_dir), load_vae(vae_dir, finetuned=decoder_file)
    z = FD.noisy_latents(base, pixels, noise_std, FD.item_generators(123, 0, 0, len(pixels)))
    with torch.no_grad():
        return F.mse_loss(base.decode(z), pixels).item(), F.mse_loss(tuned.decode(z), pixels).item(), base, tuned


def decoder_info(path):
    """The info a decoder file carries in its safetensors metadata; its JSON twin must say the same."""
    with safe_open(path, "pt") as f:
        info = json.loads(f.metadata()[FD.FINETUNED_METADATA_KEY])
    assert json.load(open(os.path.splitext(path)[0] + ".json")) == info
    return info


def test_image_decoder_gets_closer_on_noisy_latents(mnist_vae, tmp_path):
    run = finetune(tmp_path, mnist_vae, "--data_format", "mnist", "--dataset", "mnist", "--img_size", 32,
                   "--batch_size", 16, "--max_steps", 60, "--lr", 1e-3, "--noise_std", 0.5, "--lpips", 0,
                   "--gan_weight", 0)
    name = f"mnist_{os.path.basename(mnist_vae)}_0.50"  # <dataset>_<vae>_<noise_std>
    assert run.out_path == str(tmp_path / "vae" / f"{name}.safetensors")
    x = mnist_pixels(512, 32)
    base, tuned, base_vae, tuned_vae = noisy_decode_mse(mnist_vae, run.out_path, x, 0.5)
    assert tuned < 0.85 * base, (base, tuned)
    info = decoder_info(run.out_path)
    assert (info["vae"], info["noise_std"], info["step"]) == (mnist_vae, 0.5, 60)
    assert info["probe_mse"] < info["probe_mse_base"]
    assert set(load_file(run.out_path)) == set(FD.decoder_state(base_vae))  # decoder weights only
    torch.testing.assert_close(tuned_vae.encode(x, sample=False), base_vae.encode(x, sample=False))
    for png in ("probe_base.png", "probe_0000060.png"):
        assert os.path.getsize(tmp_path / "vae" / name / png) > 0
    # --resume_path with a decoder file: a new run starts from that decoder (a near-zero LR keeps it there)
    again = finetune(tmp_path / "again", mnist_vae, "--data_format", "mnist", "--dataset", "mnist", "--img_size", 32,
                     "--batch_size", 16, "--max_steps", 1, "--lr", 1e-12, "--min_lr", 1e-12, "--noise_std", 0.5,
                     "--lpips", 0, "--gan_weight", 0, "--resume_path", run.out_path)
    first, second = decoder_info(run.out_path), decoder_info(again.out_path)
    assert second["probe_mse_base"] == first["probe_mse_base"]  # "base" is still the VAE's own decoder
    assert second["probe_mse"] == pytest.approx(first["probe_mse"], rel=1e-4)


@pytest.fixture(scope="module")
def lpips_dir(tmp_path_factory):
    """Random LPIPS weights in the layouts users have: torchvision's vgg16 .pth (with classifier) and the lpips
    package's vgg.pth heads (lin{k}.model.1.weight, non-negative)."""
    g = torch.Generator().manual_seed(0)
    net = LPIPS()
    backbone = {k: torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5 if k.endswith("weight")
                else torch.zeros(v.shape) for k, v in net.features.state_dict().items()}
    backbone = {f"features.{k}": v for k, v in backbone.items()}
    backbone["classifier.0.weight"] = torch.randn(8, 8, generator=g)
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(TAP_CHANNELS)}
    out = tmp_path_factory.mktemp("lpips")
    torch.save(backbone, out / "vgg16-397923af.pth")
    torch.save(heads, out / "vgg.pth")
    return out


def test_lpips_random_weights_zero_for_same_positive_otherwise(lpips_dir, tmp_path):
    lpips = load_lpips(lpips_dir)
    a, b = mnist_pixels(0, 2), mnist_pixels(2, 2).requires_grad_(True)
    assert torch.equal(lpips(a, a), torch.zeros(2))
    d = lpips(a, b)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(d, lpips(b, a))
    d.sum().backward()
    assert b.grad.abs().sum() > 0
    b = b.detach()
    video = torch.stack([a, b], dim=2)  # (2,3,2,H,W): the mean over frames
    torch.testing.assert_close(lpips(video, video.flip(0)), (lpips(a, a.flip(0)) + lpips(b, b.flip(0))) / 2)
    save_file(lpips.state_dict(), tmp_path / "lpips_vgg16.safetensors")  # one combined file loads the same
    torch.testing.assert_close(load_lpips(tmp_path / "lpips_vgg16.safetensors")(a, b), d)


def test_lpips_found_in_hf_cache_and_lpips_package(lpips_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants
    snapshot = tmp_path / "hub" / "models--timm--vgg16.tv_in1k" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--timm--vgg16.tv_in1k" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--vgg16.tv_in1k" / "refs" / "main").write_text("abc")
    save_file(torch.load(lpips_dir / "vgg16-397923af.pth", weights_only=True), snapshot / "model.safetensors")
    package = tmp_path / "site" / "lpips"
    (package / "weights" / "v0.1").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "weights" / "v0.1" / "vgg.pth").write_bytes((lpips_dir / "vgg.pth").read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    a, b = mnist_pixels(0, 2), mnist_pixels(2, 2)
    torch.testing.assert_close(load_lpips()(a, b), load_lpips(lpips_dir)(a, b))


def test_lpips_missing_weights_one_clear_error(mnist_vae, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch"))
    with pytest.raises(UserError, match=r"VGG16 backbone .*hf download timm/vgg16.tv_in1k.*--lpips 0"):
        load_lpips()
    with pytest.raises(UserError, match="does not exist"):
        load_lpips(tmp_path / "nowhere")
    heads_only = tmp_path / "heads"
    heads_only.mkdir()
    torch.save({f"lin{i}.model.1.weight": torch.ones(1, c, 1, 1) for i, c in enumerate(TAP_CHANNELS)},
               heads_only / "vgg.pth")
    with pytest.raises(UserError, match=r"the VGG16 backbone not found in .*heads"):
        load_lpips(heads_only)
    with pytest.raises(SystemExit) as exit_info:  # the CLI: one line on stderr, exit code 2
        FD.main([str(a) for a in args(tmp_path, mnist_vae, "--data_format", "mnist", "--lpips", 1)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: LPIPS weights incomplete") and "--lpips 0" in err and "\n" not in err


@pytest.mark.parametrize("stop", ["crash", "signal"])
def test_interrupted_run_resumes_exactly(mnist_vae, lpips_dir, tmp_path, monkeypatch, stop):
    """A crash in step 3 resumes from the step-2 checkpoint; Ctrl-C (SIGINT) during step 3 finishes the step,
    checkpoints it and exits 130. Either way the resumed run equals the uninterrupted one."""
    flags = ["--data_format", "mnist", "--img_size", 32, "--batch_size", 4, "--max_steps", 4, "--ckpt_every", 2,
             "--lr", 1e-3, "--noise_std", 0.3, "--lpips", 0.5, "--lpips_weights", lpips_dir, "--gan_weight", 0.1,
             "--gan_start", 1]
    straight = finetune(tmp_path / "a", mnist_vae, *flags)
    train_step = FD.Finetune.train_step

    def stop_in_step_3(self, pixels):
        if self.step == 2 and stop == "crash":
            raise KeyboardInterrupt
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(self, pixels)

    monkeypatch.setattr(FD.Finetune, "train_step", stop_in_step_3)
    with pytest.raises(KeyboardInterrupt if stop == "crash" else SystemExit) as error:
        finetune(tmp_path / "b", mnist_vae, *flags)
    monkeypatch.undo()
    assert stop == "crash" or error.value.code == 128 + signal.SIGINT
    run_dir = tmp_path / "b" / "vae" / os.path.basename(straight.run_dir)
    saved = "step_0000002" if stop == "crash" else "step_0000003"
    assert os.path.realpath(run_dir / "checkpoints" / "latest").endswith(saved)
    if stop == "signal":  # and the run folder moved elsewhere: it goes on there, not where its config says
        moved = tmp_path / "c" / "vae" / run_dir.name
        shutil.copytree(run_dir, moved, symlinks=True)
        run_dir = moved
    resumed = FD.finetune(FD.parse_config(["--resume_path", str(run_dir)]), CPU)
    assert resumed.step == 4 and resumed.run_dir == str(run_dir)
    assert resumed.out_path == str(run_dir) + ".safetensors"
    files = [(load_file(r.out_path), load_file(os.path.join(r.run_dir, "checkpoints", "latest", "model.safetensors")))
             for r in (straight, resumed)]
    for x, y in zip(*files):  # the decoder file, then the full checkpoint (decoder + discriminator)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert any(k.startswith("disc.") for k in files[1][1])
    logs = [[json.loads(line) for line in open(os.path.join(r.run_dir, "metrics.jsonl"))] for r in (straight, resumed)]
    assert [m["step"] for m in logs[1]] == [1, 2, 3, 4] and logs[0] == logs[1]
    assert {"l2", "lpips", "g_loss", "d_loss"} <= set(logs[1][-1])


def test_torchrun_two_ranks_match_one_process(mnist_vae, tmp_path):
    flags = ["--data_format", "mnist", "--img_size", 32, "--batch_size", 8, "--max_steps", 2, "--lr", 1e-3,
             "--noise_std", 0.5, "--lpips", 0, "--gan_weight", 0.1]
    one = finetune(tmp_path / "one", mnist_vae, *flags)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "finetune_decoder.py", *map(str, args(tmp_path / "two", mnist_vae, *flags))]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 rank(s)" in done.stdout
    a, b = load_file(one.out_path), load_file(str(tmp_path / "two" / "vae" / os.path.basename(one.out_path)))
    assert not all(torch.equal(a[k], v) for k, v in FD.decoder_state(load_vae(mnist_vae)).items())  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("warmup", [0, 1])
def test_ema_decoder_file_is_the_moving_average_and_resumes(mnist_vae, tmp_path, monkeypatch, warmup):
    """With ema_decay the decoder file holds the average of the decoder's weights after every step (recomputed here
    from the trained weights; with the warmup, at decays 1/10, 2/11, 3/12, 4/13), the probe scores describe it, and
    a run resumed mid-way ends with the same average (its update count restored)."""
    flags = ["--data_format", "mnist", "--img_size", 32, "--batch_size", 4, "--max_steps", 4, "--ckpt_every", 2,
             "--lr", 1e-2, "--noise_std", 0.3, "--lpips", 0, "--gan_weight", 0.1, "--ema_decay", 0.5,
             "--ema_warmup", warmup]
    weights, train_step = [], FD.Finetune.train_step

    def record(self, pixels):  # the decoder's weights after each step
        out = train_step(self, pixels)
        weights.append({k: v.detach().clone() for k, v in FD.decoder_state(self.vae).items()})
        return out

    monkeypatch.setattr(FD.Finetune, "train_step", record)
    run = finetune(tmp_path / "a", mnist_vae, *flags)
    monkeypatch.undo()
    average = {k: v.float().clone() for k, v in FD.decoder_state(load_vae(mnist_vae)).items()}
    for n, step in enumerate(weights):
        decay = min(0.5, (1 + n) / (10 + n)) if warmup else 0.5
        average = {k: decay * v + (1 - decay) * step[k].float() for k, v in average.items()}
    saved = load_file(run.out_path)
    assert saved.keys() == average.keys() and not all(torch.equal(saved[k], weights[-1][k]) for k in saved)
    for k in saved:
        torch.testing.assert_close(saved[k], average[k], atol=1e-6, rtol=1e-5)
    latest = os.path.join(run.run_dir, "checkpoints", "latest")
    trained = load_file(os.path.join(latest, "model.safetensors"))  # the checkpoint keeps the trained weights
    assert all(torch.equal(trained[k], weights[-1][k]) for k in saved)
    info = decoder_info(run.out_path)
    assert info["ema_decay"] == 0.5 and info["probe_mse"] != info["probe_mse_trained"]
    assert info["probe_mse"] == pytest.approx(FD.probe_mse(load_vae(mnist_vae, finetuned=run.out_path), run.probe,
                                                           0.3, run.seed)[0], rel=1e-5)
    # crash in step 3, resume from the step-2 checkpoint (its ema.safetensors): the same average at the end
    monkeypatch.setattr(FD.Finetune, "train_step", lambda self, pixels: (_ for _ in ()).throw(KeyboardInterrupt)
                        if self.step == 2 else train_step(self, pixels))
    with pytest.raises(KeyboardInterrupt):
        finetune(tmp_path / "b", mnist_vae, *flags)
    monkeypatch.undo()
    resumed = FD.finetune(FD.parse_config(["--resume_path", str(tmp_path / "b" / "vae" / os.path.basename(
        run.run_dir))]), CPU)
    again = load_file(resumed.out_path)
    assert all(torch.equal(again[k], saved[k]) for k in saved)


@pytest.fixture(scope="module")
def moving_mnist(tmp_path_factory):
    """Six 5-frame clips of a digit sliding across a 32x32 frame, as captioned mp4 files."""
    root = tmp_path_factory.mktemp("moving_mnist")
    digits = (mnist_pixels(100, 6, size=20)[:, 0] + 1) * 127.5
    for i, digit in enumerate(digits):
        frames = np.zeros((5, 32, 32, 3), np.uint8)
        for t in range(5):
            frames[t, 6:26, 2 + 2 * t:22 + 2 * t] = digit.numpy().astype(np.uint8)[..., None]
        imageio.mimwrite(root / f"clip{i}.mp4", frames, fps=8, codec="libx264")
        (root / f"clip{i}.txt").write_text(f"a moving digit {i}")
    return root


def test_wan22_video_decoder_gets_closer_on_noisy_latents(tiny_wan22_vae_dir, moving_mnist, tmp_path):
    vae = tiny_wan22_vae_dir + ":0.6"
    run = finetune(tmp_path, vae, "--data", moving_mnist, "--vid_size", "5:8", "--img_size", 32,
                   "--batch_size", 2, "--max_steps", 6, "--lr", 3e-3, "--noise_std", 0.5, "--lpips", 0,
                   "--gan_weight", 0.1, "--use_3d_disc", 1, "--eval_samples", 2)
    clips = torch.stack([torch.from_numpy(np.stack(imageio.mimread(moving_mnist / f"clip{i}.mp4"))) for i in (4, 5)])
    x = clips.permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # (B,3,T,H,W)
    base, tuned, _, _ = noisy_decode_mse(vae, run.out_path, x, 0.5)
    assert tuned < 0.85 * base, (base, tuned)
    info = decoder_info(run.out_path)
    assert (info["vae_class"], info["vid_size"]) == ("AutoencoderKLWan", "5:8")
    assert any(k.startswith("disc.net.0.weight") and v.dim() == 5 for k, v in
               load_file(os.path.join(run.run_dir, "checkpoints", "latest", "model.safetensors")).items())


def test_sample_py_decodes_with_the_finetuned_decoder(tiny_t2i, tiny_sd_vae_dir, tmp_path):
    run = finetune(tmp_path, tiny_sd_vae_dir, "--data_format", "mnist", "--img_size", 32, "--batch_size", 4,
                   "--max_steps", 2, "--lr", 1e-2, "--noise_std", 0.3, "--lpips", 0, "--gan_weight", 0)
    run_id = os.path.basename(run.out_path)[:-len(".safetensors")]  # as the original: an id under <logdir>/vae/
    out = tmp_path / "samples"
    argv = ["--model_config_path", tiny_t2i["config"], "--checkpoint_path", tiny_t2i["pth"], "--output_dir", out,
            "--caption", "a dot", "--num_samples", 1, "--save_latents", 1, "--logdir", tmp_path,
            "--finetuned_vae", run_id]
    assert sample.main([str(a) for a in argv]) == 0
    latents = load_file(out / "a_dot_latents_0000.safetensors")
    torch.testing.assert_close(latents["latents"], latents["noisy_latents"])  # no denoising step
    with torch.no_grad():
        tuned = to_uint8(load_vae(tiny_sd_vae_dir, finetuned=run.out_path).decode(latents["noisy_latents"]))[0]
        base = to_uint8(load_vae(tiny_sd_vae_dir).decode(latents["noisy_latents"]))[0]
    image = np.asarray(Image.open(out / "a_dot_0000.png")).astype(int)
    assert np.abs(image - tuned).max() <= 1 and np.abs(image - base).max() > 8
    pipe = STARFlowPipeline.from_pretrained(tiny_t2i["config"], tiny_t2i["pth"], finetuned_vae=run.out_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InputWarning)
        pipe("a dot", output_type="latent")  # the decoder's own noise level (the config's): no warning
    assert not [w for w in caught if "fine-tuned decoder" in str(w.message)]
    with pytest.warns(InputWarning, match=r"learned latents of noise_std 0.3, but these carry 0.5; fine-tune one at "
                                          r"0.5, or pass --finetuned_vae none"):
        pipe("a dot", noise_std=0.5, output_type="latent")


def test_a_folder_of_bare_images_fine_tunes(mnist_vae, tmp_path):
    """A decoder learns from pixels alone: no captions needed, even under a text-conditional config (txt_size)."""
    from test_dataset import make_image_folder

    data = make_image_folder(tmp_path / "imgs", n=4)
    for caption in data.glob("*.txt"):
        caption.unlink()
    flags = ["--data", data, "--txt_size", 8, "--img_size", 32, "--batch_size", 2, "--max_steps", 2,
             "--noise_std", 0.3, "--lpips", 0, "--gan_weight", 0]
    run = finetune(tmp_path, mnist_vae, *flags)
    assert run.step == 2 and os.path.isfile(run.out_path)
    with pytest.raises(UserError, match="already holds a run .*python finetune_decoder.py --resume_path"):
        finetune(tmp_path, mnist_vae, *flags)  # the same command again would replace that run


def test_bad_input_clear_errors(mnist_vae, tiny_sd_vae_dir, tmp_path):
    with pytest.raises(UserError, match="needs a VAE"):
        finetune(tmp_path, "none", "--data_format", "mnist")
    with pytest.raises(UserError, match="does not accumulate"):
        finetune(tmp_path, mnist_vae, "--data_format", "mnist", "--acc", 2)
    with pytest.raises(UserError, match="unknown config key 'lpips_weight'; did you mean 'lpips_weights'"):
        FD.parse_config(["--lpips_weight", "x"])
    with pytest.raises(UserError, match=r"does not use --secondary_dataset, --val_every: train.py's .* drop them"):
        FD.parse_config(["--val_every", "10", "--secondary_dataset=x"])
    with pytest.raises(UserError, match=r"does not use --fsdp: .* drop it"):
        FD.parse_config(["--resume_path", str(tmp_path), "--fsdp", "1"])
    other = tmp_path / "sd_decoder.safetensors"
    FD.save_finetuned_decoder(load_vae(tiny_sd_vae_dir), other, {"vae": tiny_sd_vae_dir, "noise_std": 0.3})
    with pytest.raises(UserError, match="does not fit the model"):  # another VAE's decoder
        load_vae(mnist_vae, finetuned=str(other))


def test_patch_discriminator_and_hinge_losses():
    images, video = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 5, 32, 32)
    assert PatchDiscriminator()(images).shape == (2, 1, 4, 4)
    assert PatchDiscriminator()(video).shape == (10, 1, 4, 4)  # 2D: every frame scored
    assert PatchDiscriminator(video=True)(video).shape == (2, 1, 2, 4, 4)
    assert PatchDiscriminator(video=True)(video[:, :, :1]).shape == (2, 1, 1, 4, 4)  # a single frame still works
    ones = torch.ones(3)
    assert hinge_d_loss(2 * ones, -2 * ones) == 0 and hinge_d_loss(0 * ones, 0 * ones) == 1
    assert hinge_g_loss(torch.tensor([1.0, 3.0])) == -2
