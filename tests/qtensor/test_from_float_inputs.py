"""What the public ``from_float`` constructors take: a weight that requires grad gives fields
outside autograd, bad weights (non-finite, not a float dtype, already quantized) and int4 CPU
packings the CPU kernel cannot read get a clear error, never a tensor that fails later."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.ops import cpu
from lowbit.qtensor import Float8Tensor, Int4Tensor, Int8DynActTensor, Int8Tensor

MAKERS = {
    "int4": lambda w: Int4Tensor.from_float(w, group_size=32),  # the CPU layout where the kernel runs
    "int4-plain": lambda w: Int4Tensor.from_float(w, group_size=32, packing="plain"),
    "int8": Int8Tensor.from_float,
    "w8a8": Int8DynActTensor.from_float,
    "fp8": Float8Tensor.from_float,
}
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}
CLASSES = {"int4": Int4Tensor, "int8": Int8Tensor, "w8a8": Int8DynActTensor, "fp8": Float8Tensor}


def _w(n=64, k=128, dtype=torch.bfloat16, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", MAKERS)
def test_from_float_of_a_weight_that_requires_grad_builds_no_graph(fmt, dtype):
    """Quantizing ``lin.weight`` itself built the fields inside autograd: scale had a grad_fn,
    F.linear raised "has no gradient", deepcopy failed, and fp8 sent gradients into the float
    weight. The fields must equal those of the detached weight's, bitwise, and hold no graph."""
    w = nn.Parameter(_w(dtype=dtype))
    q, want = MAKERS[fmt](w), MAKERS[fmt](w.detach())
    assert not q.requires_grad
    for name, mine, theirs in zip(q.tensor_fields, q._tensors(), want._tensors()):
        assert mine.grad_fn is None and not mine.requires_grad, name
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), name
    x = torch.randn(3, 128, dtype=dtype, requires_grad=True)
    y = F.linear(x, q)
    assert torch.equal(y, F.linear(x.detach(), want))
    y.sum().backward()
    assert w.grad is None
    assert x.grad is not None  # the input gradient still flows
    dup = copy.deepcopy(q)
    assert torch.equal(dup.dequantize(), want.dequantize())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("fmt", MAKERS)
def test_from_float_refuses_non_finite_weights(fmt, bad):
    w = _w()
    w[3, 5] = w[7, 100] = bad
    cls = CLASSES[fmt.split("-")[0]]
    with pytest.raises(ValueError, match=rf"{cls.__name__}.* 2 NaN/Inf values of {w.numel()}"):
        MAKERS[fmt](w)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.float64, torch.bool])
@pytest.mark.parametrize("fmt", MAKERS)
def test_from_float_refuses_weights_that_are_not_float32_bfloat16_or_float16(fmt, dtype):
    cls = CLASSES[fmt.split("-")[0]]
    w = torch.randint(-5, 5, (16, 128)).to(dtype)
    with pytest.raises(TypeError, match=rf"{cls.__name__}.*{dtype}.*float32, bfloat16 or float16"):
        MAKERS[fmt](w)


@pytest.mark.parametrize("fmt", MAKERS)
def test_from_float_refuses_an_already_quantized_weight(fmt):
    cls = CLASSES[fmt.split("-")[0]]
    with pytest.raises(TypeError, match=rf"{cls.__name__}.*already quantized \(Int8Tensor\)"):
        MAKERS[fmt](Int8Tensor.from_float(_w()))


@pytest.mark.parametrize("layout", list(cpu.INT4_CPU_LAYOUTS))
@pytest.mark.parametrize("n", [1, 17, 33])
def test_int4_cpu_packings_refuse_an_odd_n(layout, n):
    """The CPU layouts pack their tail rows in pairs: odd N failed inside the packing with a raw
    shape error ("The size of tensor a (9) must match ...")."""
    msg = rf"Int4Tensor \({n}, 64\): the '{layout}' packing needs an even N .*got N={n}"
    with pytest.raises(ValueError, match=msg):
        Int4Tensor.from_float(_w(n, 64), group_size=32, packing=layout)
    with pytest.raises(ValueError, match=msg):
        Int4Tensor.from_float(_w(n, 64), group_size=32, packing="plain").repack(layout)


@pytest.mark.parametrize("layout", list(cpu.INT4_CPU_LAYOUTS))
@pytest.mark.parametrize("n", [0, 2, 8, 16, 24, 40, 48, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_cpu_packings_of_any_even_n_compute_the_reference_product(layout, n, dtype):
    """N = 24 in the machine's layout was accepted and every linear then failed inside aten
    ("Unsupported n block size: 24"): the kernel takes N % 16 == 0 only, other N run the
    reference (as a "tiled" or "mma" tensor on the CPU does)."""
    plain = Int4Tensor.from_float(_w(n, 64, dtype), group_size=32, packing="plain")
    packed = plain.repack(layout)
    assert packed.packing == layout and torch.equal(packed.dequantize(), plain.dequantize())
    x = torch.randn(3, 64, dtype=dtype)
    want = F.linear(x.double(), plain.dequantize(torch.float64))
    got = F.linear(x, packed)
    assert got.dtype == dtype and got.shape == (3, n)
    torch.testing.assert_close(got.double(), want, **TOL[dtype])
