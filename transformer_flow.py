"""STARFlow: a deep-shallow stack of transformer autoregressive affine flows.

The flow's structure comes first (FlowConfig and the official presets); then the network (norms, attention, MLP,
KV cache); then the flow math (MetaBlock: density pass, sequential and block-wise Jacobi inversion, guidance) and
the model stack (Model). Flow arithmetic runs in float32. The training and sampling recipe around the flow (noise,
loss weights, denoisers, prompts) lives in utils/recipe.py.
"""
import dataclasses
import functools
import math
import re
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from misc.linear import Linear, prepacked
from misc.pe import RotaryEmbedding, apply_rope, grid_positions

SOFTPLUS_OFFSET = math.log(math.e - 1)  # softplus(0 + offset) == 1, so a zero network output is the identity map
DEPRECATED_KEYS = re.compile(r"^(var|feat_rope\.freqs_(cos|sin)|blocks\.\d+\.attn_mask)$")
NORM_TYPES = ("layer_norm", "rms_norm")
SEQ_ORDERS = ("L2R", "R2L")
# Keywords the official constructor takes for features it never had (or never released); only these values load.
UNSUPPORTED = {"use_pretrained_lm": (None, "a Gemma top block (its weights were never released)"),
               "use_mm_attn": (False, "multimodal attention (it had no effect in the original either)")}


# ------------------------------------------------------------------------------------------------ structure

@dataclass
class FlowConfig:
    """The structure of a STARFlow model; Model(FlowConfig(...)) or Model(**official_keywords) builds it."""
    in_channels: int  # latent channels C of the data (4 for SD-VAE, 48 for Wan2.2, 3 or 1 in pixel space)
    img_size: int  # latent side the model is built for; sets the learned position table (rope off) and pt_seq_len
    patch_size: int  # p: p x p latent patches become one token of p*p*C values
    channels: int  # transformer width of every step (the deep step: top_block_channels when set)
    num_blocks: int  # flow steps K, shallow ones first (data side), the deep one last (noise side)
    layers_per_block: list  # transformer layers of each step, e.g. [2, 2, 2, 2, 2, 24]; 0 makes an identity step
    head_dim: int = 64  # attention head width
    num_heads: int = None  # attention heads; None = width // head_dim
    num_kv_heads: int = None  # key/value heads (grouped-query attention); None = num_heads
    rope: bool = False  # rotary positions over (row, col[, frame]) instead of a learned position table
    pt_seq_len: int = None  # RoPE grid length the mean side is stretched to; None = img_size // patch_size
    sos: bool = False  # a learned start token, so that the first token is transformed too (Jacobi needs it)
    txt_size: int = 0  # text tokens of the prompt prefix (0 = unconditional)
    txt_dim: int = 0  # width of the text encoder's states (2048 for flan-t5-xl)
    cond_top_only: bool = False  # only the deep step sees the text; shallow steps are unconditional
    use_softplus: bool = False  # sigma = softplus(a + log(e - 1)) instead of exp(a)
    use_swiglu: bool = False  # gated (tanh-GELU) MLP instead of Linear-GELU-Linear
    use_bias: bool = True  # biases in attention and gated-MLP projections
    use_qk_norm: bool = False  # RMS-normalise queries and keys per head
    use_post_norm: bool = False  # RMSNorm after attention and MLP (sandwich layers)
    use_final_norm: bool = False  # RMSNorm before each step's output projection
    hf_style_rope: bool = False  # rotate (i, i + d/2) pairs (Hugging Face convention) instead of (2i, 2i + 1)
    norm_type: str = "layer_norm"  # pre-norm of every layer: layer_norm or rms_norm
    use_checkpoint: int = 0  # activation-checkpoint the attention of every N-th layer in training (0 = off)
    use_checkpoint_mlp: int = None  # the same for MLPs; None = use_checkpoint
    soft_clip: float = 0.0  # squash step outputs to s * tanh(o / s) (0 = off)
    seq_order: str = "R2L"  # token order of the last step: L2R raster order or R2L reversed; steps alternate
    learnable_self_denoiser: bool = False  # add the bidirectional denoiser STARFlow-V trains alongside
    denoiser_layers: int = 8  # its transformer layers (8 in STARFlow-V)
    conditional_denoiser: bool = False  # the denoiser sees the text too
    temporal_causal: int = 0  # video: reverse tokens inside each frame so the flow stays causal in time (> 0);
    #                           also the denoiser's look-ahead in frames (1 causal, 2 one frame ahead)
    top_block_channels: int = None  # a wider deep step (4096 in the 7B model); None = channels
    shallow_block_local: bool = False  # video: shallow steps act on each frame alone
    denoiser_window: int = None  # video: latent frames the denoiser looks back; None = all
    local_attn_window: int = None  # video: latent frames the deep step attends to (sliding window); None = all

    def __post_init__(self):
        if isinstance(self.layers_per_block, int):
            self.layers_per_block = [self.layers_per_block] * self.num_blocks
        self.layers_per_block = list(self.layers_per_block)
        for name in ("in_channels", "img_size", "patch_size", "channels", "num_blocks", "head_dim", "denoiser_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if len(self.layers_per_block) != self.num_blocks:
            raise ValueError(f"layers_per_block has {len(self.layers_per_block)} entries for "
                             f"num_blocks={self.num_blocks}")
        if any(n < 0 for n in self.layers_per_block) or self.layers_per_block[-1] < 1:
            raise ValueError(f"layers_per_block {self.layers_per_block}: counts must be >= 0 and the deep step "
                             f"(the last) needs at least one layer")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {', '.join(NORM_TYPES)}, got {self.norm_type!r}")
        if self.seq_order not in SEQ_ORDERS:
            raise ValueError(f"seq_order must be 'L2R' or 'R2L', got {self.seq_order!r}")
        if self.temporal_causal < 0:
            raise ValueError(f"temporal_causal must be 0 (off) or a look-ahead of 1 or more, "
                             f"got {self.temporal_causal}")
        if self.temporal_causal and self.seq_order != "L2R":
            raise ValueError("temporal_causal needs seq_order 'L2R'")
        if self.local_attn_window and not self.shallow_block_local:
            raise ValueError("local_attn_window needs shallow_block_local (the window applies to the deep block only)")
        if self.shallow_block_local and not self.cond_top_only:
            raise ValueError("shallow_block_local needs cond_top_only (frame-local steps see no text)")
        for name in ("channels", "top_block_channels"):
            width = getattr(self, name)
            if width and self.num_heads is None and width % self.head_dim:
                raise ValueError(f"{name} {width} is not a multiple of head_dim {self.head_dim}; "
                                 f"set num_heads or change head_dim")

    @classmethod
    def from_kwargs(cls, **kwargs):
        """The official Model constructor's keywords -> FlowConfig; features it never had refuse other values."""
        for name, (allowed, what) in UNSUPPORTED.items():
            value = kwargs.pop(name, allowed)
            if bool(value) != bool(allowed):
                raise ValueError(f"{name}={value!r} asks for {what}, which is not supported; leave it at {allowed}")
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown Model keywords: {', '.join(unknown)}")
        return cls(**kwargs)


def STARFlow_3B_T2I_256(**overrides):
    """The official 3B text-to-image model (3,858,281,544 parameters): 256x256 px through the SD VAE (32x32x4
    latents), flan-t5-xl text in the deep step, five 2-layer shallow steps and a 24-layer deep step, 3072 wide."""
    return FlowConfig(**dict(dict(
        in_channels=4, img_size=32, patch_size=1, channels=3072, num_blocks=6, layers_per_block=[2, 2, 2, 2, 2, 24],
        rope=True, sos=True, txt_size=128, txt_dim=2048, cond_top_only=True, use_softplus=True, use_final_norm=True,
        soft_clip=4.0, seq_order="L2R"), **overrides))


def STARFlowV_7B_T2V_480p(**overrides):
    """The official 7B text-to-video model (6,890,096,528 parameters): 480p clips through the Wan2.2 VAE (48
    channels, 16x in space, 4x in time), causal in time, frame-local shallow steps, a 4096-wide deep step and
    the text-conditioned learnable self-denoiser."""
    return FlowConfig(**dict(dict(
        in_channels=48, img_size=40, patch_size=1, channels=3072, num_blocks=6, layers_per_block=[2, 2, 2, 2, 2, 24],
        rope=True, pt_seq_len=32, sos=True, txt_size=256, txt_dim=2048, cond_top_only=True, use_softplus=True,
        use_final_norm=True, use_checkpoint=1, use_checkpoint_mlp=1, soft_clip=4.0, seq_order="L2R",
        learnable_self_denoiser=True, conditional_denoiser=True, temporal_causal=2, top_block_channels=4096,
        shallow_block_local=True, denoiser_window=10), **overrides))


PRESETS = {"starflow-3b-t2i-256": STARFlow_3B_T2I_256, "starflow-v-7b-t2v-480p": STARFlowV_7B_T2V_480p}


# ----------------------------------------------------------------------------------------------------- network

class RMSNorm(nn.Module):
    """Gemma-style RMSNorm computed in float32: x / rms(x) * (1 + weight), weight initialised to zero."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight.float())
        return y.to(x.dtype)


def make_norm(norm_type, dim):
    if norm_type == "layer_norm":
        return nn.LayerNorm(dim)
    if norm_type == "rms_norm":
        return RMSNorm(dim)
    raise ValueError(f"norm_type must be one of {', '.join(NORM_TYPES)}, got {norm_type!r}")


class KVCache:
    """Keys (after RoPE) and values of every layer of one block, written at a cursor for incremental decoding.

    With `slot` set (a (1,) long tensor), one token is written at that slot and the whole buffer is returned, the
    free slots masked by the trunk: every call has the same shapes, as a compiled decoding step needs."""

    def __init__(self, max_len):
        self.max_len = max_len
        self.length = 0
        self.text_len = 0  # slots taken by the text prefix
        self.keys, self.values = {}, {}
        self.slot = None

    def reserve(self, attentions, batch, dtype, device):
        """Allocates every layer's buffers before a compiled step, which must not create them."""
        for layer, attn in enumerate(attentions):
            if layer not in self.keys:
                shape = (batch, attn.num_kv_heads, self.max_len, attn.head_dim)
                self.keys[layer] = torch.zeros(shape, dtype=dtype, device=device)
                self.values[layer] = torch.zeros(shape, dtype=dtype, device=device)

    def visible(self):
        """The keys the token at `slot` sees: (1, max_len) boolean, every slot up to its own."""
        return (torch.arange(self.max_len, device=self.slot.device) <= self.slot)[None]

    def write(self, layer, k, v):
        """Stores k, v (B, H, n, d) at [length, length + n) and returns everything up to there (with `slot`: the
        one token at slot, and the whole buffer)."""
        if self.slot is not None:
            self.keys[layer].index_copy_(2, self.slot, k)
            self.values[layer].index_copy_(2, self.slot, v)
            return self.keys[layer], self.values[layer]
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} > {self.max_len} slots")
        if layer not in self.keys:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys[layer], self.values[layer] = k.new_zeros(shape), v.new_zeros(shape)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def commit(self, n):
        """Keeps the last n written slots; unkept writes are overwritten by the next pass (Jacobi iterations)."""
        self.length += n


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) attention with RoPE, qk-norm, post-norm and an optional KV cache."""

    def __init__(self, channels, *, head_dim, norm_type="layer_norm", num_heads=None, num_kv_heads=None,
                 use_qk_norm=False, use_post_norm=False, use_bias=True, hf_style_rope=False, non_causal=False):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = num_heads or channels // head_dim
        self.num_kv_heads = num_kv_heads or self.num_heads
        self.hf_style_rope = hf_style_rope
        self.non_causal = non_causal
        self.norm = make_norm(norm_type, channels)
        self.qkv = Linear(channels, (self.num_heads + 2 * self.num_kv_heads) * head_dim, bias=use_bias)
        self.proj = Linear(self.num_heads * head_dim, channels, bias=use_bias)
        # optional parts are None when absent (no state-dict keys), and checked without hasattr's exception path
        self.query_norm, self.key_norm = (RMSNorm(head_dim), RMSNorm(head_dim)) if use_qk_norm else (None, None)
        self.post_norm = RMSNorm(channels) if use_post_norm else None

    def forward(self, u, rope=None, mask=None, cache=None, layer=0, temp=1.0):
        """mask: the keys each query may see, (lq, lk) boolean; None means causal (all keys when non_causal, or for
        a single query: the newest token)."""
        d, H, Hkv = self.head_dim, self.num_heads, self.num_kv_heads
        qkv = self.qkv(self.norm(u)).unflatten(-1, (-1, d)).transpose(1, 2)  # (B, H + 2 Hkv, L, d)
        # split, not slicing: a slice's gradient is a zero tensor of the whole input, a split's one concatenation
        qk, v = qkv.split([H + Hkv, Hkv], 1)
        if self.query_norm is not None:
            q, k = qk.split([H, Hkv], 1)
            qk = torch.cat([self.query_norm(q), self.key_norm(k)], 1)
        if rope is not None:
            qk = apply_rope(qk, rope, self.hf_style_rope)  # queries and keys in one product
        q, k = qk.split([H, Hkv], 1)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        q, k, v = q.to(u.dtype), k.to(u.dtype), v.to(u.dtype)
        lq, lk = q.shape[2], k.shape[2]
        is_causal = mask is None and not self.non_causal and lq == lk and lq > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             scale=d ** -0.5 / temp, enable_gqa=Hkv != H)
        out = self.proj(out.transpose(1, 2).flatten(2))
        return out if self.post_norm is None else self.post_norm(out)


class MLP(nn.Module):
    """Pre-norm feed-forward: Linear-GELU-Linear, or a tanh-GELU gated unit when use_swiglu."""

    def __init__(self, channels, *, expansion=4, use_swiglu=False, norm_type="layer_norm", use_post_norm=False,
                 use_bias=True):
        super().__init__()
        hidden = int(channels * expansion)
        self.norm = make_norm(norm_type, channels)
        self.main = None
        if use_swiglu:
            self.gate_proj = Linear(channels, hidden, bias=use_bias)
            self.up_proj = Linear(channels, hidden, bias=use_bias)
            self.down_proj = Linear(hidden, channels, bias=use_bias)
        else:
            self.main = nn.Sequential(Linear(channels, hidden), nn.GELU(), Linear(hidden, channels))
        self.post_norm = RMSNorm(channels) if use_post_norm else None

    def forward(self, x):
        x = self.norm(x)
        if self.main is not None:
            fc1, _, fc2 = self.main
            x = fc2(fc1(x, activation="gelu"))  # on AMD CPUs, the matmul and its GELU are one oneDNN call
        else:
            x = self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
        return x if self.post_norm is None else self.post_norm(x)


class AttentionBlock(nn.Module):
    """A pre-norm transformer layer over the joint sequence [text; image]; the unit that FSDP shards. It takes and
    returns the joint sequence whole: the trunk joins and parts it once, not at every layer (two copies a layer in
    training, and FSDP2 warns of a view as a layer's output)."""

    def __init__(self, channels, *, head_dim, expansion=4, use_swiglu=False, norm_type="layer_norm", num_heads=None,
                 num_kv_heads=None, use_qk_norm=False, use_post_norm=False, use_bias=True, hf_style_rope=False,
                 non_causal=False, checkpoint_attn=False, checkpoint_mlp=False):
        super().__init__()
        self.attention = Attention(channels, head_dim=head_dim, norm_type=norm_type, num_heads=num_heads,
                                   num_kv_heads=num_kv_heads, use_qk_norm=use_qk_norm, use_post_norm=use_post_norm,
                                   use_bias=use_bias, hf_style_rope=hf_style_rope, non_causal=non_causal)
        self.mlp = MLP(channels, expansion=expansion, use_swiglu=use_swiglu, norm_type=norm_type,
                       use_post_norm=use_post_norm, use_bias=use_bias)
        self.checkpoint_attn, self.checkpoint_mlp = checkpoint_attn, checkpoint_mlp

    def forward(self, s, rope=None, mask=None, cache=None, layer=0, temp=1.0):
        if self.training and self.checkpoint_attn:
            s = s + checkpoint(self.attention, s, rope, mask, cache, layer, temp, use_reentrant=False)
        else:
            s = s + self.attention(s, rope, mask, cache, layer, temp)
        return s + (checkpoint(self.mlp, s, use_reentrant=False) if self.training and self.checkpoint_mlp else
                    self.mlp(s))


class Trunk(nn.Module):
    """proj_in -> transformer layers over [text; tokens] -> final norm -> proj_out, shared by flow and denoiser."""

    def __init__(self, in_channels, out_channels, channels, num_layers, *, head_dim=64, num_heads=None,
                 num_kv_heads=None, txt_dim=0, use_swiglu=False, use_qk_norm=False, use_post_norm=False,
                 use_final_norm=False, use_bias=True, hf_style_rope=False, norm_type="layer_norm", use_checkpoint=0,
                 use_checkpoint_mlp=None, non_causal=False, expansion=4):
        super().__init__()
        ckpt_mlp = use_checkpoint if use_checkpoint_mlp is None else use_checkpoint_mlp
        self.proj_in = Linear(in_channels, channels)
        self.proj_out = Linear(channels, out_channels)
        nn.init.zeros_(self.proj_out.weight)  # every flow step (and the denoiser) starts as the identity
        self.proj_txt = Linear(txt_dim, channels) if txt_dim else None
        self.attn_blocks = nn.ModuleList([
            AttentionBlock(channels, head_dim=head_dim, expansion=expansion, use_swiglu=use_swiglu,
                           norm_type=norm_type, num_heads=num_heads, num_kv_heads=num_kv_heads,
                           use_qk_norm=use_qk_norm, use_post_norm=use_post_norm, use_bias=use_bias,
                           hf_style_rope=hf_style_rope, non_causal=non_causal,
                           checkpoint_attn=use_checkpoint > 0 and (i + 1) % use_checkpoint == 0,
                           checkpoint_mlp=bool(ckpt_mlp) and ckpt_mlp > 0 and (i + 1) % ckpt_mlp == 0)
            for i in range(num_layers)])
        self.final_norm = RMSNorm(channels) if use_final_norm else None

    @property
    def has_text(self):
        return self.proj_txt is not None

    def run(self, h, text=None, rope=None, slot=0, mask=None, cache=None, temp=1.0):
        """Runs the layers on hidden tokens h (after proj_in) preceded by raw text; rope rows start at `slot`."""
        text = self.proj_txt(text.to(self.proj_txt.weight.dtype)) if text is not None else None
        n = (0 if h is None else h.shape[1]) + (0 if text is None else text.shape[1])
        if cache is not None and cache.slot is not None:  # one token at a tensor slot (KVCache)
            rope = None if rope is None else rope.index_select(0, cache.slot)
            mask = cache.visible()
        elif rope is not None:
            rope = rope[slot:slot + n]
        if mask is None and cache is not None and cache.length and n > 1:
            # a chunk after cached tokens sees all of them and itself causally (a bottom-right aligned triangle)
            device = (h if h is not None else text).device
            mask = torch.ones(n, cache.length + n, dtype=torch.bool, device=device).tril(cache.length)
        s = h if text is None else text if h is None else torch.cat([text, h], 1)
        for i, layer in enumerate(self.attn_blocks):
            s = layer(s, rope, mask, cache, i, temp)
        if h is None:  # text alone: its keys and values are in the cache now
            return None
        h = s if text is None else s.split([text.shape[1], h.shape[1]], 1)[1]  # split: a slice's gradient is dense
        return self.proj_out(self.final_norm(h) if self.final_norm is not None else h)


# --------------------------------------------------------------------------------------------------- flow math

def permute(x, kind, frames):
    """Token order of a flow step on (B, L, D): identity, full flip, or flip inside each of `frames` frames."""
    if kind == "flip":
        return x.flip(1)
    if kind == "flip_in_frame":
        return x.unflatten(1, (frames, -1)).flip(2).flatten(1, 2)
    return x


def guide(mu, sigma, w):
    """Classifier-free guidance on the Gaussian p_c^(1+w) / p_u^w, with the variance ratio clamped to at most 1."""
    mu_c, mu_u = mu.chunk(2)
    sigma_c, sigma_u = sigma.chunk(2)
    s = (sigma_c / sigma_u).clamp(max=1).pow(2)
    denom = 1 + w - w * s
    mu_g, sigma_g = ((1 + w) * mu_c - w * s * mu_u) / denom, sigma_c / denom.sqrt()
    return torch.cat([mu_g, mu_g]), torch.cat([sigma_g, sigma_g])


@dataclass
class DecodeSchedule:
    """How an autoregressive step is inverted: chunks of tokens, each refined by fixed-point (Jacobi) iterations.

    The original's schedule: fixed chunks, every token of a chunk recomputed until the whole chunk stops changing.
    With `sliding`, the chunk is a window instead: after each iteration its longest converged prefix is committed
    to the KV cache and the window moves on, so a converged token is never evaluated again.
    """
    block_size: int = 1
    later_block_size: int = 1  # chunk size after the first frame of a video
    max_iter: int = 1
    threshold: float = 0.0
    sliding: bool = False
    guess: str = "input"  # first guess of undecoded tokens: "input" (the step's input z) or "zeros"
    compiled: bool = False  # token by token through one torch.compile'd step of fixed shapes (block_size 1 only)


SEQUENTIAL = DecodeSchedule()
# --jacobi auto (chosen with bench/sampling.py): per-token threshold, deep-step window and threshold, and how often a
# token may be evaluated before it is taken. The shallow steps iterate the whole sequence, at most twice per token;
# the deep step slides a window on accelerators (where a chunk costs about what one token does; its looser threshold
# saves a quarter of the passes at the same FID) and goes token by token on a CPU (where a chunk of W tokens costs
# nearly W tokens, and the deep step commits only a few per pass).
AUTO_SCHEDULE = dict(threshold=1e-3, shallow_evals=2, deep_window=64, deep_threshold=2e-2, deep_evals=32)


@dataclass
class _Decoding:
    """What MetaBlock.inverse carries from one chunk to the next."""
    buffer: torch.Tensor  # (B', 1 + L, D) with SOS, or (B', L, D): decoded tokens in generation order
    noise: torch.Tensor  # (B', steps, D): the noise each step turns into a token
    steps: int
    text: torch.Tensor
    text_len: int
    rope: torch.Tensor  # RoPE rotations of every slot, or None
    temp: float
    frames: int
    frame_len: int
    cache: KVCache
    offset: int = 0  # buffer index minus cache slot of the image tokens; moves when the window slides


@functools.cache
def compiled_next_tokens(device_type):
    """MetaBlock.next_tokens under torch.compile (fixed shapes: one graph per block structure and batch), built
    once per device type; the weights stay inputs of the graph (no freezing), so changed weights are used. On a CPU
    the graph is called through inductor's C++ wrapper, which costs less per call than its Python one."""
    return torch.compile(MetaBlock.next_tokens, fullgraph=True, dynamic=False,
                         options={"cpp_wrapper": device_type == "cpu"})


def auto_kind(device):
    """'cpu' or 'accelerator': which of AUTO_SCHEDULE's deep-step choices a device gets."""
    return "cpu" if device is None or torch.device(device).type == "cpu" else "accelerator"


def check_jacobi(block_size, max_iter, threshold):
    if int(block_size) < 1 or int(max_iter) < 1 or not threshold >= 0:  # a block of 0 tokens would never end
        raise ValueError(f"Jacobi decoding needs jacobi_block_size >= 1, jacobi_max_iter >= 1 and jacobi_th >= 0; "
                         f"got {block_size}, {max_iter}, {threshold}")


def jacobi_schedule(block_size, max_iter, threshold):
    """The original's block-wise Jacobi: chunks of block_size tokens in the first frame, 4x that afterwards."""
    check_jacobi(block_size, max_iter, threshold)
    return DecodeSchedule(block_size, 4 * block_size, max_iter, threshold)


def collective_device(device):
    """Where a collective's tensor must live: gloo reduces CPU tensors; NCCL (or a mixed backend) takes the
    decoding tensor's own device, this rank's GPU, never the bare 'cuda' of whichever GPU is current."""
    return torch.device("cpu") if dist.get_backend() == "gloo" else torch.device(device)


def all_ranks_min(value, device):
    """The smallest of an integer over ranks: a sliding window advances as far as it has converged on every rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(int(value), device=collective_device(device))
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())
    return value


def all_ranks_agree(flag, device):
    """Ranks of a sharded model must run the network equally often, so a stop needs every rank's consent.
    device: where the decoding runs."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(float(flag), device=collective_device(device))
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())
    return flag


class MetaBlock(Trunk):
    """One autoregressive affine flow step: z_i = (x_i - mu_i) / sigma_i with (mu_i, sigma_i) from x_<i."""

    def __init__(self, in_channels, channels, *, img_size, permutation="identity", num_layers=1, sos=False, rope=True,
                 use_softplus=False, soft_clip=0.0, **trunk_kwargs):
        super().__init__(in_channels, 2 * in_channels, channels, num_layers, **trunk_kwargs)
        self.permutation = permutation
        self.use_softplus = use_softplus
        self.soft_clip = soft_clip
        self.sos_embed = nn.Parameter(torch.randn(1, 1, in_channels)) if sos else None
        self.pos_embed = None if rope else nn.Parameter(torch.randn(img_size * img_size, channels) * 0.01)

    def step(self, u, text=None, rope=None, slot=0, cache=None, temp=1.0, frames=1, frame_len=None):
        """Predicts (mu, sigma) in float32 for the tokens that follow each input token of u (B, n, D).

        u sits at cache slot `slot` (text first when `text` is given); slots index the RoPE rows.
        """
        h = self.proj_in(u.to(self.proj_in.weight.dtype))
        if self.pos_embed is not None:
            table = self.position_table(frames, frame_len)
            if cache is not None and cache.slot is not None:
                h = h + table.index_select(0, cache.slot - cache.text_len)
            else:
                first = slot - (cache.text_len if cache is not None else 0)
                h = h + table[first:first + h.shape[1]]
        o = self.run(h, text, rope, slot, cache=cache, temp=temp)
        if self.soft_clip:
            o = self.soft_clip * torch.tanh(o / self.soft_clip)
        alpha, mu = o.float().chunk(2, dim=-1)
        sigma = F.softplus(alpha + SOFTPLUS_OFFSET) if self.use_softplus else alpha.exp()
        return mu, sigma

    def position_table(self, frames, frame_len):
        """Learned positions (no RoPE), tiled over frames and permuted with the tokens they belong to."""
        if frame_len != self.pos_embed.shape[0]:
            side = math.isqrt(self.pos_embed.shape[0])
            raise ValueError(f"learned positions (rope: 0) need a {side}x{side} token grid per frame, "
                             f"got {frame_len} tokens; use rope: 1 for other sizes and aspect ratios")
        table = self.pos_embed.repeat(frames, 1)[None]
        return permute(table, self.permutation, frames)[0]

    def forward(self, x, text=None, rope=None, frames=1, guidance=0.0):
        """Density direction on raster tokens x (B, L, D): returns z (raster order) and per-token log-dets (B, L, D).

        With guidance > 0 (text = cat([y_cond, y_uncond])) it is the exact inverse of guided decoding.
        """
        x = permute(x, self.permutation, frames)
        seq = torch.cat([self.sos_embed.expand(len(x), 1, -1).to(x.dtype), x], 1) if self.sos_embed is not None else x
        inp = torch.cat([seq[:, :-1]] * 2) if guidance > 0 else seq[:, :-1]
        mu, sigma = self.step(inp, text, rope, frames=frames, frame_len=x.shape[1] // frames)
        if guidance > 0:
            mu, sigma = (t[:len(x)] for t in guide(mu, sigma, guidance))
        z, logdet = (seq[:, 1:].float() - mu) / sigma, -sigma.log()
        if self.sos_embed is None:  # without SOS the first token has nothing to condition on and passes unchanged
            z, logdet = torch.cat([x[:, :1].float(), z], 1), F.pad(logdet, (0, 0, 1, 0))
        return permute(z.to(x.dtype), self.permutation, frames), logdet

    @torch.no_grad()
    def inverse(self, z, text=None, rope=None, frames=1, guidance=0.0, temp=1.0, schedule=SEQUENTIAL, prefix=None,
                window=None, context=0):
        """Noise -> data on raster tokens z (B, L, D); chunked fixed-point decoding, exact at convergence.

        prefix: known leading raster tokens (B, P, D) to continue. window/context (tokens): decode with the last
        `window` tokens visible, re-encoding the last `context` generated tokens from SOS when the window slides.
        """
        B, L, _ = z.shape
        if window is not None and self.sos_embed is None:
            raise ValueError("sliding-window decoding needs a model with an SOS token (sos: 1)")
        with prepacked(self):  # thousands of small matmuls on the same weights
            d = self._begin_decode(z, text, rope, frames, guidance, temp, window, schedule.guess)
            start = 0 if prefix is None else self._continue_prefix(d, prefix)
            target = d.steps if window is None else min(d.steps, window)
            while start < d.steps:
                if start == target:
                    target = min(d.steps, target + window - context)
                    self._slide_window(d, start, context)
                if schedule.sliding:
                    start = self._decode_sliding(d, start, target, schedule, guidance)
                    continue
                if schedule.compiled:
                    start = self._decode_compiled(d, start, target, guidance)
                    continue
                first_frame = start <= d.frame_len
                chunk = min(schedule.block_size if first_frame else schedule.later_block_size, target - start)
                self._decode_chunk(d, start, chunk, schedule, guidance)
                start += chunk
            x = d.buffer[:B, 1:] if self.sos_embed is not None else d.buffer[:B]
        return permute(x, self.permutation, frames)

    def _begin_decode(self, z, text, rope, frames, guidance, temp, window, guess="input"):
        """The decoding state: token buffer (undecoded tokens hold the first guess), noise in generation order, and
        a KV cache holding the text prefix."""
        L = z.shape[1]
        z = permute(z.float(), self.permutation, frames)
        if guidance > 0:
            z = torch.cat([z, z])
        # buffer[i + 1] = mu_i + sigma_i * noise[i], where (mu_i, sigma_i) comes from buffer[0..i]
        if self.sos_embed is not None:
            buffer, noise = torch.cat([self.sos_embed.float().expand(len(z), 1, -1), z], 1), z
        else:
            buffer, noise = z.clone(), z[:, 1:]
        steps = noise.shape[1]
        if guess == "zeros":
            buffer[:, -steps:] = 0
        text = text if self.has_text else None
        text_len = 0 if text is None else text.shape[1]
        d = _Decoding(buffer=buffer, noise=noise, steps=steps, text=text, text_len=text_len, rope=rope, temp=temp,
                      frames=frames, frame_len=L // frames,
                      cache=KVCache(text_len + (min(window, steps) if window else steps)))
        self.prefill(d.cache, text, rope, temp)
        return d

    def _continue_prefix(self, d, prefix):
        """Writes known leading tokens into the buffer and teacher-forces them into the cache; returns the first
        step still to decode."""
        if self.permutation == "flip":
            raise ValueError("continuing observed frames needs a temporally causal model (temporal_causal > 0)")
        known = permute(prefix.float(), self.permutation, prefix.shape[1] // d.frame_len)
        known = torch.cat([known] * (len(d.buffer) // len(known)))
        sos = int(self.sos_embed is not None)
        d.buffer[:, sos:sos + known.shape[1]] = known
        start = known.shape[1] - (1 - sos)
        self.encode_context(d.cache, d.buffer[:, :start], d.rope, d.text_len, d.temp, d.frames, d.frame_len)
        return start

    def _slide_window(self, d, start, context):
        """A fresh cache for the next window: text, SOS, then the last `context` decoded tokens re-encoded."""
        d.cache = KVCache(d.cache.max_len)
        self.prefill(d.cache, d.text, d.rope, d.temp)
        self.encode_context(d.cache, torch.cat([d.buffer[:, :1], d.buffer[:, start - context + 1:start]], 1),
                            d.rope, d.text_len, d.temp, d.frames, d.frame_len)
        d.offset = start - context

    def _decode_chunk(self, d, start, chunk, schedule, guidance):
        """Fixed-point iterations on tokens [start, start + chunk) until they stop changing; then into the cache.

        Iteration i's first i + 1 tokens are exact (all their inputs were), so after it one more token goes into
        the cache and is not evaluated again: the original's iterates and stopping rule, with fewer evaluations,
        and never more iterations than the chunk has tokens."""
        for it in range(schedule.max_iter):
            exact = start + it  # tokens [start, exact) are final and cached
            inp = d.buffer[:, exact:start + chunk]
            if it == 0 and start > d.frame_len and chunk > 1:
                # the same tokens one frame earlier are a better first guess than noise
                inp = torch.cat([inp[:, :1], d.buffer[:, start + 1 - d.frame_len:start + chunk - d.frame_len]], 1)
            new = self.next_tokens(inp, d.noise[:, exact:start + chunk], d.rope, d.text_len + exact - d.offset,
                                   d.cache, d.temp, d.frames, d.frame_len, guidance)
            old = d.buffer[:, exact + 1:start + 1 + chunk]
            final = d.buffer[:, start + 1:exact + 1]  # the chunk's final tokens: changed by nothing
            done = it == schedule.max_iter - 1 or it == chunk - 1 or all_ranks_agree(
                ((new - old).pow(2).sum() / (new.pow(2).sum() + final.pow(2).sum())).item() < schedule.threshold,
                new.device)
            d.buffer[:, exact + 1:start + 1 + chunk] = new
            d.cache.commit(start + chunk - exact if done else 1)
            if done:
                return

    def _decode_sliding(self, d, start, end, schedule, guidance):
        """Decodes tokens [start, end) with a window of block_size tokens: each iteration recomputes the window,
        commits its longest prefix of tokens that converged (or were computed max_iter times; the first token,
        whose inputs are all final, is always exact) and slides on. Returns end."""
        sos = int(self.sos_embed is not None)
        fresh = start + 1  # buffer entries from here on still hold the first guess
        entered = []  # iteration at which each buffer entry from start + 1 on first entered the window
        first, it = start + 1, 0
        while start < end:
            size = schedule.block_size if start < d.frame_len else schedule.later_block_size
            chunk = min(size, end - start)
            top = start + chunk + 1
            lo = max(fresh, d.frame_len + sos)
            if d.frames > 1 and lo < top:
                # tokens entering the window start from the same tokens one frame earlier, a better guess than z
                d.buffer[:, lo:top] = d.buffer[:, lo - d.frame_len:top - d.frame_len].clone()
            entered += [it] * (top - max(fresh, first))
            fresh = max(fresh, top)
            new = self.next_tokens(d.buffer[:, start:start + chunk], d.noise[:, start:start + chunk], d.rope,
                                   d.text_len + start - d.offset, d.cache, d.temp, d.frames, d.frame_len, guidance)
            change = (new - d.buffer[:, start + 1:start + 1 + chunk]).pow(2).mean((0, 2)) / new.pow(2).mean()
            converged = change < schedule.threshold
            # entries computed max_iter times are taken as they are (a prefix: the window's oldest entries)
            window = entered[start + 1 - first:start + 1 - first + chunk]
            forced = sum(1 for e in window if it - e + 1 >= schedule.max_iter)
            converged[:max(1, forced)] = True
            n = all_ranks_min(int(converged.cumprod(0).sum().item()), new.device)
            d.buffer[:, start + 1:start + 1 + chunk] = new
            d.cache.commit(n)
            start += n
            it += 1
        return end

    def _decode_compiled(self, d, start, end, guidance):
        """Tokens [start, end) one at a time, as sequential decoding, through one compiled step whose shapes never
        change (the KV cache at a tensor slot, its free slots masked): no per-operation overhead. Returns end."""
        cache = d.cache
        cache.reserve([layer.attention for layer in self.attn_blocks], len(d.buffer), self.proj_in.weight.dtype,
                      d.buffer.device)
        cache.slot = torch.zeros(1, dtype=torch.long, device=d.buffer.device)
        step = compiled_next_tokens(d.buffer.device.type)
        with warnings.catch_warnings():
            # inductor has no complex kernels: RoPE's one complex product (misc/pe.py) keeps its eager kernel
            warnings.filterwarnings("ignore", "Torchinductor does not support code generation for complex")
            try:
                for t in range(start, end):
                    cache.slot.fill_(d.text_len + t - d.offset)
                    d.buffer[:, t + 1:t + 2] = step(self, d.buffer[:, t:t + 1], d.noise[:, t:t + 1], d.rope, 0, cache,
                                                    d.temp, d.frames, d.frame_len, guidance)
            finally:
                cache.slot = None
        cache.commit(end - start)
        return end

    def next_tokens(self, u, noise, rope, slot, cache, temp, frames, frame_len, guidance):
        """The tokens that follow those of u (B', n, D), from their noise: mu + sigma * noise, guided when
        guidance > 0 (rows: conditional, then unconditional)."""
        mu, sigma = self.step(u, None, rope, slot, cache, temp, frames, frame_len)
        if guidance > 0:
            mu, sigma = guide(mu, sigma, guidance)
        return mu + sigma * noise

    def prefill(self, cache, text, rope, temp):
        """Writes the text prefix into the cache (causal among text tokens)."""
        cache.text_len = 0 if text is None else text.shape[1]
        if text is not None:
            self.run(None, text, rope, 0, cache=cache, temp=temp)
            cache.commit(text.shape[1])

    def encode_context(self, cache, tokens, rope, text_len, temp, frames, frame_len):
        """Teacher-forces known input tokens into the cache right after the text."""
        if tokens.shape[1]:
            self.step(tokens, None, rope, text_len, cache, temp, frames, frame_len)
            cache.commit(tokens.shape[1])


class IdentityFlow(nn.Module):
    """A flow step with no layers (layers_per_block 0): z = x."""
    has_text = False

    def forward(self, x, text=None, rope=None, frames=1, guidance=0.0):
        return x, torch.zeros_like(x, dtype=torch.float32)

    def inverse(self, z, *args, **kwargs):
        return z


class NonCausalBlock(Trunk):
    """The learnable self-denoiser: a bidirectional (or frame-windowed) transformer predicting a score step."""

    def __init__(self, in_channels, channels, *, num_layers=8, block_causal=0, window=None, **trunk_kwargs):
        super().__init__(in_channels, in_channels, channels, num_layers, non_causal=True, **trunk_kwargs)
        self.block_causal, self.window = block_causal, window

    def frame_mask(self, text_len, frames, frame_len, device):
        """Query q sees all text, and image frames from frame(q)+A-1-G to frame(q)+A-1 (A look-ahead, G window)."""
        a, g = self.block_causal, self.window or 10000
        idx = torch.arange(text_len + frames * frame_len, device=device)
        frame = torch.div(idx - text_len, frame_len, rounding_mode="floor")
        frame_plus = torch.div((idx - text_len).clamp(min=0), frame_len, rounding_mode="floor")
        q, k = frame[:, None], frame[None, :]
        visible = (k >= q + a - 1 - g) & (k <= frame_plus[:, None] + a - 1)
        return visible | (idx[None, :] < text_len)

    def forward(self, x, text=None, rope=None, frames=1, video=False):
        text = text if self.has_text else None
        mask = None
        if video and self.block_causal > 0:
            mask = self.frame_mask(0 if text is None else text.shape[1], frames, x.shape[1] // frames, x.device)
        return self.run(self.proj_in(x.to(self.proj_in.weight.dtype)), text, rope, 0, mask=mask)


class Model(nn.Module):
    """STARFlow: K flow steps on patchified latents; shallow steps first (data side), the deep text step last.

    Model(FlowConfig(...)), Model(STARFlow_3B_T2I_256()) or Model(**official_constructor_keywords).
    """

    def __init__(self, config=None, **kwargs):
        super().__init__()
        if config is not None and kwargs:
            raise TypeError("pass either a FlowConfig or the constructor keywords, not both")
        c = self.config = config if config is not None else FlowConfig.from_kwargs(**kwargs)
        self.in_channels, self.patch_size, self.txt_size = c.in_channels, c.patch_size, c.txt_size
        self.pt_seq_len = c.pt_seq_len or c.img_size // c.patch_size
        self.cond_top_only, self.shallow_block_local = c.cond_top_only, c.shallow_block_local
        self.local_attn_window = c.local_attn_window
        token_dim = c.in_channels * c.patch_size ** 2
        layer = dict(head_dim=c.head_dim, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                     use_swiglu=c.use_swiglu, use_qk_norm=c.use_qk_norm, use_post_norm=c.use_post_norm,
                     use_final_norm=c.use_final_norm, use_bias=c.use_bias, hf_style_rope=c.hf_style_rope,
                     norm_type=c.norm_type, use_checkpoint=c.use_checkpoint, use_checkpoint_mlp=c.use_checkpoint_mlp)
        flow = dict(img_size=c.img_size // c.patch_size, sos=c.sos, rope=c.rope, use_softplus=c.use_softplus,
                    soft_clip=c.soft_clip)
        orders = ["identity", "flip_in_frame" if c.temporal_causal else "flip"]
        blocks = []
        for i, layers in enumerate(c.layers_per_block):
            order = orders[(i + (c.seq_order == "L2R")) % 2]
            if i < c.num_blocks - 1:
                blocks.append(IdentityFlow() if layers == 0 else MetaBlock(
                    token_dim, c.channels, permutation=order, num_layers=layers,
                    txt_dim=0 if c.cond_top_only else c.txt_dim, **flow, **layer))
            else:
                top = c.top_block_channels or c.channels
                top_layer = dict(layer, num_heads=c.num_heads or (top // c.head_dim if top != c.channels else None))
                blocks.append(MetaBlock(token_dim, top, permutation=order, num_layers=layers, txt_dim=c.txt_dim,
                                        **flow, **top_layer))
        self.blocks = nn.ModuleList(blocks)
        self.rope = RotaryEmbedding(c.head_dim) if c.rope else None
        self.learnable_self_denoiser = NonCausalBlock(
            token_dim, c.channels, num_layers=c.denoiser_layers, block_causal=c.temporal_causal,
            window=c.denoiser_window, txt_dim=c.txt_dim if c.conditional_denoiser else 0,
            **layer) if c.learnable_self_denoiser else None

    # ------------------------------------------------------------------------------------------ layout helpers
    def patchify(self, x):
        """(B, C, H, W) or (B, T, C, H, W) -> (B, T, h, w, p*p*C), channel index fastest inside a patch."""
        x = x[:, None] if x.dim() == 4 else x
        return rearrange(x, "b t c (h p1) (w p2) -> b t h w (p1 p2 c)", p1=self.patch_size, p2=self.patch_size)

    def unpatchify(self, tokens, video):
        p = self.patch_size
        x = rearrange(tokens, "b t h w (p1 p2 c) -> b t c (h p1) (w p2)", p1=p, p2=p)
        return x if video else x[:, 0]

    def rope_table(self, h, w, frames, video, text=None, *, device):
        """RoPE rotations (complex, slots x head_dim/2) on `device` for [text; frames x h x w] slots; None when the
        model uses learned positions.

        Computed in float64 on the CPU (MPS has no float64), then copied once per pass, never per token."""
        if self.rope is None:
            return None
        third_axis = self.txt_size > 0 or video
        text_len = 0 if text is None else text.shape[1]
        table = self.rope(grid_positions(h, w, self.pt_seq_len, frames if video else 0, text_len, third_axis))
        return table.to(device)

    # ------------------------------------------------------------------------------------------------ passes
    def forward(self, x, y=None, mode="likelihood", **kwargs):
        """Dispatches every pass through forward, so that FSDP's hooks run for each of them."""
        passes = {"likelihood": self._likelihood, "reverse": self._reverse, "denoise": self._denoise}
        return passes[mode](x, y, **kwargs)

    def _likelihood(self, x, y, guidance=0.0):
        """Data -> noise: returns z (shape of x), outputs (each step's input and the final z, as tokens), logdets.
        With guidance > 0 (y = cat([y_cond, y_uncond])) the steps that see text use the guided map."""
        video = x.dim() == 5
        tokens = self.patchify(x)
        B, T, h, w, D = tokens.shape
        seq, outputs, logdets = self._shallow_forward(tokens, y, video, 0.0 if self.cond_top_only else guidance)
        top = self.blocks[-1]
        text = y if top.has_text else None
        seq, logdet = top(seq, text, self.rope_table(h, w, T, video, text, device=x.device), T,
                          guidance if top.has_text else 0.0)
        outputs.append(seq.view(B, T, h, w, D))
        logdets.append(logdet)
        if not video:
            outputs = [o[:, 0] for o in outputs]
        return self.unpatchify(seq.view(B, T, h, w, D), video), outputs, logdets

    def _shallow_forward(self, tokens, y, video, guidance=0.0):
        """The shallow steps in the density direction; frame-local steps see each frame as its own sequence."""
        B, T, h, w, D = tokens.shape
        local = self.shallow_block_local and video
        seq, outputs, logdets = tokens.flatten(1, 3), [tokens], []
        for block in self.blocks[:-1]:
            inp, frames = (seq.reshape(B * T, h * w, D), 1) if local else (seq, T)
            text = y if block.has_text else None
            out, logdet = block(inp, text, self.rope_table(h, w, frames, video, text, device=inp.device), frames,
                                guidance if text is not None else 0.0)
            seq = out.reshape(B, T * h * w, D)
            outputs.append(seq.view(B, T, h, w, D))
            logdets.append(logdet.reshape(B, T, h * w, D) if local else logdet)
        return seq, outputs, logdets

    @torch.no_grad()
    def _reverse(self, noise, y=None, guidance=0.0, attn_temp=1.0, jacobi=False, jacobi_block_size=None,
                 jacobi_th=None, jacobi_max_iter=None, cond_frames=None, local_attn_window=None, context_length=None,
                 y_shallow=None, compile_decode=False):
        video = noise.dim() == 5
        tokens = self.patchify(noise)
        B, T, h, w, D = tokens.shape
        frame_len = h * w
        schedules = self.decode_schedules(jacobi, jacobi_block_size, jacobi_max_iter, jacobi_th, noise.device,
                                          compile_decode)
        if not attn_temp > 0:
            raise ValueError(f"attn_temp must be > 0 (it divides the attention logits' scale), got {attn_temp}")
        if guidance > 0 and (y is None or len(y) != 2 * B):
            raise ValueError("guidance > 0 needs y = cat([y_cond, y_uncond]) with twice the rows of the noise")
        window = local_attn_window or self.local_attn_window
        if window and T > window:
            context_length = window - 1 if context_length is None else context_length
            if not 0 < context_length < window:
                raise ValueError(f"context_length must be in [1, {window - 1}] for local_attn_window={window}")
        else:
            window, context_length = None, 0
        known = None
        if cond_frames is not None:
            _, known, _ = self._shallow_forward(self.patchify(cond_frames.float()), None if y is None else y[:B], video)
            known = [k.flatten(1, 3) for k in known]  # known[i]: the observed frames as the input of step i
        n_known = 0 if known is None else known[0].shape[1]

        seq = tokens.flatten(1, 3)
        top = self.blocks[-1]
        text = y if top.has_text else None
        seq = top.inverse(seq, text, self.rope_table(h, w, T, video, text, device=seq.device), T, guidance, attn_temp,
                          schedules[-1], prefix=None if known is None else known[-1],
                          window=window and window * frame_len, context=context_length * frame_len)
        y = y if y_shallow is None else y_shallow
        if guidance > 0 and self.cond_top_only:
            guidance, y = 0.0, y[:B]
        for i in reversed(range(len(self.blocks) - 1)):
            block = self.blocks[i]
            text = y if block.has_text else None
            if self.shallow_block_local and video:
                # frames are independent here: invert only the unknown ones
                rest = seq[:, n_known:].reshape(-1, frame_len, D)
                rope = self.rope_table(h, w, 1, video, device=rest.device)
                rest = block.inverse(rest, None, rope, 1, 0.0, attn_temp, schedules[i])
                rest = rest.reshape(B, -1, D)
                seq = rest if known is None else torch.cat([known[i], rest], 1)
            else:
                rope = self.rope_table(h, w, T, video, text, device=seq.device)
                seq = block.inverse(seq, text, rope, T, guidance, attn_temp, schedules[i],
                                    prefix=None if known is None else known[i])
        return self.unpatchify(seq.view(B, T, h, w, D), video)

    def decode_schedules(self, jacobi, block_size=None, max_iter=None, threshold=None, device=None, compiled=False):
        """One DecodeSchedule per flow step (shallow first, deep last): sequential (jacobi False), the original's
        Jacobi chunks (True; block 16, th 1e-3, 32 iterations unless given) or 'auto' (AUTO_SCHEDULE): sliding
        windows that never re-evaluate a committed token, over the whole sequence for the shallow steps, and over
        block_size tokens for the deep step on an accelerator (token by token on a CPU: `device`); max_iter caps
        the evaluations of a token, threshold (given) replaces both of auto's thresholds. compiled: the steps
        decoded token by token go through one compiled step (MetaBlock._decode_compiled)."""
        schedules = self._schedules(jacobi, block_size, max_iter, threshold, device)
        return [dataclasses.replace(s, compiled=True) if compiled and s.block_size == 1 and not s.sliding else s
                for s in schedules]

    def _schedules(self, jacobi, block_size, max_iter, threshold, device):
        if jacobi == "auto":
            a = AUTO_SCHEDULE
            shallow_th, deep_th = (a["threshold"], a["deep_threshold"]) if threshold is None else (threshold,) * 2
            shallow = DecodeSchedule(2 ** 62, 2 ** 62, a["shallow_evals"] if max_iter is None else max_iter,
                                     shallow_th, sliding=True)
            window = a["deep_window"] if block_size is None else block_size
            deep = DecodeSchedule(window, 4 * window, a["deep_evals"] if max_iter is None else max_iter, deep_th,
                                  sliding=True)
            check_jacobi(deep.block_size, min(shallow.max_iter, deep.max_iter), deep_th)
            if auto_kind(device) == "cpu":
                deep = SEQUENTIAL
            return [shallow] * (len(self.blocks) - 1) + [deep]
        if jacobi:
            schedule = jacobi_schedule(16 if block_size is None else block_size, 32 if max_iter is None else max_iter,
                                       1e-3 if threshold is None else threshold)
            return [schedule] * len(self.blocks)
        return [SEQUENTIAL] * len(self.blocks)

    def _denoise(self, x, y=None):
        video = x.dim() == 5
        tokens = self.patchify(x)
        B, T, h, w, D = tokens.shape
        den = self.learnable_self_denoiser
        text = y if den.has_text else None
        out = den(tokens.flatten(1, 3), text, self.rope_table(h, w, T, video, text, device=x.device), T, video)
        return self.unpatchify(out.view(B, T, h, w, D), video)

    # ----------------------------------------------------------------------------------------------- public API
    def reverse(self, noise, y=None, **kwargs):
        """Noise -> (noisy) data. With guidance > 0, y holds the conditional rows followed by the unconditional;
        y_shallow (laid out alike) gives the shallow steps another text than the deep one (prompt editing)."""
        return self(noise, y, mode="reverse", **kwargs)

    def denoise(self, x, y=None):
        """The learnable self-denoiser's prediction for x (same shape)."""
        if self.learnable_self_denoiser is None:
            raise ValueError("this model has no learnable self-denoiser (learnable_self_denoiser: 0)")
        return self(x, y, mode="denoise")

    def score_denoise(self, x, y, noise_std):
        """One Tweedie step with the flow's own score: x - noise_std^2 * grad_x NLL(x | y)."""
        with torch.enable_grad():
            x = x.detach().float().requires_grad_(True)
            z, _, logdets = self(x, y)
            (grad,) = torch.autograd.grad(self.summed_nll(z, logdets), x)
        return (x - noise_std ** 2 * grad).detach()

    @staticmethod
    def sample_nll(z, logdets):
        """-log p(x_b | y_b) of each sample in nats (float64, (B,)): the standard normal density of z and the log-dets
        of every step, p(x) = N(z; 0, I) |det dz/dx|."""
        nll = 0.5 * z.double().pow(2).flatten(1).sum(1) + 0.5 * z[0].numel() * math.log(2 * math.pi)
        return nll - sum(ld.double().flatten(1).sum(1) for ld in logdets)

    @staticmethod
    def summed_nll(z, logdets):
        """-log p(x | y) of the whole batch without the Gaussian constant; its gradient in x is minus the score."""
        return 0.5 * z.float().pow(2).sum() - sum(ld.float().sum() for ld in logdets)

    @staticmethod
    def get_loss(z, logdets, outputs=None, weights=None, latent_norm_regularization=0.0):
        """Per-dimension NLL (without the Gaussian constant), averaged over the batch; optional weights and
        the latent-norm regulariser on the input of every flow step."""
        loss_z = 0.5 * z.float().pow(2).flatten(1).mean(1)
        loss_logdet = -sum(ld.flatten(1).mean(1) for ld in logdets)
        loss = loss_z + loss_logdet
        if weights is not None:
            loss = loss * weights
        loss = loss.mean()
        if latent_norm_regularization and outputs is not None:
            loss = loss + latent_norm_regularization * sum(o.float().pow(2).mean() for o in outputs[:-1])
        return {"loss": loss, "loss_z": loss_z.mean(), "loss_logdet": loss_logdet.mean()}

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Loads an official checkpoint as it is: deprecated buffers are dropped, every parameter must match."""
        state_dict = {k: v for k, v in state_dict.items() if not DEPRECATED_KEYS.match(k)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
