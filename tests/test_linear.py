"""misc/linear.py: the oneDNN route of nn.Linear (taken on AMD CPUs) gives F.linear's outputs and gradients, and its
packed weights follow every change of the weights; other CPUs take F.linear."""
import pytest
import torch
import torch.nn.functional as F

from misc import linear
from misc.linear import Linear, prepacked

pytestmark = pytest.mark.skipif(not linear.ONEDNN_KERNELS, reason="this PyTorch build has no oneDNN")
IN, OUT = 512, 4096  # 2M multiply-adds a row: oneDNN's from one row, and with gradients from 8 rows
INPUTS = {
    "2d": lambda width=IN: torch.randn(9, width),
    "3d": lambda width=IN: torch.randn(3, 7, width),
    "strided": lambda width=IN: torch.randn(3, width, 7).transpose(1, 2),
    "one_row": lambda width=IN: torch.randn(1, 1, width),
}


@pytest.fixture(autouse=True)
def amd_route(monkeypatch):
    """The route an AMD CPU takes, whatever CPU runs the tests."""
    monkeypatch.setattr(linear, "ONEDNN", True)


@pytest.mark.parametrize("vendor, windows", [("AuthenticAMD", "AMD64 Family 25 Model 1 Stepping 1, AuthenticAMD"),
                                             ("GenuineIntel", "Intel64 Family 6 Model 143 Stepping 8, GenuineIntel")])
def test_cpu_vendor_reads_cpuinfo_or_the_platform(vendor, windows, tmp_path, monkeypatch):
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 25\n")
    assert linear.cpu_vendor(tmp_path / "cpuinfo") == vendor
    monkeypatch.setattr(linear.platform, "processor", lambda: windows)  # what Windows says; no /proc there
    assert linear.cpu_vendor(tmp_path / "missing") == vendor
    monkeypatch.setattr(linear.platform, "processor", lambda: "arm")  # macOS on Apple silicon
    assert linear.cpu_vendor(tmp_path / "missing") == ""


def test_other_cpus_take_f_linear(monkeypatch):
    """MKL runs its fastest kernels on Intel CPUs: there even a large product stays with F.linear, bit for bit."""
    monkeypatch.setattr(linear, "ONEDNN", False)
    layer, x = Linear(IN, OUT), torch.randn(9, IN)
    assert not linear.uses_onednn(x, layer.weight)
    with torch.no_grad(), prepacked(layer):
        assert torch.equal(layer(x, activation="gelu"), F.gelu(F.linear(x, layer.weight, layer.bias)))
    assert layer._packed is None


@pytest.mark.parametrize("make_x", INPUTS.values(), ids=INPUTS.keys())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_outputs_equal_f_linear(make_x, bias, activation, packed):
    layer, x = Linear(IN, OUT, bias=bias), make_x()
    assert linear.uses_onednn(x, layer.weight)
    want = F.linear(x, layer.weight, layer.bias)
    want = F.gelu(want) if activation == "gelu" else want
    with torch.no_grad(), prepacked(layer) if packed else torch.enable_grad():
        got = layer(x, activation=activation)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make_x", INPUTS.values(), ids=INPUTS.keys())
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("widths", [(IN, OUT), (OUT, IN)], ids=["widening", "narrowing"])  # both grad_w orders
@pytest.mark.parametrize("loss", [lambda y: (y ** 2).sum(), torch.sum], ids=["squares", "sum"])  # sum: grad stride 0
def test_gradients_equal_autograd_of_f_linear(make_x, activation, widths, loss):
    layer, x = Linear(*widths), make_x(widths[0]).requires_grad_()
    assert linear.uses_onednn(x, layer.weight, training=True) == (x.numel() // widths[0] > 1)
    loss(layer(x, activation=activation)).backward()
    got = [t.grad.clone() for t in (x, layer.weight, layer.bias)]
    for t in (x, layer.weight, layer.bias):
        t.grad = None
    out = F.linear(x, layer.weight, layer.bias)
    loss(F.gelu(out) if activation == "gelu" else out).backward()
    for g, t in zip(got, (x, layer.weight, layer.bias)):
        torch.testing.assert_close(g, t.grad, atol=1e-4, rtol=1e-5)


def test_only_the_input_gradient_when_weights_are_frozen():
    layer, x = Linear(IN, OUT).requires_grad_(False), torch.randn(9, IN, requires_grad=True)
    assert linear.uses_onednn(x, layer.weight, training=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(9, -1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("small", [True, False], ids=["kept", "freed"])
def test_packed_weight_follows_changes_and_outlives_the_scope_only_when_small(small, monkeypatch):
    if not small:
        monkeypatch.setattr(linear, "KEEP_PACKED_BYTES", IN * OUT * 4 - 1)
    layer, x = Linear(IN, OUT), torch.randn(4, IN)
    with torch.no_grad(), prepacked(layer):
        first = layer(x)
        layer.weight.mul_(2)  # in place: a new version of the same tensor
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        layer.load_state_dict({"weight": torch.zeros(OUT, IN), "bias": torch.ones(OUT)})
        torch.testing.assert_close(layer(x), torch.ones(4, OUT))
        layer.weight = torch.nn.Parameter(torch.eye(OUT, IN))  # a new tensor
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert not layer.packing and (layer._packed is not None) == small and first.shape == (4, OUT)
    kept = layer._packed
    with torch.no_grad(), prepacked(layer):
        layer(x)
    assert (kept is not None and layer._packed is kept) == small  # an unchanged weight is not packed again
    with torch.no_grad():
        layer.weight.add_(1)  # between scopes, as an optimizer step would
    with torch.no_grad(), prepacked(layer):
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("case", ["bfloat16", "autocast", "float64"])
def test_other_dtypes_and_autocast_take_f_linear(case):
    layer, x = Linear(IN, OUT), torch.randn(3, IN)
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not linear.uses_onednn(x, layer.weight)
            assert layer(x).dtype == torch.bfloat16
        return
    layer, x = layer.to(getattr(torch, case)), x.to(getattr(torch, case))
    assert not linear.uses_onednn(x, layer.weight)
    assert torch.equal(layer(x, activation="gelu"), F.gelu(F.linear(x, layer.weight, layer.bias)))


def test_small_products_take_f_linear():
    """MKL's call overhead is the smaller on small products; oneDNN takes 2M multiply-adds, or 2 rows of a weight
    with 2^17 entries, or with gradients 16M multiply-adds."""
    small, large = Linear(128, 128), Linear(256, 512)
    assert not linear.uses_onednn(torch.randn(64, 128), small.weight)
    assert linear.uses_onednn(torch.randn(128, 128), small.weight)  # 2 ** 21
    assert not linear.uses_onednn(torch.randn(1, 256), large.weight)
    assert linear.uses_onednn(torch.randn(2, 256), large.weight)
    assert not linear.uses_onednn(torch.randn(127, 256), large.weight, training=True)
    assert linear.uses_onednn(torch.randn(128, 256), large.weight, training=True)  # 2 ** 24
