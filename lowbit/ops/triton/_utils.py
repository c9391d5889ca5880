"""Helpers shared by the Triton launchers: interpreter detection and autotune plumbing."""

from __future__ import annotations

import functools
import inspect
import os
import threading

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# The interpreter (CPU CI) runs exactly one config and computes ``tl.dot`` on
# bf16/fp16/int8 operands wrongly, so kernels upcast dot operands to fp32 there.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# LOWBIT_TRITON_AUTOTUNE=0 runs the small fixed config on the GPU too (fast test runs).
AUTOTUNE = not INTERPRET and os.environ.get("LOWBIT_TRITON_AUTOTUNE", "1") != "0"


# Programmatic dependent launch (sm_90+): the Triton matmuls of the small-M paths are launched
# with launch_pdl and begin with ``pdl_start``, so a kernel's launch and its CTAs' start overlap
# the previous kernel's tail (``griddepcontrol.wait`` holds each CTA until that kernel is
# complete and its writes visible, before any load or store). LOWBIT_TRITON_PDL=0 turns it off.
PDL = os.environ.get("LOWBIT_TRITON_PDL", "1") != "0"

# Autotune results go to Triton's cache dir and are reused by later processes (a model
# compiles without re-timing every config). Triton >= 3.4 has the option.
TUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


# The kernels index with 32-bit offsets: an operand or output of 2**31 or more elements
# would wrap. Launchers run such activations in row blocks and refuse such weights.
MAX_ELEMENTS = 2**31 - 1


def _raise_device(name, x, qdata, params, kw):
    named = [("qdata", qdata)] + [(f"argument {i + 3}", p) for i, p in enumerate(params)] + list(kw.items())
    for label, t in named:
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"{name}: x is on {x.device} but {label} is on {t.device}")


def launcher(name: str, weight_dtypes: tuple[torch.dtype, ...], lane=None):
    """Decorator for a public Triton launcher ``fn(x [M, K], qdata [N, ...], *params)``.

    Checks what the kernels cannot (x 2-D and floating, qdata's dtype, every tensor on x's
    device), runs on x's CUDA device (Triton launches on the current device: a model split
    over GPUs keeps cuda:0 current), and splits M so no operand or output reaches
    MAX_ELEMENTS. ``lane(x, qdata, *params)``, if given, is tried first for a CUDA x on the
    current device (positional arguments, plans on): the launch through a kept ``LaunchPlan``
    whose key pins everything the checks and ``fn``'s branches read (so these arguments
    passed them when the plan was made), or None."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(x: torch.Tensor, qdata: torch.Tensor, *params, **kw):
            if lane is not None and PLANS and not kw and x.is_cuda and x.get_device() == torch._C._cuda_getDevice():
                y = lane(x, qdata, *params)  # a kept plan for these exact arguments (they passed the checks)
                if y is not None:
                    return y
            if x.dim() != 2 or not x.is_floating_point():
                raise ValueError(f"{name}: x must be a 2-D floating tensor [M, K], got {x.dtype} {tuple(x.shape)}")
            if qdata.dtype not in weight_dtypes:
                want = " or ".join(str(d) for d in weight_dtypes)
                raise TypeError(f"{name}: qdata has dtype {qdata.dtype}, expected {want}")
            dev = x.device
            for t in (qdata, *params, *kw.values()):
                if isinstance(t, torch.Tensor) and t.device != dev:
                    _raise_device(name, x, qdata, params, kw)
            if qdata.numel() > MAX_ELEMENTS:
                raise ValueError(
                    f"{name}: weight {tuple(qdata.shape)} has more than {MAX_ELEMENTS} elements, beyond the "
                    "kernels' 32-bit offsets; split the layer"
                )
            if x.is_cuda and dev.index != torch.cuda.current_device():
                with torch.cuda.device(dev):
                    return run(x, qdata, *params, **kw)
            m, k = x.shape
            rows = MAX_ELEMENTS // max(k, qdata.shape[0], 1)
            if m <= rows:
                return fn(x, qdata, *params, **kw)
            return torch.cat([fn(x[i : i + rows], qdata, *params, **kw) for i in range(0, m, rows)])

        return run

    return wrap


def m_bucket(m: int) -> int:
    """Autotune key for the number of rows: the next power of two, capped at 4096.

    Keying on the bucket (not raw M) keeps the number of tuning runs small when
    the batch size varies (prefill lengths, dynamic batching).
    """
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def configs(gpu: list[triton.Config], interp: triton.Config) -> list[triton.Config]:
    """The GPU search space, or the single fixed config (interpreter, autotune off)."""
    return gpu if AUTOTUNE else [interp]


def cfg(num_warps: int = 4, num_stages: int = 3, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------- split-K
@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so CPU tests exercise the split-K path


@functools.cache
def is_sm90_or_newer(device: torch.device) -> bool:
    """Hopper or newer (wgmma, TMA); cached: the query costs 2-5 us per eager call."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def pdl_args(device: torch.device, mode: int = 1) -> dict:
    """Launch arguments for a kernel that begins with ``pdl_start``: programmatic dependent
    launch on sm_90+ GPUs (``PDL``), nothing elsewhere (the interpreter, older GPUs, CPU).
    ``mode`` is the kernel's PDL constexpr when on (see ``pdl_start``); 0 means plain launches."""
    on = mode and PDL and not INTERPRET and is_sm90_or_newer(device)
    return {"PDL": mode, "launch_pdl": True} if on else {"PDL": 0}


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """First statement of a kernel launched with ``pdl_args``: wait until the previous kernel
    on the stream has completed (its writes visible); PDL == 1 then lets the next one launch
    at once, PDL == 2 leaves that to ``pdl_trigger`` (or to each CTA's exit)."""
    if PDL:
        gdc_wait()
    if PDL == 1:
        gdc_launch_dependents()


_INTERPRET_BF16 = tl.constexpr(INTERPRET)


@triton.jit
def round_to(v, DT: tl.constexpr):
    """``v`` rounded to DT to nearest even, as ``v.to(DT)`` on a GPU; Triton's interpreter
    truncates fp32 -> bf16 (3.6 and 3.9), so there an fp32 v's bits are rounded by hand (finite
    values)."""
    if _INTERPRET_BF16 and DT == tl.bfloat16 and v.dtype == tl.float32:
        b = v.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DT)


@triton.jit
def pdl_trigger(PDL: tl.constexpr, WHEN: tl.constexpr):
    """Let the next kernel launch here if the kernel's PDL mode is WHEN."""
    if PDL == WHEN:
        gdc_launch_dependents()


# (device, stream) -> int32 split-K tile counters, shared by every split-K GEMM (int4, 8-bit):
# launches on a stream run in order and each leaves its counters at zero. Splits only run
# for M <= 128, so 65536 counters (16x16 tiles) cover N up to 131072.
_COUNTERS: dict = {}
_SPARE_COUNTERS: dict = {}  # device -> zeroed buffers for streams first seen in a capture
SPARE_COUNTERS = 2
COUNTERS_SIZE = 1 << 16


def zeros_outside_pools(device: torch.device, n: int) -> torch.Tensor:
    """torch.zeros from a plain thread: torch.compile's cudagraph trees route the calling
    thread's allocations into their pool during warm-up and reject tensors an op keeps
    alive there; a cache must not live in that pool."""
    box: list = []

    def make():
        try:
            box.append(torch.zeros(n, device=device, dtype=torch.int32))
            torch.cuda.synchronize(device)
        except BaseException as e:  # re-raised in the caller
            box.append(e)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def current_raw_stream(index: int) -> int:
    """The handle of device ``index``'s current CUDA stream: ``torch.cuda.current_stream(d).cuda_stream``
    without the Stream object (~3 us less per eager call on the H100 host)."""
    return torch._C._cuda_getCurrentRawStream(index)


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 counters for one split-K launch, one cached buffer per stream.

    The kernel puts every counter it used back to zero, so the launches that follow each
    other on a stream share a buffer; concurrent streams get their own. Buffers are made
    and zeroed outside any CUDA graph (from a plain thread, see ``zeros_outside_pools``).
    A stream first seen inside a capture takes a spare buffer made by an earlier eager
    call; a buffer made inside a capture would live in that graph's pool and be zeroed
    only when that graph replays, so another graph captured on the stream could read it
    unzeroed. With no spare left, the launch gets zeros of its own, captured in the graph.
    A launch that needs more counters than the cache holds gets fresh zeros too."""
    if tiles > COUNTERS_SIZE:
        return torch.zeros(tiles, device=device, dtype=torch.int32)
    if device.type != "cuda":
        if (device, 0) not in _COUNTERS:
            _COUNTERS[device, 0] = torch.zeros(COUNTERS_SIZE, device=device, dtype=torch.int32)
        return _COUNTERS[device, 0]
    key = (device, current_raw_stream(device.index))
    buf = _COUNTERS.get(key)
    spares = _SPARE_COUNTERS.setdefault(device, [])
    if buf is not None and len(spares) >= SPARE_COUNTERS:
        return buf
    if not torch.cuda.is_current_stream_capturing():
        while len(spares) < SPARE_COUNTERS:  # for streams a capture will use
            spares.append(zeros_outside_pools(device, COUNTERS_SIZE))
        if buf is None:
            buf = _COUNTERS[key] = zeros_outside_pools(device, COUNTERS_SIZE)
        return buf
    if buf is None:
        if not spares:
            return torch.zeros(tiles, device=device, dtype=torch.int32)
        buf = _COUNTERS[key] = spares.pop()
        _SPLIT_PAIRS.clear()  # (eager launches take the counters from there: the next one tops the spares up)
    return buf


def clean_l2_bench(kernel_call, quantiles=None, reps: int = 40):
    """Timing for an autotuner (``triton.autotune(do_bench=...)``): each timed call follows a
    read of 256 MB, so the weights come from DRAM and L2 holds only clean lines. Triton's own
    flush is a 256 MB memset, whose dirty lines (up to the L2's 50 MB on an H100) are written
    back during the timed call: against this read it added 1-6 us to int4 configs at M=1, by
    different amounts per config (on 4096 x 14336 ~5.4 us to the GEMV tile, ~2.5 to the best
    tensor-core tile), which hid a 15.8 against 18.6 us difference in a CUDA graph
    (bench/results/h100-s14-gemv.md). The read also keeps the GPU busy while the host enqueues
    the timed call, so the events do not time the launch. Returns the
    ``quantiles`` of the per-call times in ms (their median without quantiles)."""
    flush = torch.empty(64 << 20, dtype=torch.int32, device=torch.cuda.current_device())
    kernel_call()
    torch.cuda.synchronize()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.sum()  # (its contents do not matter: only that every line is read)
        start[i].record()
        kernel_call()
        end[i].record()
    torch.cuda.synchronize()
    times = torch.tensor([a.elapsed_time(b) for a, b in zip(start, end)], dtype=torch.float64)
    if quantiles is None:
        return float(times.median())
    return [float(v) for v in torch.quantile(times, torch.tensor(quantiles, dtype=torch.float64))]


# How the autotuners time configs: "clean" (clean_l2_bench) or "triton" (Triton's do_bench and
# its memset flush), for A/B runs. Triton's autotune disk cache is not keyed on it: give each
# setting its own TRITON_CACHE_DIR.
TUNE_BENCH = os.environ.get("LOWBIT_TUNE_BENCH", "clean")
if TUNE_BENCH not in ("clean", "triton"):
    raise ValueError(f"LOWBIT_TUNE_BENCH={TUNE_BENCH!r}: expected 'clean' or 'triton'")


def tune_bench(kernel_call, quantiles=None):
    """The ``do_bench`` of every lowbit autotuner (``TUNE_BENCH`` picks the timing)."""
    if TUNE_BENCH == "triton":
        return triton.testing.do_bench(kernel_call, quantiles=quantiles)
    return clean_l2_bench(kernel_call, quantiles)


# Split-K workspace ([SPLIT_K, M, N] x 4 bytes) never larger than this.
MAX_WORKSPACE = 64 << 20
_PLACEHOLDERS: dict = {}  # device -> (workspace, counters) placeholders of launches that do not split K


_WORKSPACES: dict = {}  # (device, raw stream) -> the flat fp32 split-K workspace of eager launches on it
_SPLIT_PAIRS: dict = {}  # (device, raw stream, most, m, n) -> (workspace view, counters), eager launches


def split_k_buffers(
    device: torch.device, m: int, n: int, most: int, stream: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(workspace, tile counters) for a GEMM launch whose configs split K at most ``most``
    ways: 4-byte partial sums [most, M, N] and the stream's zeroed counters (BLOCK_M,
    BLOCK_N >= 16 in every config); placeholders of the same dtypes for ``most == 1``, so
    one compile serves both.

    Eager CUDA launches take a view of one workspace kept per stream (made outside any pool as
    the counters are, grown to a power of two): launches on a stream run in its order, and each
    kernel waits for the one before it to complete before any load or store (``pdl_start``), so
    the workspace is free when the next one writes it. Making or growing it synchronizes the
    device (``zeros_outside_pools``), so growth never finds launches in flight; it happens a few
    times per stream. A launch inside a CUDA-graph capture gets a workspace of its own, in the
    graph's pool (a graph may replay on another stream, or after the kept workspace has grown).
    ``stream``: the device's current raw stream, if the caller has it."""
    if most == 1:  # (never read or written: one pair per device, made outside any capture)
        pair = _PLACEHOLDERS.get(device)
        if pair is None:
            if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
                return torch.empty(1, device=device, dtype=torch.float32), torch.empty(
                    1, device=device, dtype=torch.int32
                )
            cnt = zeros_outside_pools(device, 1)
            pair = _PLACEHOLDERS[device] = (cnt.view(torch.float32), cnt)
        return pair
    tiles = triton.cdiv(m, 16) * triton.cdiv(n, 16)
    if device.type != "cuda" or tiles > COUNTERS_SIZE or torch.cuda.is_current_stream_capturing():
        return torch.empty((most, m, n), device=device, dtype=torch.float32), tile_counters(device, tiles)
    stream = current_raw_stream(device.index) if stream is None else stream
    pair = _SPLIT_PAIRS.get((device, stream, most, m, n))
    if pair is None:
        pair = _SPLIT_PAIRS[device, stream, most, m, n] = _stream_split_pair(device, stream, most, m, n, tiles)
    return pair


def _stream_split_pair(device, stream: int, most: int, m: int, n: int, tiles: int):
    """A view of ``stream``'s kept workspace for [most, m, n] (grown first if smaller; the old one is
    recorded on the stream, though the new one's making synchronized the device), and the stream's
    counters."""
    size = most * m * n
    ws = _WORKSPACES.get((device, stream))
    if ws is None or ws.numel() < size:
        if ws is not None:
            ws.record_stream(torch.cuda.current_stream(device))
        ws = _WORKSPACES[device, stream] = zeros_outside_pools(device, triton.next_power_of_2(size)).view(torch.float32)
        for key in [k for k in list(_SPLIT_PAIRS) if k[:2] == (device, stream)]:  # views of the old one
            _SPLIT_PAIRS.pop(key, None)
    if len(_SPLIT_PAIRS) >= 4096:
        _SPLIT_PAIRS.clear()
    return ws[:size].view(most, m, n), tile_counters(device, tiles)


@triton.jit
def dot_acc(a, b, acc, DOT_F32: tl.constexpr):
    """``acc + a @ b`` for float operands: fp32 operands on the interpreter (its bf16 / fp16
    dot is wrong), IEEE fp32 products for fp32 inputs (as F.linear; tl.dot's default is TF32),
    else the tensor core's own dot."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Output tile ``tile`` -> (pid_m, pid_n), walking GROUP_M row-tiles at a time down each
    column so that consecutive tiles share weight tiles in L2."""
    width = GROUP_M * num_n
    first_m = (tile // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % width) % size_m, (tile % width) // size_m


@triton.jit
def split_k_reduce(acc, part_ptr, tile_ptr, pid_k, offs, mask, MN, SPLIT_K: tl.constexpr):
    """One split's share of an in-kernel split-K reduction -> (sum of all splits, last).

    Stores this split's partial sums (their bits, so int32 sums stay exact in the fp32
    workspace) into slice ``pid_k``, then counts the split in on the output tile's counter
    (zero at launch). The split that arrives last gets the SPLIT_K slices added in a fixed
    order (deterministic) and puts the counter back to zero for the next launch on the
    stream; the others get zeros and ``last`` false.
    """
    tl.store(part_ptr + pid_k * MN + offs, acc.to(tl.float32, bitcast=True), mask=mask)
    tl.debug_barrier()  # every thread's partial is written before the release below
    last = tl.atomic_add(tile_ptr, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
    total = tl.zeros_like(acc)
    if last:
        for i in tl.static_range(SPLIT_K):  # .cg: read the other SMs' partials from L2
            part = tl.load(part_ptr + i * MN + offs, mask=mask, other=0.0, cache_modifier=".cg")
            total += part.to(acc.dtype, bitcast=True)
        tl.atomic_xchg(tile_ptr, 0, sem="relaxed", scope="gpu")
    return total, last


# ----------------------------------------------------------------------------- eager launch plans
# An eager call of a tuned kernel pays Triton's autotuner lookup and argument binding (~50 us per
# launch on the H100 host, bench/eager_probe.py --pieces) and the launcher's own preparation. A
# launcher may keep a LaunchPlan per call key (every shape, stride, dtype, pointer and flag its
# launch depends on) and launch the compiled kernel directly on later calls with that key.
# LOWBIT_LAUNCH_PLANS=0 turns plans off (Triton's launch path on every call).
PLANS = not INTERPRET and os.environ.get("LOWBIT_LAUNCH_PLANS", "1") != "0"
PLANS_MAX = 4096  # keys kept per launcher (then the oldest go first)
# plans of each kind (GEMM / GEMV ``LaunchPlan``, ``DequantPlan``, W8A8 ``_w8.DynPlan`` with a GEMV,
# a GEMM or a live product) checked bitwise
# against Triton's own launch before that kind is trusted (kinds apart: their bindings differ, and a
# process's first launches are all of one kind, e.g. a prompt's)
PLAN_CHECKS = 4
_plan_checks = {"launch": 0, "dequant": 0, "dyn-gemv": 0, "dyn-gemm": 0, "dyn-product": 0}


def keep(plans: dict, key: tuple, plan) -> None:
    """``plans[key] = plan``, the oldest key dropped first once PLANS_MAX are kept (a run of new
    prompt lengths then drops plans one at a time, not the whole cache; a plan is remade on its
    next call). Under the launch lock: threads keep plans at once."""
    with _LAUNCH_LOCK:
        while len(plans) >= PLANS_MAX:
            plans.pop(next(iter(plans)), None)
        plans[key] = plan


def checking(kind: str) -> bool:
    """Whether the next plan of ``kind`` is checked (``same_bits``)."""
    return _plan_checks[kind] < PLAN_CHECKS


class LaunchPlan:
    """A compiled Triton kernel's launch with its arguments bound once (``JITFunction.run``'s
    binding, done at plan time), for kernels whose arguments start (x, three weight tensors, the
    output), then with ``extra["most"]`` (a split-K launch) the split-K workspace and its counters:
    ``plan(x, y[, ws, cnt])`` launches it through ``CompiledKernel[grid]`` (the compiled kernel's
    own launch, as ``JITFunction.run`` ends), on x's device's current stream, with the weights
    passed as the addresses they had at plan time (which the plan's key pins; Triton's launcher
    takes an int as a pointer as it is, and checks a tensor's with the driver). ``run`` passes
    its own tensors (x, the new output, the buffers: all on x's device) as addresses too."""

    __slots__ = ("launch", "weights", "tail", "extra", "buffers", "device")

    def __init__(self, kernel, jit_fn, grid, args: tuple, kwargs: dict, **extra):
        params = jit_fn.signature.parameters
        bound = jit_fn.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in params})
        bound.apply_defaults()
        g = tuple(grid(bound.arguments) if callable(grid) else grid)
        self.launch = kernel[(g + (1, 1))[:3]]
        self.weights = tuple(t.data_ptr() for t in args[1:4])
        self.buffers = 2 if "most" in extra else 0
        self.tail = tuple(bound.arguments.values())[5 + self.buffers :]
        self.extra = extra
        self.device = args[0].device  # (the key pins x's device)

    def __call__(self, x, y, *buffers, stream: int | None = None) -> None:
        """The launch: tensors, or their addresses with ``stream`` (a raw handle) given."""
        stream = current_raw_stream(x.get_device()) if stream is None else stream
        self.launch(x, *self.weights, y, *buffers, *self.tail, stream=stream)

    def run(self, x: torch.Tensor, cols: int, ws_cols: int) -> torch.Tensor:
        """A new [M, cols] output of the launch (split-K buffers for [M, ws_cols])."""
        m = x.shape[0]
        y = x.new_empty((m, cols))
        stream = current_raw_stream(x.get_device())
        if self.buffers:
            ws, cnt = split_k_buffers(self.device, m, ws_cols, self.extra["most"], stream)
            self(x.data_ptr(), y.data_ptr(), ws.data_ptr(), cnt.data_ptr(), stream=stream)
        else:
            self(x.data_ptr(), y.data_ptr(), stream=stream)
        return y


def plan_key(x: torch.Tensor, weights: tuple, *switches) -> tuple:
    """A launch plan's key: x's shape, strides, dtype, device and 16-byte alignment; each weight
    tensor's address, shape, strides and dtype (a later tensor at the same address and layout
    launches the same way; its device is that of its address, CUDA's address space being one); the
    launcher's switches (and PDL, and ``MAX_ELEMENTS``, which the launcher's wrapper reads)."""
    return (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16,
            *[(t.data_ptr(), t.shape, t.stride(), t.dtype) for t in weights], *switches, PDL, MAX_ELEMENTS)  # fmt: skip


_LAUNCH_LOCK = threading.RLock()


def launch(
    kernel, grid, args: tuple, kw: dict, plans: dict | None = None, key: tuple | None = None, record=None, **extra
):
    """``kernel[grid](*args, **kw)`` for an autotuned kernel, and with ``key`` a plan of that launch
    kept in ``plans`` (``keep_plan``); with ``record`` (a list) the launch appended to it as
    ``(kernel.fn, grid, args, kwargs with the tuned config's, compiled)`` for a ``Bound``. Under one
    lock: the autotuner keeps its last call's config in ``best_config`` (and, while it tunes, that
    call's arguments in ``nargs``), shared by every thread, so another thread's launch between them
    would hand the plan that call's config (its grid and split: the wrong tiles, or a split beyond
    the workspace)."""
    with _LAUNCH_LOCK:
        compiled = kernel[grid](*args, **kw)
        if key is not None:
            keep_plan(plans, key, compiled, kernel, grid, args, kw, **extra)
        if record is not None:
            record.append((kernel.fn, grid, args, {**kw, **kernel.best_config.all_kwargs()}, compiled))
    return compiled


def keep_plan(plans: dict, key: tuple, compiled, kernel, grid, args: tuple, kw: dict, **extra):
    """After ``compiled = kernel[grid](*args, **kw)`` (under ``launch``'s lock; ``kernel`` autotuned, its arguments
    ``LaunchPlan``'s layout, ``extra["most"]`` its largest split if it splits K): keep a plan of
    that launch for ``key``.
    Not inside a CUDA-graph capture. While plans are new (the first PLAN_CHECKS of a process) the
    plan is launched once more into a fresh output and must match bitwise, else plans turn off."""
    if torch.cuda.is_current_stream_capturing():
        return
    plan = LaunchPlan(compiled, kernel.fn, grid, args, {**kw, **kernel.best_config.all_kwargs()}, **extra)
    if checking("launch"):
        fresh = torch.empty_like(args[4])
        plan(args[0], fresh, *args[5 : 5 + plan.buffers])
        if not same_bits(args[4], fresh, "launch"):
            return
    keep(plans, key, plan)


def chunked_dequant_mm(x: torch.Tensor, n: int, rows: int, fill, plan: DequantPlan | None = None) -> torch.Tensor:
    """``x @ w_hat.T`` with w_hat [N, K] built ``rows`` rows at a time into one reused buffer
    by ``fill(n0, r, buf)`` (rows n0 .. n0 + r into buf[:r]); each chunk's GEMM writes its
    columns of y straight away (cuBLAS takes the row stride). A smaller temporary than
    all of w_hat, and 3-4% faster at M=2048 on H100 (bench/KERNEL_NOTES.md).

    With ``plan`` (a new ``DequantPlan``), ``fill`` returns its launch as ``(kernel, grid, args,
    kwargs, compiled)`` (``compiled = kernel[grid](*args, **kwargs)``, buf among the arguments),
    which the plan binds."""
    m, k = x.shape
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    rows = max(1, min(n, rows))
    buf = torch.empty(rows, k, device=x.device, dtype=x.dtype)
    if plan is not None:
        plan.rows = rows
    for n0 in range(0, n, rows):
        r = min(rows, n - n0)
        launched = fill(n0, r, buf)
        if plan is not None:
            plan.add(launched, buf, n0, r)
        torch.mm(x, buf[:r].t(), out=y[:, n0 : n0 + r])
    return y


class Bound:
    """A compiled Triton kernel's launch (``launched``: ``(jit_fn, grid, args, kwargs, compiled)``,
    with ``compiled = jit_fn[grid](*args, **kwargs)``; for an autotuned kernel its ``fn`` and the tuned
    config in kwargs) with its arguments bound once, as ``LaunchPlan`` binds a GEMM's, except those
    at positions ``live`` of the signature, which each call passes: ``bound(*live_values, stream=)``.
    Bound tensors become the addresses they had (the caller's plan key must pin them); the live
    ones are passed as addresses (Triton's launcher takes an int as a pointer as it is)."""

    __slots__ = ("go", "vals", "live")

    def __init__(self, launched, live: tuple = ()):
        jit_fn, grid, args, kwargs, compiled = launched
        params = jit_fn.signature.parameters
        bound = jit_fn.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in params})
        bound.apply_defaults()
        g = tuple(grid(bound.arguments) if callable(grid) else grid)
        self.go = compiled[(g + (1, 1))[:3]]
        self.vals = [v.data_ptr() if isinstance(v, torch.Tensor) else v for v in bound.arguments.values()]
        self.live = live

    def __call__(self, *live, stream: int) -> None:
        vals = self.vals.copy()
        for i, v in zip(self.live, live):
            vals[i] = v
        self.go(*vals, stream=stream)


def same_bits(want: torch.Tensor, got: torch.Tensor, kind: str | None = None) -> bool:
    """A new plan's check: ``got`` (its launch) is ``want`` (Triton's) bitwise, NaNs included (then,
    with ``kind``, one more plan of that kind checked); else plans turn off with a warning (an
    argument-binding error shows here)."""
    global PLANS
    if torch.equal(want.view(torch.uint8), got.view(torch.uint8)):
        if kind is not None:
            _plan_checks[kind] += 1
        return True
    PLANS = False
    import warnings

    warnings.warn("lowbit: a direct Triton launch did not match Triton's own; launch plans are off", stacklevel=3)
    return False


class DequantPlan:
    """The eager dequantize path (``chunked_dequant_mm``) with each chunk's dequantize launch bound
    once (``Bound``, the chunk buffer live): Triton's launch path costs ~20-30 us of host time per
    launch (its argument binding and specialization key), and a 2048-token prompt runs ~12 chunks
    per Llama-3-8B layer, where the eager forward is close to host-bound (bench/KERNEL_NOTES.md,
    session 29). The weights are bound as the addresses they had at plan time (the plan's key pins
    them); ``run(x, cols, _)`` makes the output and the chunk buffer and, per chunk, launches the
    bound dequantize on the current stream and runs the chunk's ``torch.mm`` (not bound: it reads
    the matmul settings of the call). Made outside CUDA-graph captures; while plans are new (the
    first PLAN_CHECKS) each chunk's bound launch is checked bitwise against Triton's, and a
    mismatch turns plans off (``ok`` false)."""

    __slots__ = ("rows", "chunks", "ok", "check")

    def __init__(self):
        self.rows, self.chunks, self.ok, self.check = 0, [], True, checking("dequant")  # (rows: chunked_dequant_mm)

    def add(self, launched, buf: torch.Tensor, n0: int, r: int) -> None:
        """Bind one chunk's launch (``fill``'s return, buf among its arguments)."""
        go = Bound(launched, (next(i for i, v in enumerate(launched[2]) if v is buf),))  # (buf: positional)
        if self.ok and self.check:  # (every chunk of a checked plan; it counts once, when kept)
            fresh = torch.empty_like(buf)
            go(fresh.data_ptr(), stream=current_raw_stream(buf.get_device()))
            if not same_bits(buf[:r], fresh[:r]):
                self.ok = False
                return
        self.chunks.append((go, n0, r))

    def run(self, x: torch.Tensor, cols: int, _ws_cols: int = 0) -> torch.Tensor:
        m, k = x.shape
        y = x.new_empty((m, cols))
        buf = x.new_empty((self.rows, k))
        bt, b = buf.t(), buf.data_ptr()
        stream = current_raw_stream(x.get_device())
        for go, n0, r in self.chunks:
            go(b, stream=stream)
            torch.mm(x, bt if r == self.rows else bt[:, :r], out=y[:, n0 : n0 + r])
        return y


def dequant_key(x: torch.Tensor, weights: tuple, *switches) -> tuple:
    """A dequantize path's plan key (``DequantPlan``: its chunk launches do not depend on M): x's K,
    dtype and device, each weight tensor's address and layout, the launcher's switches, and
    ``MAX_ELEMENTS`` (the launcher's weight-size refusal, which a lane skips)."""
    ws = [(t.data_ptr(), t.shape, t.stride(), t.dtype) for t in weights]
    return ("dequant", x.shape[1], x.dtype, x.device, *ws, *switches, MAX_ELEMENTS)


def dequant_lane(plans: dict, x: torch.Tensor, n: int, key: tuple) -> torch.Tensor | None:
    """A lane's dequantize-path call through the plan kept for ``key``, or None: only for a
    contiguous x (the plan's matmuls read x as it is; the body's is contiguous) that the launcher
    runs whole (it would split one past MAX_ELEMENTS into row blocks)."""
    if x.is_contiguous() and x.shape[0] <= MAX_ELEMENTS // max(x.shape[1], n, 1):
        plan = plans.get(key)
        if plan is not None:
            return plan.run(x, n, n)
    return None


def planned_dequant_mm(plans: dict, key: tuple | None, x: torch.Tensor, n: int, rows: int, fill) -> torch.Tensor:
    """``chunked_dequant_mm`` through the ``DequantPlan`` kept for ``key`` (a keyword call: the lane
    did not look), else Triton's launches, recorded and kept as a plan for ``key`` (None: no plan;
    nor inside a CUDA-graph capture)."""
    kept = plans.get(key) if key is not None else None
    if kept is not None:
        return kept.run(x, n, n)
    plan = None
    if key is not None and PLANS and x.is_cuda and not torch.cuda.is_current_stream_capturing():
        plan = DequantPlan()
    y = chunked_dequant_mm(x, n, rows, fill, plan)
    if plan is not None and plan.ok and PLANS:  # (every chunk bound)
        if plan.check:
            _plan_checks["dequant"] += 1
        keep(plans, key, plan)
    return y
