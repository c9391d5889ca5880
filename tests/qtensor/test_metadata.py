"""size()/stride() of quantized tensors: answered from cached values, so they must never go stale."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.qtensor import Float8Tensor, Int4Tensor, Int8DynActTensor, Int8Tensor

CLASSES = [Int4Tensor, Int8Tensor, Int8DynActTensor, Float8Tensor]


def _plain_size_stride(t):
    """What the C tensor reports, bypassing the Python overrides."""
    with torch._C.DisableTorchFunctionSubclass():
        return torch.Tensor.size(t), torch.Tensor.stride(t)


def _check(t):
    size, stride = _plain_size_stride(t)
    assert t.size() == size == t.shape
    assert t.stride() == stride
    for d in range(-t.dim(), t.dim()):
        assert t.size(d) == size[d] and t.stride(d) == stride[d]


@settings(deadline=None, max_examples=20)
@given(cls=st.sampled_from(CLASSES), n=st.integers(1, 40), groups=st.integers(1, 3), data=st.data())
def test_size_and_stride_match_the_tensor_after_every_op(cls, n, groups, data):
    k = 32 * groups
    w = torch.randn(n, k, dtype=torch.bfloat16)
    q = Int4Tensor.from_float(w, group_size=32) if cls is Int4Tensor else cls.from_float(w)
    _check(q)
    start = data.draw(st.integers(0, n - 1))
    end = data.draw(st.integers(start + 1, n))
    derived = [q.detach(), q.clone(), q[start:end], q.t(), q.t().t(), torch.chunk(q, 2, dim=0)[0], q.to("cpu")]
    for t in derived:
        _check(t)
    assert q[start:end].size() == (end - start, k)
