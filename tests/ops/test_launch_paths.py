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
