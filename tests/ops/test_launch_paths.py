"""The eager fast paths: ``kernel_op``'s direct launcher calls (CPU and GPU) and the int4 GEMM's
launch plans (``_utils.LaunchPlan``, GPU only), each against the slow path it skips."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import warnings

import pytest

import lowbit.compile
from lowbit.ops import reference as ref
from lowbit.ops.triton import _int4_gemv, _utils
from lowbit.ops.triton import int4 as int4_mod

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="launch plans are for CUDA launches")


def _weight(n, k, gs=128, seed=0, packing="plain"):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.02).to(DEVICE)
    scale, zero = ref.int4_choose_qparams(w, gs, torch.bfloat16)
    q = ref.int4_quantize(w, scale, zero, gs)
    packs = {"tiled": ref.int4_tiled_pack, "mma": ref.int4_mma_pack, "plain": ref.int4_pack}
    return packs[packing](q), scale, zero, ref.int4_pack(q)


def _dispatched(fn, monkeypatch) -> int:
    """How many times ``fn`` called the operator behind ``int4_mod.int4_mm`` (a spy on ``.op``)."""
    real, calls = int4_mod.int4_mm.op, []
    monkeypatch.setattr(int4_mod.int4_mm, "op", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        fn()
    finally:
        monkeypatch.setattr(int4_mod.int4_mm, "op", real)
    return len(calls)


def test_direct_call_skips_the_dispatcher_and_matches_the_operator(monkeypatch):
    qdata, scale, zero, _ = _weight(48, 256, packing="plain")
    x = torch.randn(3, 256, device=DEVICE, dtype=torch.bfloat16)
    call = int4_mod.int4_mm
    for grad in (False, True):  # gradients off, or on with nothing requiring them
        with torch.set_grad_enabled(grad):
            assert _dispatched(lambda: call(x, qdata, scale, zero, 128, "plain"), monkeypatch) == 0
            torch.testing.assert_close(call(x, qdata, scale, zero, 128, "plain"), call.op(x, qdata, scale, zero, 128, "plain"), rtol=0, atol=0)  # fmt: skip


def test_the_operator_runs_wherever_the_direct_call_would_hide_it(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    qdata, scale, zero, _ = _weight(16, 128, packing="plain")
    x = torch.randn(2, 128, device=DEVICE, dtype=torch.bfloat16)
    run = lambda x=x: int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain")  # noqa: E731

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    def in_mode():  # a dispatch mode (tracers, FlopCounter) sees the operator
        with Record():
            run()

    def profiled():  # a profile names it
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
            run()

    def device_mode():  # a torch function mode
        with torch.device(DEVICE):
            run()

    with torch.no_grad():
        for fn in (in_mode, profiled, device_mode):
            assert _dispatched(fn, monkeypatch) == 1, fn.__name__
    # grad mode with an input that requires grad: the operator's error, not a silent result
    with pytest.raises(RuntimeError, match="has no gradient"):
        run(x.clone().requires_grad_())
    monkeypatch.setattr(lowbit.compile, "DIRECT", False)  # the switch
    with torch.no_grad():
        assert _dispatched(run, monkeypatch) == 1


def test_direct_call_steps_aside_for_transforms_tracers_meta_and_keywords(monkeypatch):
    qdata, scale, zero, plain = _weight(16, 128, packing="plain")
    xs = torch.randn(3, 2, 128, device=DEVICE, dtype=torch.bfloat16)
    run = lambda x: int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain")  # noqa: E731
    with torch.no_grad():
        want = torch.stack([run(x) for x in xs])
        torch.testing.assert_close(torch.vmap(run)(xs), want, rtol=0, atol=0)  # the batching rule of the operator
        meta = int4_mod.int4_mm(xs[0].to("meta"), qdata.to("meta"), scale.to("meta"), zero.to("meta"), 128, "plain")
        assert meta.device.type == "meta" and meta.shape == (2, 16)  # the fake
        by_name = dict(x=xs[0], qdata=qdata, scale=scale, zero=zero, group_size=128, packing="plain")
        torch.testing.assert_close(int4_mod.int4_mm(**by_name), want[0], rtol=0, atol=0)
        assert _dispatched(lambda: torch.jit.trace(run, xs[0], check_trace=False), monkeypatch) == 1
    with pytest.raises(RuntimeError, match="has no gradient"):  # a keyword tensor that requires grad
        int4_mod.int4_mm(**{**by_name, "scale": scale.clone().requires_grad_()})


def test_direct_call_under_compile_stays_an_operator():
    qdata, scale, zero, plain = _weight(32, 256, packing="plain")
    x = torch.randn(4, 256, device=DEVICE, dtype=torch.bfloat16)
    gm = []
    torch._dynamo.reset()
    fn = torch.compile(
        lambda x: int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain"),
        fullgraph=True,
        backend=lambda g, _: gm.append(g) or g.forward,
    )
    torch.testing.assert_close(fn(x), ref.int4_linear(x, plain, scale, zero, 128), rtol=2e-2, atol=2e-2)
    assert any("int4_mm_triton" in str(n.target) for n in gm[0].graph.nodes)


# ----------------------------------------------------------------------------- launch plans (GPU)
@pytest.fixture
def fresh_plans(monkeypatch):
    monkeypatch.setattr(_int4_gemv, "_GLU_PLANS", {})
    monkeypatch.setattr(int4_mod, "_PLANS", {})
    monkeypatch.setattr(_utils, "_plan_checks", dict.fromkeys(_utils._plan_checks, 0))
    monkeypatch.setattr(_utils, "PLANS", True)
    return int4_mod._PLANS


def _slow(x, qdata, scale, zero, packing, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setattr(_utils, "PLANS", False)
        return int4_mod.int4_mm(x, qdata, scale, zero, 128, packing)


def _count_plan_launches(monkeypatch) -> list:
    launches, real = [], _utils.LaunchPlan.__call__
    monkeypatch.setattr(
        _utils.LaunchPlan, "__call__", lambda self, *t, **kw: launches.append(1) or real(self, *t, **kw)
    )
    return launches


@cuda_only
@pytest.mark.parametrize("packing", ["plain", "tiled"])
@pytest.mark.parametrize("m", [1, 5, 8, 16, 33, 128, 256])
def test_a_plan_launches_what_triton_launches(m, packing, fresh_plans, monkeypatch):
    qdata, scale, zero, plain = _weight(1024, 2048, seed=m, packing=packing)
    launches = _count_plan_launches(monkeypatch)
    for i in range(3):  # Triton's launch (makes the plan, launched once to check it), then the plan twice
        x = torch.randn(m, 2048, device=DEVICE, dtype=torch.bfloat16)
        got = int4_mod.int4_mm(x, qdata, scale, zero, 128, packing)
        assert len(fresh_plans) == 1 and len(launches) == i + 1
        torch.testing.assert_close(got, _slow(x, qdata, scale, zero, packing, monkeypatch), rtol=0, atol=0)
        torch.testing.assert_close(got, ref.int4_linear(x, plain, scale, zero, 128), rtol=1e-2, atol=1e-2)


@cuda_only
def test_plans_are_per_weight_shape_and_alignment(fresh_plans, monkeypatch):
    ws = [_weight(512, 1024, seed=s) for s in (1, 2)]
    buf = torch.randn(40 * 1024 + 8, device=DEVICE, dtype=torch.bfloat16)
    # M = 4 and 40, x 16-byte aligned and one element off (contiguous views of one buffer)
    xs = [buf[i : i + m * 1024].view(m, 1024) for m in (4, 40) for i in (0, 1)]
    for _ in range(2):  # interleaved: each key its own plan
        for qdata, scale, zero, _plain in ws:
            for x in xs:
                got = int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain")
                torch.testing.assert_close(got, _slow(x, qdata, scale, zero, "plain", monkeypatch), rtol=0, atol=0)
    # per weight: M = 40 aligned and not (Triton specializes on alignment), M = 4 aligned; x one
    # element off at M <= 8 is copied to an aligned buffer (the GEMV tile's vector loads), no plan
    assert len(fresh_plans) == 6


@cuda_only
def test_plans_on_another_stream_and_in_a_cuda_graph(fresh_plans, monkeypatch):
    qdata, scale, zero, plain = _weight(1000, 2048, seed=3)
    x = torch.randn(2, 2048, device=DEVICE, dtype=torch.bfloat16)
    int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain")
    assert len(fresh_plans) == 1
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        outs = [int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain") for _ in range(10)]
    torch.cuda.current_stream().wait_stream(stream)
    want = _slow(x, qdata, scale, zero, "plain", monkeypatch)
    for o in outs:
        torch.testing.assert_close(o, want, rtol=0, atol=0)
    x5 = torch.randn(5, 2048, device=DEVICE, dtype=torch.bfloat16)
    _slow(x5, qdata, scale, zero, "plain", monkeypatch)  # (compiled and tuned outside the capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain")  # a plan
        out5 = int4_mod.int4_mm(x5, qdata, scale, zero, 128, "plain")  # Triton's launch; no plan made inside
    assert len(fresh_plans) == 1
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        x5.copy_(torch.randn_like(x5))
        graph.replay()
        torch.testing.assert_close(out, _slow(x, qdata, scale, zero, "plain", monkeypatch), rtol=0, atol=0)
        torch.testing.assert_close(out5, _slow(x5, qdata, scale, zero, "plain", monkeypatch), rtol=0, atol=0)


@cuda_only
def test_a_plan_that_does_not_reproduce_triton_turns_plans_off(fresh_plans, monkeypatch):
    qdata, scale, zero, _ = _weight(256, 1024, seed=4)
    x = torch.randn(3, 1024, device=DEVICE, dtype=torch.bfloat16)
    monkeypatch.setattr(_utils.LaunchPlan, "__call__", lambda self, *t, **kw: None)  # a launch that does nothing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain")
    assert not _utils.PLANS and not fresh_plans
    assert any("launch plans are off" in str(w.message) for w in caught)
    monkeypatch.undo()
    torch.testing.assert_close(got, _slow(x, qdata, scale, zero, "plain", monkeypatch), rtol=0, atol=0)


@cuda_only
@pytest.mark.parametrize("packing", ["plain", "tiled"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_a_glu_plan_launches_what_triton_launches(m, packing, fresh_plans, monkeypatch):
    qdata, scale, zero, plain = _weight(2 * 768, 1024, seed=m, packing=packing)  # [gate; up]
    launches = _count_plan_launches(monkeypatch)
    buf = torch.randn(m * 1024 + 1, device=DEVICE, dtype=torch.bfloat16)
    for i in range(4):  # Triton's launch (makes the plan, launched once to check it), the plan twice,
        # then x one element off (the tile's 16-byte loads take an aligned copy: no plan)
        x = torch.randn(m, 1024, device=DEVICE, dtype=torch.bfloat16) if i < 3 else buf[1:].view(m, 1024)
        got = _int4_gemv.int4_mm_swiglu(x, qdata, scale, zero, 128, packing)
        assert len(_int4_gemv._GLU_PLANS) == 1 and len(launches) == min(i + 1, 3)
        with monkeypatch.context() as mp:
            mp.setattr(_utils, "PLANS", False)
            want = _int4_gemv.int4_mm_swiglu(x, qdata, scale, zero, 128, packing)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got, ref.swiglu(ref.int4_linear(x, plain, scale, zero, 128)), rtol=2e-2, atol=2e-2)


def _count_checks(monkeypatch) -> list:
    """Calls of the int4 launchers' argument checks (which a plan's lane skips)."""
    calls, real = [], _int4_gemv.check_int4_args
    spy = lambda *a: calls.append(a[0]) or real(*a)  # noqa: E731
    monkeypatch.setattr(_int4_gemv, "check_int4_args", spy)
    monkeypatch.setattr(int4_mod, "check_int4_args", spy)
    return calls


@cuda_only
def test_the_lane_launches_a_kept_plan_before_the_checks(fresh_plans, monkeypatch):
    qdata, scale, zero, plain = _weight(768, 1024, seed=5)
    checks, launches = _count_checks(monkeypatch), _count_plan_launches(monkeypatch)
    x = torch.randn(16, 1024, device=DEVICE, dtype=torch.bfloat16)
    int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain")  # Triton's launch, checked, plan kept
    assert len(checks) == 1 and len(launches) == 1
    for _ in range(2):  # the lane: no checks, no body
        x = torch.randn(16, 1024, device=DEVICE, dtype=torch.bfloat16)
        got = int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain")
        torch.testing.assert_close(got, _slow(x, qdata, scale, zero, "plain", monkeypatch), rtol=0, atol=0)
    assert checks.count("int4_mm") == 3 and len(launches) == 3  # (one check per slow reference call)
    int4_mod.int4_mm(x, qdata, scale, zero, 128, packing="plain")  # keywords: the checks, then the plan
    assert checks.count("int4_mm") == 4 and len(launches) == 4
    # a switch its branches read, changed: the same arguments make a new key (the lane misses)
    with monkeypatch.context() as mp:
        mp.setattr(int4_mod, "DEQUANT_MIN_M", 8)  # the dequantize path from M = 8: no plan
        got = int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain")
        assert len(launches) == 4 and checks.count("int4_mm") == 5
    torch.testing.assert_close(got, ref.int4_linear(x, plain, scale, zero, 128), rtol=1e-2, atol=1e-2)


@cuda_only
def test_a_plan_reads_its_weights_where_they_are(fresh_plans, monkeypatch):
    # the plan holds the weights' addresses: new values written in place are read on the next call
    qdata, scale, zero, _ = _weight(512, 1024, seed=6)
    x = torch.randn(4, 1024, device=DEVICE, dtype=torch.bfloat16)
    before = int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain")
    q2, s2, z2, plain2 = _weight(512, 1024, seed=7)
    for dst, src in ((qdata, q2), (scale, s2), (zero, z2)):
        dst.copy_(src)
    got = int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain")
    assert len(fresh_plans) == 1 and not torch.equal(got, before)
    torch.testing.assert_close(got, _slow(x, q2, s2, z2, "plain", monkeypatch), rtol=0, atol=0)
    torch.testing.assert_close(got, ref.int4_linear(x, plain2, s2, z2, 128), rtol=1e-2, atol=1e-2)
    # and the same layout at other addresses is another key: its own plan, its own numbers
    got2 = int4_mod.int4_mm(x, q2, s2, z2, 128, "plain")
    assert len(fresh_plans) == 2
    torch.testing.assert_close(got2, got, rtol=0, atol=0)


@cuda_only
def test_the_glu_lane_skips_the_checks_and_misses_when_the_tile_is_off(fresh_plans, monkeypatch):
    qdata, scale, zero, plain = _weight(2 * 512, 1024, seed=8)
    checks = _count_checks(monkeypatch)
    x = torch.randn(2, 1024, device=DEVICE, dtype=torch.bfloat16)
    first = _int4_gemv.int4_mm_swiglu(x, qdata, scale, zero, 128, "plain")
    again = _int4_gemv.int4_mm_swiglu(x, qdata, scale, zero, 128, "plain")
    assert checks == ["int4_mm_swiglu"] and len(_int4_gemv._GLU_PLANS) == 1
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    with monkeypatch.context() as mp:  # the GEMV tile off: no fused tile, so the kept plan must not run
        mp.setattr(int4_mod, "GEMV_MAX_M", 0)
        got = _int4_gemv.int4_mm_swiglu(x, qdata, scale, zero, 128, "plain")
    assert checks[:2] == ["int4_mm_swiglu", "int4_mm_swiglu"]  # (then int4_mm's, for the composed path)
    torch.testing.assert_close(got, ref.swiglu(ref.int4_linear(x, plain, scale, zero, 128)), rtol=2e-2, atol=2e-2)


def test_a_kept_plan_reads_the_config_of_its_own_launch(monkeypatch):
    # Triton's autotuner keeps its last call's config in best_config, shared by threads: thread a's
    # launch holds still until thread b's launch can start (or 0.5 s pass); without launch's lock b
    # sets its config in between and a's plan reads it
    import threading

    seen = []
    monkeypatch.setattr(_utils, "keep_plan", lambda plans, key, compiled, kernel, *a, **k: seen.append((key, kernel.best_config)))  # fmt: skip
    a_started, b_started = threading.Event(), threading.Event()

    class Tuner:
        best_config = None

        def __getitem__(self, grid):
            def run(*args, tag):
                self.best_config = tag
                if tag == "a":
                    a_started.set()
                    b_started.wait(0.5)
                else:
                    b_started.set()
                return tag

            return run

    tuner = Tuner()
    ta = threading.Thread(target=_utils.launch, args=(tuner, None, (), {"tag": "a"}, {}, "key a"))
    ta.start()
    assert a_started.wait(5)
    tb = threading.Thread(target=_utils.launch, args=(tuner, None, (), {"tag": "b"}, {}, "key b"))
    tb.start()
    ta.join()
    tb.join()
    assert seen == [("key a", "a"), ("key b", "b")]
    assert _utils.launch(tuner, None, (), {"tag": "c"}) == "c" and len(seen) == 2  # no key: no plan


@cuda_only
def test_launches_that_do_not_split_share_placeholders_made_outside_captures(monkeypatch):
    monkeypatch.setattr(_utils, "_PLACEHOLDERS", {})
    dev = torch.device(DEVICE, torch.cuda.current_device())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # none yet: fresh ones in the capture, none cached
        ws, cnt = _utils.split_k_buffers(dev, 4, 64, 1)
        torch.ones(1, device=dev).add_(1)  # (a graph with a kernel in it)
    assert not _utils._PLACEHOLDERS and ws.dtype == torch.float32 and cnt.dtype == torch.int32
    first = _utils.split_k_buffers(dev, 4, 64, 1)
    assert first[0].dtype == torch.float32 and first[1].dtype == torch.int32
    assert first[0].data_ptr() == first[1].data_ptr()  # (one int32 zero, viewed as the fp32 workspace)
    for m, n in ((1, 8), (300, 4096)):
        pair = _utils.split_k_buffers(dev, m, n, 1)
        assert pair[0] is first[0] and pair[1] is first[1]
    ws, cnt = _utils.split_k_buffers(dev, 4, 64, 2)  # a split: its own workspace
    assert ws.shape == (2, 4, 64) and cnt.dtype == torch.int32


@cuda_only
def test_the_lane_leaves_bad_shapes_to_the_checks(fresh_plans, monkeypatch):
    monkeypatch.setattr(int4_mod, "AUTOTUNE", False)  # (the fixed config's key reads x's shape)
    qdata, scale, zero, _ = _weight(64, 256)
    for bad in (torch.randn(256, device=DEVICE, dtype=torch.bfloat16), torch.randn(2, 2, 256, device=DEVICE)):
        with pytest.raises(ValueError, match="2-D floating tensor"):
            int4_mod.int4_mm(bad, qdata, scale, zero, 128, "plain")
    x = torch.randn(4, 256, device=DEVICE, dtype=torch.bfloat16)
    for gs in (0, 48, None):  # (the fixed config's key would divide by it)
        with pytest.raises(ValueError, match="group_size"):
            int4_mod.int4_mm(x, qdata, scale, zero, gs, "plain")


@cuda_only
def test_a_plan_is_not_used_past_the_launchers_size_limit(fresh_plans, monkeypatch):
    qdata, scale, zero, _ = _weight(64, 256)
    x = torch.randn(8, 256, device=DEVICE, dtype=torch.bfloat16)
    int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain")
    assert len(fresh_plans) == 1
    monkeypatch.setattr(_utils, "MAX_ELEMENTS", 1000)  # the weight (64 x 128 bytes) is now refused
    with pytest.raises(ValueError, match="more than 1000 elements"):
        int4_mod.int4_mm(x, qdata, scale, zero, 128, "plain")


@cuda_only
@pytest.mark.parametrize("m", [1, 5, 64])
def test_w8a16_plans_launch_what_triton_launches_and_skip_the_body(m, monkeypatch):
    from lowbit.ops.triton import _w8
    from lowbit.ops.triton import int8 as int8_mod

    monkeypatch.setattr(_w8, "_PLANS", {})
    monkeypatch.setattr(_utils, "_plan_checks", dict.fromkeys(_utils._plan_checks, 0))
    monkeypatch.setattr(_utils, "PLANS", True)
    bodies, real = [], int8_mod.w8_mm
    monkeypatch.setattr(int8_mod, "w8_mm", lambda *a: bodies.append(1) or real(*a))
    launches = _count_plan_launches(monkeypatch)
    g = torch.Generator().manual_seed(m)
    w = (torch.randn(768, 1024, generator=g) * 0.02).to(DEVICE, torch.bfloat16)
    s8 = ref.int8_choose_qparams(w, torch.bfloat16)
    q8 = ref.int8_quantize(w, s8)
    for i in range(3):  # Triton's launch (makes the plan, launched once to check it), then the lane twice
        x = torch.randn(m, 1024, device=DEVICE, dtype=torch.bfloat16)
        got = int8_mod.int8_mm(x, q8, s8)
        assert len(_w8._PLANS) == 1 and len(launches) == i + 1 and len(bodies) == 1 + i  # (+ the slow calls)
        with monkeypatch.context() as mp:  # (the slow path: its own body)
            mp.setattr(_utils, "PLANS", False)
            want = int8_mod.int8_mm(x, q8, s8)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got, ref.int8_weight_only_linear(x, q8, s8), rtol=1e-2, atol=1e-2)


@cuda_only
def test_queued_split_k_launches_share_a_stream_workspace_and_stay_right(fresh_plans, monkeypatch):
    # every shape launched once on each of two streams (compiled, tuned, planned, each stream's
    # workspace grown to fit; growth synchronizes the device), then the same launches queued on both
    # streams at once behind sleeping kernels, none synced: nothing is made while they queue, the
    # two streams' launches (running concurrently) use two workspaces, and every output is right
    monkeypatch.setattr(_utils, "_WORKSPACES", {})
    monkeypatch.setattr(_utils, "_SPLIT_PAIRS", {})
    dev = torch.device(DEVICE, torch.cuda.current_device())
    weights = [_weight(n, k, seed=n + k) for n, k in ((256, 2048), (512, 4096), (384, 1024))]
    calls = [(w, m) for m in (3, 16, 40) for w in weights]
    xs = [torch.randn(m, w[0].shape[1] * 2, device=dev, dtype=torch.bfloat16) for w, m in calls]
    streams = (torch.cuda.current_stream(), torch.cuda.Stream())
    torch.cuda.synchronize()  # (the inputs are made)
    for stream in streams:
        with torch.cuda.stream(stream):
            for (w, _), x in zip(calls, xs):
                int4_mod.int4_mm(x, *w[:3], 128, "plain")
    torch.cuda.synchronize()
    made = []
    real = _utils.zeros_outside_pools
    monkeypatch.setattr(_utils, "zeros_outside_pools", lambda *a: made.append(a) or real(*a))
    for stream in streams:
        with torch.cuda.stream(stream):
            torch.cuda._sleep(50_000_000)  # the launches below queue up behind it
    outs = {stream: [] for stream in streams}
    for (w, _), x in zip(calls, xs):  # (alternating: both queues fill)
        for stream in streams:
            with torch.cuda.stream(stream):
                outs[stream].append(int4_mod.int4_mm(x, *w[:3], 128, "plain"))
    assert not made  # no workspace or counters made (no device sync) while the launches queued
    torch.cuda.synchronize()
    for got in outs.values():
        for ((_, scale, zero, plain), _), x, y in zip(calls, xs, got):
            torch.testing.assert_close(y, ref.int4_linear(x, plain, scale, zero, 128), rtol=2e-2, atol=2e-2)
    if not _utils.AUTOTUNE:  # (the fixed config splits K at these M: each stream has its own kept workspace)
        kept = {k[1]: v.data_ptr() for k, v in _utils._WORKSPACES.items()}
        assert {s.cuda_stream for s in streams} <= set(kept) and len(set(kept.values())) == len(kept)


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
