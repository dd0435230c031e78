"""misc/pe.py: the complex-product RoPE rotates the channel pairs of both conventions exactly as an explicit 2x2
rotation does, on the layouts attention hands it, with the same gradients."""
import pytest
import torch

from misc.pe import RotaryEmbedding, apply_rope, grid_positions

B, H, L, D = 2, 3, 20, 16
LAYOUTS = {
    "contiguous": lambda: torch.randn(B, H, L, D),
    # what Attention passes: a head-split, transposed slice of the fused qkv output (k starts at an offset)
    "qkv_slice": lambda: torch.randn(B, L, 3 * H * D)[..., H * D:2 * H * D].unflatten(-1, (H, D)).transpose(1, 2),
    "odd_offset": lambda: torch.randn(B * H * L * D + 1)[1:].view(B, H, L, D),
}


def rotated_reference(t, angles, halves):
    """The rotation written out: pairs (2i, 2i + 1), or (i, i + D/2) with halves, turned by angles[:, i]."""
    i = torch.arange(t.shape[-1] // 2)
    a, b = (i, i + t.shape[-1] // 2) if halves else (2 * i, 2 * i + 1)
    x = t.double()
    out = torch.empty_like(x)
    cos, sin = angles.cos(), angles.sin()
    out[..., a] = x[..., a] * cos - x[..., b] * sin
    out[..., b] = x[..., b] * cos + x[..., a] * sin
    return out


def rotation_table():
    rotation = RotaryEmbedding(D)(grid_positions(4, 5, txt_len=0))  # 20 slots, three axes
    assert rotation.shape == (L, D // 2) and rotation.dtype == torch.complex64
    torch.testing.assert_close(rotation.abs(), torch.ones(L, D // 2))
    return rotation


@pytest.mark.parametrize("make_t", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("halves", [False, True], ids=["adjacent_pairs", "hf_halves"])
def test_rotation_equals_explicit_pairs(make_t, halves):
    rotation, t = rotation_table(), make_t()
    want = rotated_reference(t, rotation.angle().double(), halves)
    torch.testing.assert_close(apply_rope(t, rotation, halves).double(), want, atol=1e-6, rtol=1e-5)


def test_keeps_low_precision_dtype():
    rotation, t = rotation_table(), torch.randn(B, H, L, D).bfloat16()
    out = apply_rope(t, rotation)
    assert out.dtype == torch.bfloat16
    want = rotated_reference(t, rotation.angle().double(), False).bfloat16()
    torch.testing.assert_close(out, want, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("halves", [False, True], ids=["adjacent_pairs", "hf_halves"])
def test_gradient_equals_explicit_rotation(halves):
    rotation = rotation_table()
    t, weights = LAYOUTS["qkv_slice"]().double().requires_grad_(), torch.randn(B, H, L, D)
    (apply_rope(t.float(), rotation, halves) * weights).sum().backward()
    got, t.grad = t.grad.clone(), None
    (rotated_reference(t, rotation.angle().double(), halves) * weights).sum().backward()
    torch.testing.assert_close(got, t.grad, atol=1e-5, rtol=1e-5)
