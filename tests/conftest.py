"""Shared tiny random assets, built once per session in temporary folders (nothing is downloaded).

TINY is the suite's one tiny STARFlow, in config-key names; tiny_model / tiny_inputs (Model level), tiny_flags
(train.py and sample.py flags) and the tiny_t2i / tiny_t2v fixtures (config YAML + checkpoints) all derive from it.

Fixtures return folders that load with `from_pretrained` exactly like the hub ids they stand in for:
tiny_t5_dir (T5 encoder + sentencepiece tokenizer trained on the fly), tiny_sd_vae_dir (AutoencoderKL, factor 8),
tiny_wan22_vae_dir (Wan2.2-style AutoencoderKLWan in a pipeline layout: <dir>/vae), tiny_wan21_vae_dir.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach the hub, even where a network exists
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import math  # noqa: E402
import signal  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny tensors on a shared 2-core machine: a second intra-op thread only adds spin-waiting (measured 100x slower
# per small matmul under load), so tests run single-threaded.
torch.set_num_threads(1)

CAPTIONS = ["a red circle on a white background", "a blue square", "a corgi dog looks at the camera",
            "a film still of a cat playing piano", "a handwritten digit seven", "An image:", "A video with 16 fps:",
            "Noise Level 500:", "in a 16:9 aspect ratio.", "a photo of the digit three in green"]


LIMIT_S = 120  # bad-input tests: a test that hangs fails after this instead of stalling the suite


@pytest.fixture
def time_limit():
    """Fail the test after LIMIT_S seconds (SIGALRM, main thread; subprocesses carry their own timeout=)."""
    def expire(signum, frame):
        pytest.fail(f"no result after {LIMIT_S} s: a bad input must not hang")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory):
    """A 2-layer T5 encoder (d_model 32) and a unigram spm tokenizer, saved like google/flan-t5-xl."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer
    root = tmp_path_factory.mktemp("tiny_t5")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CAPTIONS * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "spiece"), vocab_size=200, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(root / "spiece.model"))
    tokenizer = T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())],
                            extra_ids=0)
    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=sp.get_piece_size(), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                    num_heads=4, feed_forward_proj="gated-gelu"))
    out = root / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_sd_vae_dir(tmp_path_factory):
    """An SD-VAE-shaped AutoencoderKL (4 latent channels, downsampling 8, scaling 0.18215)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, scaling_factor=0.18215)
    out = tmp_path_factory.mktemp("tiny_sd_vae")
    vae.save_pretrained(out)
    return str(out)


def _tiny_wan(z_dim, wan22):
    from diffusers import AutoencoderKLWan
    g = torch.Generator().manual_seed(1)
    stats = dict(latents_mean=(torch.randn(z_dim, generator=g) * 0.1).tolist(),
                 latents_std=(torch.rand(z_dim, generator=g) + 0.5).tolist())
    torch.manual_seed(0)
    if wan22:
        return AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                                out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
                                **stats)
    return AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                            temperal_downsample=[False, True, True], **stats)


@pytest.fixture(scope="session")
def tiny_wan22_vae_dir(tmp_path_factory):
    """A Wan2.2-style AutoencoderKLWan (48 ch, x16 space, x4 time) in a diffusers pipeline layout (<dir>/vae)."""
    root = tmp_path_factory.mktemp("tiny_wan22")
    _tiny_wan(48, wan22=True).save_pretrained(root / "vae")
    return str(root)


@pytest.fixture(scope="session")
def tiny_wan21_vae_dir(tmp_path_factory):
    """A Wan2.1-style AutoencoderKLWan (16 ch, x8 space, x4 time), saved as a bare VAE folder."""
    root = tmp_path_factory.mktemp("tiny_wan21")
    _tiny_wan(16, wan22=False).save_pretrained(root)
    return str(root)


# The one tiny architecture: 3 flow steps of 1, 1 and 2 layers, 32 wide, RoPE, SOS, text in the deep step.
TINY = dict(patch_size=1, channels=32, layers_per_block=[1, 1, 2], head_dim=16, rope=1, sos=1, txt_size=8,
            cond_top_only=1, use_softplus=1, use_final_norm=1, soft_clip=4.0, seq_order="L2R")
TINY_TXT_DIM = 8  # text width at the Model level (the pipeline fixtures take the tiny T5's)


@pytest.fixture(scope="session")
def device():
    """The device of the tests that take one: cpu, or STARFLOW_TEST_DEVICE (e.g. cuda) where that device is present,
    in float32 with TF32 off so that the CPU tolerances hold; tests are skipped if it is named but absent."""
    name = os.environ.get("STARFLOW_TEST_DEVICE", "cpu")
    kind = torch.device(name).type
    present = {"cpu": True, "cuda": torch.cuda.is_available(),
               "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not present.get(kind, False):
        pytest.skip(f"STARFLOW_TEST_DEVICE={name}, but this machine has no such device")
    if kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(name)


def tiny_model(seed=0, in_channels=2, img_size=4, txt_dim=TINY_TXT_DIM, device="cpu", **overrides):
    """A Model of the TINY architecture (Model keywords may override) with random weights everywhere, so that no
    term of the computation is trivially zero (a fresh flow is the identity map); on `device`."""
    from transformer_flow import Model
    keys = dict(TINY, **{k: v for k, v in overrides.items() if k in TINY})
    kwargs = dict(in_channels=in_channels, img_size=img_size, patch_size=keys["patch_size"], channels=keys["channels"],
                  num_blocks=len(keys["layers_per_block"]), layers_per_block=keys["layers_per_block"],
                  head_dim=keys["head_dim"], rope=bool(keys["rope"]), sos=bool(keys["sos"]), txt_size=keys["txt_size"],
                  txt_dim=txt_dim, cond_top_only=bool(keys["cond_top_only"]),
                  use_softplus=bool(keys["use_softplus"]), use_final_norm=bool(keys["use_final_norm"]),
                  soft_clip=keys["soft_clip"], seq_order=keys["seq_order"])
    kwargs.update({k: v for k, v in overrides.items() if k not in TINY})
    if kwargs.get("temporal_causal") and kwargs["seq_order"] != "L2R":
        pytest.skip("temporal causality needs L2R")
    torch.manual_seed(seed)
    model = Model(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.1))
    return model.eval().to(device)


def tiny_inputs(model, batch=2, frames=None, seed=1, device="cpu"):
    """(x, y) for a tiny model on `device`: a 4 x 5 token grid (4 x 4 for learned positions), text states if it
    reads text (drawn on the CPU, so that every device sees the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    side = 4 * model.patch_size
    wide = model.patch_size if model.rope is not None else 0  # learned positions need the square training grid
    shape = (batch, model.in_channels, side, side + wide)
    if frames:
        shape = (batch, frames) + shape[1:]
    x = torch.randn(shape, generator=g)
    txt_dim = model.blocks[-1].proj_txt.in_features if model.blocks[-1].has_text else 0
    y = torch.randn(batch, model.txt_size, txt_dim, generator=g) if txt_dim else None
    return x.to(device), None if y is None else y.to(device)


def tiny_flags(**overrides):
    """TINY (updated by overrides) as command-line tokens for train.py / sample.py."""
    flags = []
    for key, value in dict(TINY, **overrides).items():
        flags += [f"--{key}", *map(str, value if isinstance(value, (list, tuple)) else [value])]
    return flags


def _perturb(model, std=0.05):
    """Random weights everywhere: a fresh flow is the identity map (zero output projections), too easy a test."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _tiny_starflow(tmp_path_factory, name, values):
    """Write a plain-mapping config and a random checkpoint in both formats (.pth like the official release,
    .safetensors like ours). Returns dict(config, pth, safetensors)."""
    import yaml
    from transformer_flow import Model
    from utils.checkpoint import save_weights
    from utils.config import load_config, model_kwargs
    from utils.text_encoder import load_text_encoder
    from utils.vae import load_vae
    root = tmp_path_factory.mktemp(name)
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump(values, sort_keys=False))
    cfg = load_config(str(config))
    vae = load_vae(cfg.vae)
    txt_dim = load_text_encoder(cfg.text, cfg.txt_size).dim
    torch.manual_seed(0)
    model = _perturb(Model(**model_kwargs(cfg, cfg.img_size // vae.spatial_factor, txt_dim)))
    state = model.state_dict()
    torch.save(state, root / f"{name}.pth")
    save_weights(state, root / f"{name}.safetensors")
    return dict(config=str(config), pth=str(root / f"{name}.pth"), safetensors=str(root / f"{name}.safetensors"))


TINY_MODEL = dict(TINY, mix_aspect=1, cfg=2.0)


@pytest.fixture(scope="session")
def tiny_t2i(tmp_path_factory, tiny_t5_dir, tiny_sd_vae_dir):
    """STARFlow T2I in miniature: SD-style VAE (x8), 32 px images -> 4x4x4 latents, T5 text."""
    return _tiny_starflow(tmp_path_factory, "tiny_t2i", dict(
        TINY_MODEL, img_size=32, channel_size=4, vae=tiny_sd_vae_dir, text=tiny_t5_dir, noise_std=0.3))


@pytest.fixture(scope="session")
def tiny_t2v(tmp_path_factory, tiny_t5_dir, tiny_wan22_vae_dir):
    """STARFlow-V in miniature: Wan2.2-style VAE with ':0.6', 5 frames at 8 fps -> 2 latent frames of 2x2x48,
    temporal-causal, frame-local shallow blocks, conditional learnable self-denoiser, fps/noise-level prompts."""
    return _tiny_starflow(tmp_path_factory, "tiny_t2v", dict(
        TINY_MODEL, img_size=32, channel_size=48, vae=tiny_wan22_vae_dir + ":0.6", text=tiny_t5_dir,
        vid_size="5:8", fps_cond=1, cond_noise_level=1, noise_std=0.5, temporal_causal=2, shallow_block_local=1,
        learnable_self_denoiser=1, conditional_denoiser=1, denoiser_window=1, finetuned_vae="none"))
