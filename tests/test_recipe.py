"""The STARFlow recipe (utils/recipe.py): training and sampling decorate prompts and denoise alike."""
import pytest
import torch

import train
from conftest import tiny_inputs, tiny_model
from utils import recipe
from utils.config import load_config
from utils.pipeline import STARFlowPipeline


def test_templates_are_the_official_strings():
    assert recipe.format_prompt("a dog") == "a dog"
    assert recipe.format_prompt("a dog", fps=16, noise_std=0.5, aspect_ratio="16:9") == \
        "Noise Level 500:\nA video with 16 fps:\na dog\n\n in a 16:9 aspect ratio.\n"
    assert recipe.format_prompt("a dog", fps=0) == "An image:\na dog\n"
    assert recipe.format_prompt("", noise_std=0.3) == "Noise Level 300:\n"
    assert recipe.format_prompt("x", aspect_ratio="1:1") == "x\n in a 1:1 aspect ratio.\n"


class Recorder:
    """A text encoder that records what it is asked to encode."""
    dim = 4

    def __init__(self):
        self.texts = []

    def encode(self, texts):
        self.texts += list(texts)
        return torch.zeros(len(texts), 2, self.dim)

    def cut_off(self, texts):
        return [""] * len(texts)


@pytest.mark.parametrize("flags", [[], ["--fps_cond", "1"], ["--fps_cond", "1", "--cond_noise_level", "1",
                                                             "--mix_aspect", "1", "--vid_size", "5:8"]])
def test_training_and_sampling_see_the_same_prompts(flags):
    """train.py's text for a caption (and for a dropped label) equals what the pipeline encodes for that caption
    (and for guidance's null prompt)."""
    cfg = load_config(None, ["--noise_std", "0.4", "--text", "recorder", "--drop_label", "0.5", *flags])
    video = cfg.vid_size is not None
    run = train.Run.__new__(train.Run)  # only encode_text's state: no data, no model
    run.cfg, run.info, run.text_encoder = cfg, type("Info", (), dict(rank=0, world_size=1))(), Recorder()
    run.cuda, run.captions_unchecked = False, True
    meta = {"fps": [8.0 if video else 0.0] * 8, "aspect": ["16:9"] * 8}
    run.encode_text(["a cat"] * 8, meta, train.step_generator(0, 0))
    trained = set(run.text_encoder.texts)
    assert len(trained) == 2  # the caption, and the null prompt of the dropped labels

    pipe = STARFlowPipeline.__new__(STARFlowPipeline)
    pipe.config, pipe.text_encoder, pipe.dtype = cfg, Recorder(), torch.float32
    pipe.video, pipe.train_frames, pipe.train_fps = video, 5 if video else 1, 8 if video else 0
    request = type("Request", (), dict(captions=["a cat"], cfg=3.0, fps=8 if video else 0, noise_std=0.4,
                                       negatives=None))()
    pipe.encode_prompt(request, "16:9")
    assert set(pipe.text_encoder.texts) == trained


def test_denoiser_target_makes_the_learned_step_the_score_step(device):
    """x - step * target equals the flow's own Tweedie step: the self-denoiser learns exactly what the score
    step computes."""
    model = tiny_model(device=device)
    x, y = tiny_inputs(model, device=device)
    x.requires_grad_(True)
    z, _, logdets = model(x, y)
    target = recipe.denoiser_target("score", x, None, 0.5, z, logdets)
    torch.testing.assert_close(x.detach() - recipe.LEARNED_DENOISER_STEP * target,
                               model.score_denoise(x, y, 0.5), atol=1e-5, rtol=1e-5)


def test_clean_denoiser_target_makes_the_learned_step_land_on_the_clean_latents():
    """denoiser_target 'clean': a perfect prediction turns the noisy latents back into the clean ones through the
    same step sampling takes (x - step * prediction), whatever the noise level."""
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = recipe.noise_augment(x0, 0.4, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)))
    target = recipe.denoiser_target("clean", x, x0, 0.4)
    assert not target.requires_grad
    torch.testing.assert_close(x - recipe.LEARNED_DENOISER_STEP * target, x0)


def test_more_score_steps_repeat_the_step_and_climb_to_the_mode():
    """score_steps k applies the flow's Tweedie step k times; on a density whose data are two points (+-1 in every
    dimension, sigma-noisy: Tweedie's step is tanh(x / sigma^2)) the steps converge on the clean values."""
    model = tiny_model()
    x, y = tiny_inputs(model)
    twice = recipe.denoise(model, x, y, 0.3, "score", torch.float32, score_steps=2)
    torch.testing.assert_close(twice, model.score_denoise(model.score_denoise(x, y, 0.3), y, 0.3))

    class TwoPoints:
        def score_denoise(self, x, y, noise_std):  # x + sigma^2 grad log p(x) for p = (N(-1, s^2) + N(1, s^2)) / 2
            return torch.tanh(x / noise_std ** 2)

    clean = torch.randint(0, 2, (4096,), generator=torch.Generator().manual_seed(1)).float() * 2 - 1
    noisy = clean + 0.4 * torch.randn(4096, generator=torch.Generator().manual_seed(0))
    near = (noisy * clean) > 0.25  # the noise left x on its clean value's side
    errors = [(recipe.denoise(TwoPoints(), noisy[None, None, None], None, 0.4, "score", torch.float32,
                              score_steps=k)[0, 0, 0] - clean)[near].abs().max() for k in (1, 2)]
    assert errors[0] > 0.05 and errors[1] < 1e-3


def test_loss_weight_follows_the_noise_level():
    assert recipe.loss_weight(load_config(None, ["--noise_std", "0.6"])) is None
    assert recipe.loss_weight(load_config(None, ["--noise_std", "0.6", "--cond_noise_level", "1"])) == \
        pytest.approx(2.0)


@pytest.mark.parametrize("requested, has_learned, finetuned, want", [
    ("auto", True, False, "learned"), ("auto", False, False, "score"), ("auto", True, True, "none"),
    ("score", True, False, "score"), ("none", False, False, "none"), ("learned", True, False, "learned"),
])
def test_choose_denoiser(requested, has_learned, finetuned, want):
    assert recipe.choose_denoiser(requested, has_learned, finetuned) == want


@pytest.mark.parametrize("requested, match", [("learned", "no learnable self-denoiser"), ("tweedie", "one of")])
def test_choose_denoiser_refuses(requested, match):
    with pytest.raises(ValueError, match=match):
        recipe.choose_denoiser(requested, has_learned=False)


def test_uniform_and_gaussian_unit_noise():
    g = torch.Generator().manual_seed(0)
    draw = lambda fn, shape: fn(shape, generator=g)  # noqa: E731
    u = recipe.unit_noise("uniform", (10000,), draw)
    n = recipe.unit_noise("gaussian", (10000,), draw)
    assert u.min() >= -1 and u.max() <= 1 and abs(u.mean()) < 0.05
    assert abs(n.std() - 1) < 0.05
    x0 = torch.zeros(3)
    torch.testing.assert_close(recipe.noise_augment(x0, 0.3, torch.ones(3)), torch.full((3,), 0.3))


def test_slerp_keeps_the_norm_and_ends_at_both_points(device):
    """The arc between equal-norm orthogonal points keeps their norm (the straight line dips to 1/sqrt(2)); its
    ends are the points exactly, on any device (no float64 tensors: MPS has none); parallel points fall back to
    the line."""
    a = torch.zeros(2, 3, device=device)
    b = torch.zeros(2, 3, device=device)
    a[0, 0], b[1, 2] = 2.0, 2.0
    path = recipe.slerp(a, b, [0.0, 0.25, 0.5, 1.0])
    assert path.shape == (4, 2, 3) and path.device == a.device and path.dtype == a.dtype
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    torch.testing.assert_close(path.flatten(1).norm(dim=1), torch.full((4,), 2.0))
    torch.testing.assert_close(path[2], (a + b) / 2 ** 0.5)
    torch.testing.assert_close(recipe.slerp(a, 3 * a, [0.5])[0], 2 * a)
