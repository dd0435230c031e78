"""nn.Linear whose float32 CPU matmuls go through oneDNN: the same arithmetic, faster kernels.

PyTorch's CPU float32 GEMM is MKL's, which runs its AVX-512 and AMX kernels only on Intel CPUs. On an AMD EPYC
(AVX-512), oneDNN's kernels run the flow's larger matmuls about 2x faster, and decoding's few-row ones 1.5-2x with
prepacked weights; on an Intel Xeon, MKL is within about 10% of oneDNN from 128 rows and 1.05-2.3x faster at a
few rows (`python bench/kernels.py` prints both per shape). So the oneDNN route is taken on AMD CPUs only;
everything else (Intel and other CPUs, CUDA, MPS, other dtypes, autocast, builds without oneDNN, tensor subclasses
such as DTensor) takes F.linear unchanged.
"""
import platform
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def cpu_vendor(cpuinfo="/proc/cpuinfo"):
    """The x86 vendor string (AuthenticAMD, GenuineIntel) from Linux's cpuinfo or the platform; '' if unknown."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return next((v for v in ("AuthenticAMD", "GenuineIntel") if v in platform.processor()), "")


ONEDNN_KERNELS = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN = ONEDNN_KERNELS and cpu_vendor() == "AuthenticAMD"  # whether Linear routes products to oneDNN
# On AMD, MKL's smaller call overhead wins on small products (bench/kernels.py): oneDNN takes a product from 2M
# multiply-adds on, or from 2 rows when the weight has 2^17 entries (MKL's time grows with the weight even at a few
# rows: 4 x 256 -> 1024 takes 62 us in MKL, 30 us packed in oneDNN; 32 x 128 -> 128, 13 us against 26 us); with
# gradients, from 16M.
ONEDNN_MIN_MACS = 2 ** 21
ONEDNN_MIN_WEIGHT = 2 ** 17
ONEDNN_MIN_TRAIN_MACS = 2 ** 24  # with gradients: three products and a Python autograd node per call
PLAIN = (torch.Tensor, nn.Parameter)  # tensor subclasses (DTensor, FakeTensor) take F.linear
# A module whose packed weights total at most this keeps them after `prepacked` ends, so that the next sampling call
# skips the reorder (0.2-0.3 ms per weight: 4% of a Jacobi decode of the bench model); larger ones free theirs.
KEEP_PACKED_BYTES = 2 ** 26


def onednn_linear(x, weight, bias, activation="none"):
    """x @ weight.T + bias (then GELU when activation is 'gelu'), one oneDNN call; weight may be prepacked."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], "none" if activation == "gelu" else "")


def onednn_weight_grad(g, x):
    """g.T @ x in oneDNN, for the output gradient g (rows, out) and the input x (rows, in), both contiguous."""
    # the product contracts over rows, the outer dimension of both; oneDNN copies a transposed input to rows first,
    # so the narrower of the two is made the input
    if g.shape[1] <= x.shape[1]:
        return onednn_linear(g.t(), x.t(), None)
    return onednn_linear(x.t(), g.t(), None).t()


class _OneDNNLinear(torch.autograd.Function):
    """A linear layer whose forward and gradient matmuls all run in oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).contiguous()  # a sum's gradient is expanded: stride 0 stalls oneDNN
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_linear(g, weight.t(), None).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = onednn_weight_grad(g, x.reshape(-1, x.shape[-1]).contiguous())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


def uses_onednn(x, weight, training=False):
    """Whether this matmul takes the oneDNN path: plain float32 CPU tensors, outside autocast, a product big enough
    (the thresholds above; `training`: with gradients)."""
    if torch.compiler.is_compiling():  # inductor picks (and packs) its own kernels; it cannot lower ours
        return False
    if not (ONEDNN and x.is_cpu and x.dtype is torch.float32 and weight.dtype is torch.float32
            and type(x) is torch.Tensor and type(weight) in PLAIN and not torch.is_autocast_enabled("cpu")):
        return False
    size = weight.numel()
    rows = x.numel() // weight.shape[1]
    if training:
        return rows * size >= ONEDNN_MIN_TRAIN_MACS
    return rows * size >= ONEDNN_MIN_MACS or (rows > 1 and size >= ONEDNN_MIN_WEIGHT)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) routed through oneDNN on CPU float32; inside `prepacked`
    its weight is reordered once into oneDNN's blocked layout, which is what pays at decoding's small batches."""

    packing = False  # set by `prepacked`; the packed weight is dropped when the scope ends
    _packed = None  # (weak reference to the weight it was made from, that weight's version, packed tensor)

    def forward(self, x, activation="none"):
        weight, bias = self.weight, self.bias
        training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                                (bias is not None and bias.requires_grad))
        if not uses_onednn(x, weight, training):
            out = F.linear(x, weight, bias)
        elif training:
            out = _OneDNNLinear.apply(x, weight, bias)
        else:
            return onednn_linear(x, self.packed_weight() if self.packing else weight, bias, activation)
        return F.gelu(out) if activation == "gelu" else out

    def packed_weight(self):
        """The weight in oneDNN's layout, reordered again whenever the weight tensor or its values change."""
        w = self.weight
        if self._packed is None or self._packed[0]() is not w or self._packed[1] != w._version:
            self._packed = (weakref.ref(w), w._version, torch.ops.mkldnn._reorder_linear_weight(w.detach(), None))
        return self._packed[2]


@contextmanager
def prepacked(module):
    """Within it, the module's Linear layers use oneDNN-packed copies of their weights, for the many small matmuls
    of decoding. On exit the copies are freed, unless they total at most KEEP_PACKED_BYTES (then they stay for the
    next scope, and are packed again only if a weight changed)."""
    layers = [m for m in module.modules() if isinstance(m, Linear)]
    for m in layers:
        m.packing = True
    try:
        yield
    finally:
        keep = sum(m.weight.numel() * m.weight.element_size() for m in layers if m._packed) <= KEEP_PACKED_BYTES
        for m in layers:
            m.packing = False
            if not keep:
                m._packed = None
