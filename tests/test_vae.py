"""VAEs: SD-style scaling, Wan2.2 normalisation + ':0.6' temporal scale, Wan2.1, pixel space, errors."""
import pytest
import torch

from utils.checkpoint import save_weights
from utils.errors import UserError
from utils.vae import load_vae, parse_vae_spec


def test_parse_spec():
    assert parse_vae_spec("Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6") == ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", 0.6)
    assert parse_vae_spec("stabilityai/sd-vae-ft-ema") == ("stabilityai/sd-vae-ft-ema", 1.0)


def test_sd_vae_scaling_and_video_per_frame(tiny_sd_vae_dir):
    vae = load_vae(tiny_sd_vae_dir)
    assert (vae.spatial_factor, vae.temporal_factor, vae.latent_channels) == (8, 1, 4)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    z = vae.encode(x, generator=torch.Generator().manual_seed(0))
    raw = vae.vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, raw * 0.18215)
    assert vae.decode(z).shape == x.shape
    torch.testing.assert_close(vae.decode(z), vae.vae.decode(raw).sample)
    video = torch.rand(1, 3, 3, 32, 32) * 2 - 1
    zv = vae.encode(video, sample=False)
    assert zv.shape == (1, 3, 4, 4, 4)
    torch.testing.assert_close(zv[:, 1], vae.encode(video[:, :, 1], sample=False))
    assert vae.decode(zv).shape == video.shape


@pytest.fixture(scope="module")
def wan22(tiny_wan22_vae_dir):
    return load_vae(tiny_wan22_vae_dir + ":0.6"), load_vae(tiny_wan22_vae_dir)


def test_wan22_shapes_normalisation_and_temporal_scale(wan22):
    vae, plain = wan22
    assert (vae.spatial_factor, vae.temporal_factor, vae.latent_channels) == (16, 4, 48)
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    z = vae.encode(video, sample=False)
    assert z.shape == (1, 2, 48, 2, 2)
    raw = plain.vae.encode(video).latent_dist.mean.permute(0, 2, 1, 3, 4)
    mean = torch.tensor(plain.vae.config.latents_mean).view(1, 1, 48, 1, 1)
    std = torch.tensor(plain.vae.config.latents_std).view(1, 1, 48, 1, 1)
    unscaled = (raw - mean) / std
    torch.testing.assert_close(z[:, 0], unscaled[:, 0])
    torch.testing.assert_close(z[:, 1], unscaled[:, 1] * 0.6)
    torch.testing.assert_close(plain.encode(video, sample=False), unscaled)
    # decode undoes the scale: identical pixels from the scaled and the unscaled latents
    torch.testing.assert_close(vae.decode(z), plain.decode(unscaled))
    assert vae.decode(z).shape == video.shape


def test_wan22_image_is_the_causal_first_frame(wan22):
    vae, _ = wan22
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    image_latent = vae.encode(video[:, :, 0], sample=False)
    assert image_latent.shape == (1, 48, 2, 2)
    torch.testing.assert_close(image_latent, vae.encode(video, sample=False)[:, 0])
    assert vae.decode(image_latent).shape == (1, 3, 32, 32)


def test_wan22_sample_is_seeded(wan22):
    vae, _ = wan22
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    a = vae.encode(video, generator=torch.Generator().manual_seed(3))
    b = vae.encode(video, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, vae.encode(video, sample=False))


def test_wan22_rejects_bad_frame_count(wan22):
    with pytest.raises(UserError, match="1 \\+ 4k frames"):
        wan22[0].encode(torch.zeros(1, 3, 6, 32, 32))


def test_wan21(tiny_wan21_vae_dir):
    vae = load_vae(tiny_wan21_vae_dir)
    assert (vae.spatial_factor, vae.temporal_factor, vae.latent_channels) == (8, 4, 16)
    z = vae.encode(torch.zeros(2, 3, 9, 16, 16))
    assert z.shape == (2, 3, 16, 2, 2)
    assert vae.decode(z).shape == (2, 3, 9, 16, 16)


def test_pixel_space():
    vae = load_vae("none")
    x = torch.rand(2, 3, 4, 8, 8)
    assert vae.encode(x).shape == (2, 4, 3, 8, 8)
    torch.testing.assert_close(vae.decode(vae.encode(x)), x)


@pytest.mark.parametrize("video", [False, True])
def test_grey_pixel_space(video):
    vae = load_vae("none", pixel_channels=1)
    grey = torch.rand(2, 1, *((4,) if video else ()), 8, 8)
    rgb = grey.expand(2, 3, *grey.shape[2:]).clone()
    rgb[:, 0] += 0.3
    rgb[:, 2] -= 0.3  # colour that averages out: the latent is the grey level
    z = vae.encode(rgb)
    assert z.shape == ((2, 4, 1, 8, 8) if video else (2, 1, 8, 8)) and vae.latent_channels == 1
    torch.testing.assert_close(vae.decode(z), grey.expand(2, 3, *grey.shape[2:]))
    with pytest.raises(UserError, match="3 \\(RGB\\) or 1 \\(grey\\)"):
        load_vae("none", pixel_channels=4)


def test_finetuned_weights_file(tiny_sd_vae_dir, tmp_path):
    base = load_vae(tiny_sd_vae_dir)
    state = {f"vae.{k}": v + 1 if k.startswith("decoder.conv_out") else v for k, v in base.vae.state_dict().items()}
    save_weights(state, tmp_path / "dec.safetensors")
    tuned = load_vae(tiny_sd_vae_dir, finetuned=str(tmp_path / "dec.safetensors"))
    torch.testing.assert_close(tuned.vae.decoder.conv_out.bias, base.vae.decoder.conv_out.bias + 1)
    decoder_only = {k: v for k, v in state.items() if k.startswith(("vae.decoder.", "vae.post_quant_conv."))}
    save_weights(decoder_only, tmp_path / "dec_only.safetensors")  # the layout finetune_decoder.py writes
    tuned = load_vae(tiny_sd_vae_dir, finetuned=str(tmp_path / "dec_only.safetensors"))
    torch.testing.assert_close(tuned.vae.decoder.conv_out.bias, base.vae.decoder.conv_out.bias + 1)
    torch.testing.assert_close(tuned.vae.encoder.conv_in.weight, base.vae.encoder.conv_in.weight)
    bad = dict(state)
    bad["vae.decoder.conv_out.bias"] = torch.zeros(7)
    save_weights(bad, tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match=r"decoder.conv_out.bias: file \(7,\) vs model \(3,\)"):
        load_vae(tiny_sd_vae_dir, finetuned=str(tmp_path / "bad.safetensors"))
    del decoder_only["vae.decoder.conv_out.weight"]
    save_weights(decoder_only, tmp_path / "partial.safetensors")
    with pytest.raises(UserError, match=r"missing keys: decoder.conv_out.weight"):
        load_vae(tiny_sd_vae_dir, finetuned=str(tmp_path / "partial.safetensors"))


@pytest.mark.parametrize("spec,match", [
    ("stabilityai/sd-vae-ft-ema", r"stabilityai/sd-vae-ft-ema.*hf download stabilityai/sd-vae-ft-ema"),
    ("Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6", r"hf download Wan-AI/Wan2.2-TI2V-5B-Diffusers.*--include \"vae/\*\""),
    ("/no/such/vae", "does not exist"),
])
def test_missing_weights_give_one_clear_error(spec, match):
    with pytest.raises(UserError, match=match):
        load_vae(spec)


def test_temporal_scale_only_for_wan(tiny_sd_vae_dir):
    with pytest.raises(UserError, match="only applies to Wan"):
        load_vae(tiny_sd_vae_dir + ":0.6")
