"""The dequantize path's and the W8A8 / fp8 launchers' eager launch plans (``_utils.DequantPlan``,
``_w8.DynPlan``, both through ``_utils.Bound``) and the plan caches' bookkeeping, each against the
launches they bind (GPU) or a stand-in (CPU); the int4 GEMM's plans are in test_launch_paths.py."""

import warnings

import pytest
import torch
from test_launch_paths import DEVICE, _count_checks, _slow, _weight, cuda_only

from lowbit.ops import reference as ref
from lowbit.ops.triton import _utils
from lowbit.ops.triton import int4 as int4_mod


def _count_dequant_runs(monkeypatch) -> list:
    runs, real = [], _utils.DequantPlan.run
    monkeypatch.setattr(_utils.DequantPlan, "run", lambda self, *a: runs.append(1) or real(self, *a))
    return runs


@cuda_only
@pytest.mark.parametrize(
    "m, packing, dtype",
    [(257, "plain", torch.bfloat16), (600, "tiled", torch.bfloat16), (300, "mma", torch.float16),
     (3, "mma", torch.float32)],  # (fp32 x with "mma" codes takes the dequantize path at any M)
)  # fmt: skip
def test_a_dequant_plan_runs_what_the_chunks_launch(m, packing, dtype, fresh_plans, monkeypatch):
    # the dequantize path (M >= DEQUANT_MIN_M) in ragged chunks: the first call launches through
    # Triton and keeps a plan (each chunk's bound launch checked bitwise), later calls run the plan
    # from the lane; bitwise what Triton's launches give, and it reads the weights where they are
    monkeypatch.setattr(int4_mod, "DEQUANT_ROWS", 256)
    qdata, scale, zero, plain = _weight(1008, 1024, seed=m, packing=packing)  # chunks 256, 256, 256, 240
    scale, zero = scale.to(dtype), zero.to(dtype)
    runs, checks = _count_dequant_runs(monkeypatch), _count_checks(monkeypatch)
    for i in range(3):
        x = torch.randn(m, 1024, device=DEVICE, dtype=dtype)
        got = int4_mod.int4_mm(x, qdata, scale, zero, 128, packing)
        assert len(fresh_plans) == 1 and len(runs) == i and checks.count("int4_mm") == 1 + i  # (+ slow calls)
        assert _utils.PLANS and len(fresh_plans[next(iter(fresh_plans))].chunks) == 4
        torch.testing.assert_close(got, _slow(x, qdata, scale, zero, packing, monkeypatch), rtol=0, atol=0)
        torch.testing.assert_close(got, ref.int4_linear(x, plain, scale, zero, 128), rtol=2e-2, atol=2e-2)
    x = torch.randn(m + 77, 1024, device=DEVICE, dtype=dtype)  # another M: the same plan (no launch depends on M)
    got = int4_mod.int4_mm(x, qdata, scale, zero, 128, packing)
    assert len(fresh_plans) == 1 and len(runs) == 3
    torch.testing.assert_close(got, _slow(x, qdata, scale, zero, packing, monkeypatch), rtol=0, atol=0)
    q2, s2, z2, plain2 = _weight(1008, 1024, seed=m + 1, packing=packing)
    for dst, src in ((qdata, q2), (scale, s2.to(dtype)), (zero, z2.to(dtype))):
        dst.copy_(src)
    got = int4_mod.int4_mm(x, qdata, scale, zero, 128, packing)
    assert len(runs) == 4
    torch.testing.assert_close(got, ref.int4_linear(x, plain2, scale, zero, 128), rtol=2e-2, atol=2e-2)


@cuda_only
def test_a_dequant_plan_in_a_cuda_graph_and_a_failed_check(fresh_plans, monkeypatch):
    qdata, scale, zero, plain = _weight(768, 1024, seed=11)
    x = torch.randn(300, 1024, device=DEVICE, dtype=torch.bfloat16)
    int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain")  # the plan
    runs = _count_dequant_runs(monkeypatch)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain")  # the plan, captured
    assert len(runs) == 1 and len(fresh_plans) == 1
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(out, _slow(x, qdata, scale, zero, "plain", monkeypatch), rtol=0, atol=0)
    # a chunk whose bound launch does not reproduce Triton's: no plan, plans off, a warning
    fresh_plans.clear()
    monkeypatch.setattr(_utils, "_plan_checks", dict.fromkeys(_utils._plan_checks, 0))
    real_equal = torch.equal
    monkeypatch.setattr(_utils.torch, "equal", lambda a, b: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain")
    monkeypatch.setattr(_utils.torch, "equal", real_equal)
    assert not _utils.PLANS and not fresh_plans
    assert any("launch plans are off" in str(w.message) for w in caught)
    torch.testing.assert_close(got, ref.int4_linear(x, plain, scale, zero, 128), rtol=2e-2, atol=2e-2)


@cuda_only
def test_w8a16_dequant_plans(monkeypatch):
    from lowbit.ops.triton import _w8
    from lowbit.ops.triton import int8 as int8_mod

    monkeypatch.setattr(_w8, "_PLANS", {})
    monkeypatch.setattr(_w8, "DEQUANT_ROWS", 256)
    monkeypatch.setattr(_utils, "_plan_checks", dict.fromkeys(_utils._plan_checks, 0))
    monkeypatch.setattr(_utils, "PLANS", True)
    runs = _count_dequant_runs(monkeypatch)
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(1000, 1024, generator=g) * 0.02).to(DEVICE, torch.bfloat16)
    s8 = ref.int8_choose_qparams(w, torch.bfloat16)
    q8 = ref.int8_quantize(w, s8)
    for i in range(3):  # (the last at another M: the same plan)
        x = torch.randn(400 + 50 * (i == 2), 1024, device=DEVICE, dtype=torch.bfloat16)
        got = int8_mod.int8_mm(x, q8, s8)
        assert len(_w8._PLANS) == 1 and len(runs) == i
        with monkeypatch.context() as mp:
            mp.setattr(_utils, "PLANS", False)
            want = int8_mod.int8_mm(x, q8, s8)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got, ref.int8_weight_only_linear(x, q8, s8), rtol=1e-2, atol=1e-2)


def _dyn_weight(scheme, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.02).to(DEVICE)
    if scheme == "fp8":
        scale = ref.fp8_choose_qparams(w)
        return ref.fp8_quantize(w, scale), scale
    scale = ref.int8_choose_qparams(w, torch.float32)
    return ref.int8_quantize(w, scale), scale


@cuda_only
@pytest.mark.parametrize(
    "scheme, m, dtype, planned",
    [("int8", 1, torch.bfloat16, True), ("int8", 5, torch.float16, True), ("int8", 300, torch.bfloat16, True),
     ("fp8", 1, torch.bfloat16, True), ("fp8", 40, torch.float32, True), ("fp8", 200, torch.bfloat16, True),
     ("fp8", 300, torch.float16, None)],  # (GEMV; split-K GEMM; GEMM; fp8's _scaled_mm; sm_90's TMA GEMM: no plan)
)  # fmt: skip
def test_w8a8_and_fp8_plans_run_what_the_launches_give(scheme, m, dtype, planned, monkeypatch):
    # the row quantizer and the product of a W8A8 / fp8 eager call bound once (``_w8.DynPlan``): the
    # first call launches through Triton and keeps the plan (run once more, checked bitwise), later
    # calls run it from the lane without the launcher's body; bitwise the slow path's numbers, and
    # the weights are read where they are
    from lowbit.ops.triton import _w8
    from lowbit.ops.triton import fp8 as fp8_mod
    from lowbit.ops.triton import int8 as int8_mod

    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    if planned is None:  # the TMA GEMM on sm_90+ (no plan), the pointer GEMM below
        planned = torch.cuda.get_device_capability() < (9, 0)
    op, spec = {"int8": (int8_mod.int8_dyn_mm, ref.int8_dynamic_linear), "fp8": (fp8_mod.fp8_dyn_mm, ref.fp8_dynamic_linear)}[scheme]  # fmt: skip
    monkeypatch.setattr(_w8, "_DYN_PLANS", {})
    monkeypatch.setattr(_utils, "_plan_checks", dict.fromkeys(_utils._plan_checks, 0))
    monkeypatch.setattr(_utils, "PLANS", True)
    runs, real = [], _w8.DynPlan.run
    monkeypatch.setattr(_w8.DynPlan, "run", lambda self, *a: runs.append(1) or real(self, *a))
    qdata, scale = _dyn_weight(scheme, 640, 1024, seed=m)
    for i in range(3):
        x = torch.randn(m, 1024, device=DEVICE, dtype=dtype)
        got = op(x, qdata, scale)
        assert len(_w8._DYN_PLANS) == int(planned) and len(runs) == (i + 1) * planned
        with monkeypatch.context() as mp:
            mp.setattr(_utils, "PLANS", False)
            want = op(x, qdata, scale)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got, spec(x, qdata, scale), rtol=3e-2, atol=3e-2 * float(want.abs().max()))
    q2, s2 = _dyn_weight(scheme, 640, 1024, seed=m + 1)
    qdata.copy_(q2)
    scale.copy_(s2)
    got = op(x, qdata, scale)
    torch.testing.assert_close(got, spec(x, q2, s2), rtol=3e-2, atol=3e-2 * float(got.abs().max()))


@cuda_only
def test_a_w8a8_plan_in_a_cuda_graph(monkeypatch):
    from lowbit.ops.triton import _w8
    from lowbit.ops.triton import int8 as int8_mod

    monkeypatch.setattr(_w8, "_DYN_PLANS", {})
    monkeypatch.setattr(_utils, "PLANS", True)
    qdata, scale = _dyn_weight("int8", 512, 1024, seed=9)
    x = torch.randn(24, 1024, device=DEVICE, dtype=torch.bfloat16)
    int8_mod.int8_dyn_mm(x, qdata, scale)  # the plan
    assert len(_w8._DYN_PLANS) == 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = int8_mod.int8_dyn_mm(x, qdata, scale)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        with monkeypatch.context() as mp:
            mp.setattr(_utils, "PLANS", False)
            torch.testing.assert_close(out, int8_mod.int8_dyn_mm(x, qdata, scale), rtol=0, atol=0)


@cuda_only
def test_plan_kinds_are_checked_apart(fresh_plans, monkeypatch):
    # a process's first plans are often all of one kind (a prompt's dequantize chunks): each kind
    # has its own PLAN_CHECKS, and a dequantize plan counts once whatever its chunks
    monkeypatch.setattr(int4_mod, "DEQUANT_ROWS", 256)
    kinds, real = [], _utils.same_bits
    monkeypatch.setattr(_utils, "same_bits", lambda w, g, kind=None: kinds.append(kind) or real(w, g, kind))
    for seed in range(5):  # five plans of four chunks: the first four checked chunk by chunk
        qdata, scale, zero, _ = _weight(1008, 1024, seed=20 + seed)
        int4_mod.int4_mm(torch.randn(300, 1024, device=DEVICE, dtype=torch.bfloat16), qdata, scale, zero, 128, "plain")
    assert _utils._plan_checks["dequant"] == 4 and kinds == [None] * 16 and len(fresh_plans) == 5
    int4_mod.int4_mm(torch.randn(4, 1024, device=DEVICE, dtype=torch.bfloat16), qdata, scale, zero, 128, "plain")
    assert kinds[-1] == "launch" and _utils._plan_checks["launch"] == 1  # the GEMV's plan is still checked


def test_kept_plans_drop_the_oldest_first(monkeypatch):
    # a run of new prompt lengths fills a launcher's plans: the oldest keys go, not all of them
    # (before: the whole cache was cleared, the decode step's plans with it)
    monkeypatch.setattr(_utils, "PLANS_MAX", 3)
    plans = {}
    for i in range(5):
        _utils.keep(plans, ("key", i), i)
    assert list(plans.items()) == [(("key", 2), 2), (("key", 3), 3), (("key", 4), 4)]


@cuda_only
def test_a_dequant_plan_leaves_row_blocks_to_the_launcher(fresh_plans, monkeypatch):
    # an x the launcher would run in row blocks (past MAX_ELEMENTS) skips the lane's dequantize
    # plan: the blocks run through the body (each block's matmul as without plans)
    qdata, scale, zero, plain = _weight(512, 1024, seed=12)
    monkeypatch.setattr(_utils, "MAX_ELEMENTS", 300 * 1024)  # 300-row blocks (the weight still fits)
    int4_mod.int4_mm(torch.randn(300, 1024, device=DEVICE, dtype=torch.bfloat16), qdata, scale, zero, 128, "plain")
    assert len(fresh_plans) == 1  # (the plan, made by a whole x)
    runs = _count_dequant_runs(monkeypatch)
    x = torch.randn(600, 1024, device=DEVICE, dtype=torch.bfloat16)
    got = int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain")
    assert len(runs) == 2  # one per block, through the body's lookup (not one over the whole x)
    torch.testing.assert_close(got, _slow(x, qdata, scale, zero, "plain", monkeypatch), rtol=0, atol=0)


def test_plans_kept_from_several_threads_at_once(monkeypatch):
    # a full cache drops its oldest keys; threads keeping plans at once must not collide there
    import sys
    import threading

    monkeypatch.setattr(_utils, "PLANS_MAX", 8)
    plans, errors = {}, []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def work(t):
        try:
            for i in range(2000):
                _utils.keep(plans, (t, i), i)
        except Exception as e:  # noqa: BLE001 (the failure under test)
            errors.append(e)

    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors and len(plans) == 8


def test_a_bound_launch_passes_its_live_values_where_the_signature_has_them():
    # ``_utils.Bound`` on a recorded launch, with a stand-in compiled kernel that records its call:
    # bound tensors become their addresses, ints and constexprs stay, keyword launch options that
    # are no parameters (num_warps) go, defaults fill in, a callable grid sees the tuned config
    import inspect
    import types

    def kernel(a_ptr, b_ptr, n, BLOCK, FLAG=3):
        pass

    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args, stream: calls.append((grid, args, stream))

    jit = types.SimpleNamespace(signature=inspect.signature(kernel))
    a, b = torch.zeros(4), torch.zeros(8)
    grid = lambda meta: (meta["n"] // meta["BLOCK"],)  # noqa: E731
    bound = _utils.Bound((jit, grid, (a, b, 64), {"BLOCK": 16, "num_warps": 4}, Compiled()), live=(1,))
    bound(12345, stream=7)
    bound(678, stream=9)
    assert calls == [((4, 1, 1), (a.data_ptr(), 12345, 64, 16, 3), 7), ((4, 1, 1), (a.data_ptr(), 678, 64, 16, 3), 9)]


def test_the_w8a8_plans_live_positions_are_the_kernels_per_call_arguments():
    # DynPlan passes x / xq, xs, y (and the GEMM's split-K buffers) per call at fixed positions:
    # they must be those arguments of the kernels it binds (a reordered signature would bind stale ones)
    from lowbit.ops.triton import _w8, quant

    def names(kernel, at):  # (an autotuner and a jit / interpreted function both have arg_names)
        return [kernel.arg_names[i] for i in at]

    assert names(quant._kernel, _w8.DynPlan.QUANT_LIVE) == ["x_ptr", "q_ptr", "s_ptr"]
    assert names(_w8._gemv_kernel, _w8.DynPlan.GEMV_LIVE) == ["x_ptr", "xs_ptr", "y_ptr"]
    assert names(_w8._gemm_kernel, _w8.DynPlan.GEMM_LIVE) == ["x_ptr", "xs_ptr", "y_ptr", "part_ptr", "cnt_ptr"]
