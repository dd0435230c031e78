"""Loading pretrained parts (hub ids or folders) and STARFlow weights (.pth, safetensors) with clear errors."""
import os
import pickle
import re
import socket
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file, save_file

from utils.errors import UserError, first_line
from utils.files import atomic_path

# Where STARFlow's own weights come from, for a --checkpoint_path that does not exist
OFFICIAL_WEIGHTS = ("the official checkpoints (starflow_3B_t2i_256x256.pth, starflow-v_7B_t2v_caus_480p_v3.pth) are at "
                    "huggingface.co/apple/starflow: download them into ckpts/, or pass a train.py checkpoint folder")


def looks_like_path(name):
    """True when `name` is meant as a filesystem path rather than a hub id."""
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name) or name.count("/") > 1


def fetch_hint(name, include=None):
    """The command that puts hub weights on disk, for error messages."""
    extra = f' --include "{include}"' if include else ""
    return (f"Download it while online with `hf download {name}{extra}` (`huggingface-cli download` on older "
            f"huggingface_hub), or point the config at a local folder that holds it")


def hub_reachable():
    """Whether the hub's host name resolves (False on a machine with no network, or no DNS)."""
    try:
        socket.getaddrinfo(urlparse(hub_constants.ENDPOINT).hostname, 443)
        return True
    except OSError:
        return False


def from_pretrained(cls, name, what, include=None, **kwargs):
    """`cls.from_pretrained(name, **kwargs)`, turning a missing folder or unreachable hub into one UserError."""
    if looks_like_path(name):
        path = os.path.expanduser(name)
        if not os.path.isdir(path):
            raise UserError(f"{what} folder '{name}' does not exist; pass a folder written by save_pretrained "
                            f"or a Hugging Face hub id")
        name = path
    elif not hub_constants.HF_HUB_OFFLINE and not hub_reachable():
        kwargs["local_files_only"] = True  # the cache or one error now, not the hub client's 30 s of retries
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        where = f" (subfolder '{kwargs['subfolder']}')" if kwargs.get("subfolder") else ""
        if looks_like_path(name):
            raise UserError(f"cannot load {what} from folder '{name}'{where}: {first_line(e)}") from None
        raise UserError(f"cannot load {what} '{name}'{where}: {first_line(e)}. The weights are not on disk. "
                        f"{fetch_hint(name, include)}") from None


WRAPPER_KEYS = ("model", "state_dict", "module", "model_state_dict")
KEY_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def current_checkpoint(path):
    """A train.py run folder, or its checkpoints/latest, -> the step folder `latest` points to now (so a sample
    records the weights it came from: latest moves on while training goes on); other paths unchanged."""
    name = os.path.basename(os.path.normpath(path))
    for latest in (os.path.join(path, "checkpoints", "latest"), path if name == "latest" else None):
        if latest and os.path.isfile(os.path.join(latest, "model.safetensors")):
            return os.path.realpath(latest)
    return path


EMA_WEIGHTS = "ema.safetensors"  # beside model.safetensors in a checkpoint of a run with ema_decay > 0


def checkpoint_weights(path, ema=True):
    """The weights a checkpoint path stands for: a train.py checkpoint folder's moving average where `ema` and it
    has one, else the path itself (load_state_dict_file reads a folder's model.safetensors)."""
    average = os.path.join(path, EMA_WEIGHTS)
    return average if ema and os.path.isfile(average) else path


def load_state_dict_file(path, what="checkpoint"):
    """Read a flat tensor dict from .safetensors or a weights-only .pth; unwrap 'model'/'state_dict' nesting and
    'module.'/'_orig_mod.' prefixes (DDP / torch.compile)."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "model.safetensors")):  # a training checkpoint folder (train.py)
        path = os.path.join(path, "model.safetensors")
    if os.path.isdir(path):
        raise UserError(f"{what} '{path}' is a folder (a torch.distributed checkpoint?); convert it to one file "
                        f"first, e.g. `python -m torch.distributed.checkpoint.format_utils dcp_to_torch {path} "
                        f"out.pth`")
    if not os.path.isfile(path):
        hint = OFFICIAL_WEIGHTS if what == "checkpoint" else "check the path"
        raise UserError(f"{what} file '{path}' not found; {hint}")
    try:
        state = load_file(path) if path.endswith(".safetensors") else torch_load(path, what, mmap=True)
    except UserError:
        raise
    except Exception as e:  # any parse failure means the file itself is unusable
        raise UserError(f"cannot read {what} '{path}': {first_line(e)}. Is the file complete and a weights file "
                        f"(.pth state_dict or .safetensors)?") from None
    while isinstance(state, dict):
        nested = [k for k in WRAPPER_KEYS if isinstance(state.get(k), dict)]
        if not nested:
            break
        state = state[nested[0]]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise UserError(f"{what} '{path}' does not hold a state dict of tensors")
    return {_strip_prefixes(k): v for k, v in state.items()}


def torch_load(path, what="checkpoint", mmap=False):
    """torch.load that never unpickles code (weights_only=True; mmap: memory-mapped where the format allows): a file
    holding other Python objects is one UserError saying so, and how to convert a file one trusts."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and _is_zip(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        named = f" ({found.group(1)})" if found else ""
        raise UserError(f"{what} '{path}' holds more than tensors: it pickles Python objects{named}, and loading it "
                        f"could run code, so it was not loaded. To use a file you trust, convert it once to "
                        f"safetensors: in Python allow just the objects it names with "
                        f"torch.serialization.add_safe_globals([...]), torch.load it, and write its tensors with "
                        f"safetensors.torch.save_file(state_dict, 'model.safetensors'); then pass that file") from None


def _is_zip(path):
    """torch.save's zip format can be memory-mapped (no second copy of a 15 GB checkpoint in RAM)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _strip_prefixes(key):
    stripped = True
    while stripped:
        stripped = False
        for prefix in KEY_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key.replace("._orig_mod.", ".")


def check_fit(expected, state, what, hint=""):
    """Raise one UserError listing missing keys, unexpected keys and shape mismatches between two state dicts."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = [_few("shape mismatches", wrong), _few("missing keys", missing), _few("unexpected keys", unexpected)]
        raise UserError(f"{what} does not fit the model: " + "; ".join(p for p in parts if p)
                        + (f". {hint}" if hint else ""))


def _few(label, items, limit=6):
    if not items:
        return ""
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} {label}: {', '.join(items[:limit])}{more}"


def save_weights(state, path, metadata=None):
    """Write a tensor dict as safetensors atomically, so a crash never leaves half a file."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp, metadata=metadata)


FIT_HINT = ("Pass the --model_config_path this checkpoint was trained with (layers_per_block, channels, "
            "channel_size, txt_size, learnable_self_denoiser, ... must match)")


def load_model_weights(model, checkpoint, skip=None, assign=False, fix=FIT_HINT):
    """Load STARFlow weights (a .pth/.safetensors path or a state dict read by load_state_dict_file) into `model`;
    anything that doesn't fit is one UserError, ending in `fix`.

    skip: predicate on key names that the checkpoint may carry but the model rebuilds itself (deprecated buffers).
    assign: take the checkpoint's tensors as the parameters (for a model built on the meta device).
    """
    state = load_state_dict_file(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    if skip is not None:
        state = {k: v for k, v in state.items() if not skip(k)}
    source = f"checkpoint '{checkpoint}'" if isinstance(checkpoint, (str, os.PathLike)) else "checkpoint"
    check_fit(model.state_dict(), state, source, fix)
    model.load_state_dict(state, assign=assign)
    return model
