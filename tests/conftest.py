"""Shared tiny random assets, built once per session in temporary folders (nothing is downloaded).

Fixtures return folders that load with `from_pretrained` exactly like the hub ids they stand in for:
tiny_t5_dir (T5 encoder + sentencepiece tokenizer trained on the fly), tiny_sd_vae_dir (AutoencoderKL, factor 8),
tiny_wan22_vae_dir (Wan2.2-style AutoencoderKLWan in a pipeline layout: <dir>/vae), tiny_wan21_vae_dir.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach the hub, even where a network exists
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

CAPTIONS = ["a red circle on a white background", "a blue square", "a corgi dog looks at the camera",
            "a film still of a cat playing piano", "a handwritten digit seven", "An image:", "A video with 16 fps:",
            "Noise Level 500:", "in a 16:9 aspect ratio.", "a photo of the digit three in green"]


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
