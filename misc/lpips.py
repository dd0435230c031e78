"""LPIPS perceptual distance (Zhang et al. 2018): unit-normalised VGG16 features weighted by learned 1x1 heads.

Weights never download at run time. They load from a file or folder (safetensors, or .pth read with weights_only=True)
or from the usual caches: the VGG16 backbone from the Hugging Face cache (timm/vgg16.tv_in1k) or torch hub
(vgg16-397923af.pth), the linear heads from an installed `lpips` package (lpips/weights/v0.1/vgg.pth).
"""
import importlib.util
import re
from pathlib import Path

import torch
import torch.nn as nn

from utils.checkpoint import load_state_dict_file
from utils.errors import UserError

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16.features numbering
TAP_CHANNELS = (64, 128, 256, 512, 512)
HF_BACKBONE = ("timm/vgg16.tv_in1k", "model.safetensors")
TORCH_HUB_BACKBONE = "vgg16-397923af.pth"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

HOW_TO_GET = (
    "Get them with `pip install --no-deps lpips` (linear heads, lpips/weights/v0.1/vgg.pth) and "
    "`hf download timm/vgg16.tv_in1k model.safetensors` (VGG16 backbone, into the Hugging Face cache), "
    "or put both files in one folder and pass --lpips_weights FOLDER; or train without LPIPS: --lpips 0"
)


def _vgg16_features():
    """VGG16 conv stack up to relu5_3, indexed like torchvision's vgg16().features so its weights load by name."""
    layers, channels = [], 3
    for width in VGG16_LAYOUT:
        if width == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG distance between images in [-1, 1]; build it with `load_lpips`."""

    def __init__(self):
        super().__init__()
        self.features = _vgg16_features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        # Input whitening the heads were trained with (the lpips "scaling layer").
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x):
        x = (x - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                taps.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return taps

    def forward(self, a, b):
        """Per-sample distance, shape (B,); a, b: (B,3,H,W) images or (B,3,T,H,W) videos (mean over frames)."""
        if a.shape != b.shape or a.shape[1] != 3 or a.dim() not in (4, 5):
            raise ValueError(f"LPIPS needs two RGB batches of one shape (B,3,H,W) or (B,3,T,H,W), got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        frames = a.shape[2] if a.dim() == 5 else 1
        if a.dim() == 5:
            a, b = (v.transpose(1, 2).flatten(0, 1) for v in (a, b))
        dist = sum(head((fa - fb).pow(2)).mean(dim=(1, 2, 3))
                   for head, fa, fb in zip(self.heads, self._taps(a), self._taps(b)))
        return dist.view(-1, frames).mean(dim=1)


def _canonical_key(key):
    """Map torchvision/timm VGG16, lpips-package and our own key names onto this module's; None = not ours."""
    if re.fullmatch(r"features\.\d+\.(weight|bias)", key):
        return key
    m = re.fullmatch(r"net\.slice\d\.(\d+\.(?:weight|bias))", key)  # a saved lpips.LPIPS state dict
    if m:
        return "features." + m.group(1)
    m = re.fullmatch(r"lin(\d)\.model\.\d\.weight", key)  # lpips/taming linear heads (with or without dropout)
    if m:
        return f"heads.{m.group(1)}.weight"
    return key if re.fullmatch(r"heads\.\d\.weight", key) else None


def _default_weight_files():
    """The cache locations searched when no --lpips_weights is given (only files that exist)."""
    from huggingface_hub import try_to_load_from_cache

    found = []
    cached = try_to_load_from_cache(*HF_BACKBONE)
    if isinstance(cached, str):
        found.append(Path(cached))
    found.append(Path(torch.hub.get_dir()) / "checkpoints" / TORCH_HUB_BACKBONE)
    spec = importlib.util.find_spec("lpips")  # locates the package without importing it (it needs torchvision)
    if spec is not None and spec.submodule_search_locations:
        found.append(Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth")
    return [p for p in found if p.is_file()]


def _weight_files(weights):
    if weights is None:
        return _default_weight_files()
    path = Path(weights).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    raise UserError(f"LPIPS weights not found: {path} does not exist. {HOW_TO_GET}")


def load_lpips(weights=None, device="cpu"):
    """LPIPS with its VGG16 backbone and heads from `weights` (file or folder) or the caches; UserError if missing."""
    model = LPIPS()
    expected = model.state_dict()
    state, files = {}, _weight_files(weights)
    for path in files:
        for key, tensor in load_state_dict_file(path, "LPIPS weights").items():
            name = _canonical_key(key)
            if name in expected and name not in state:
                if tensor.shape != expected[name].shape:
                    raise UserError(f"{path}: '{key}' has shape {tuple(tensor.shape)}, LPIPS-VGG16 needs "
                                    f"{tuple(expected[name].shape)}; is this a VGG16 / lpips-vgg file?")
                state[name] = tensor.float()
    missing = [k for k in expected if k not in state]
    if missing:
        parts = [name for name, prefix in (("the VGG16 backbone", "features."), ("the linear heads", "heads."))
                 if any(k.startswith(prefix) for k in missing)]
        looked = ", ".join(str(p) for p in files) or "no weight files"
        where = f"in {weights}" if weights is not None else \
            "in the Hugging Face cache, torch hub cache or lpips package"
        raise UserError(f"LPIPS weights incomplete: {' and '.join(parts)} not found {where} (read: {looked}). "
                        f"{HOW_TO_GET}")
    model.load_state_dict(state)
    return model.to(device)
