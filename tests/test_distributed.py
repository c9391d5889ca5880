"""FSDP2 over lowbit weights: sharding ops, all-gather hooks, and 2-process runs.

The 2-process run (gloo on CPU; NCCL when 2 GPUs are present) starts once per
backend and runs every scenario; the tests below read its results. Starting
two Python processes costs ~10 s, more than all the scenarios together.
"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lowbit
from lowbit.distributed import checkpoint_state_dict, load_checkpoint_state_dict
from lowbit.qtensor import Float8Tensor, Int4Tensor, Int8DynActTensor, Int8Tensor

WORLD = 2
CONFIGS = {
    "int4": lambda: lowbit.int4_weight_only(group_size=32),
    "int8": lowbit.int8_weight_only,
    "w8a8": lowbit.int8_dynamic_activation_int8_weight,
    "fp8": lowbit.float8_dynamic_activation_float8_weight,
}
# N = 33 over 2 ranks: padded shards of 17 rows, the second holds 16 (a full
# CPU int4 block, the case where a repacking slice would lose the shard).
INFER_DIMS = (64, 96, 64, 33)
LORA_DIMS = (64, 96, 64, 9)
RANK = 4


# ---------------------------------------------------------------------------- single process
def _quantized(cls, n=33, k=64):
    w = torch.randn(n, k)
    return Int4Tensor.from_float(w, group_size=32) if cls is Int4Tensor else cls.from_float(w)


@pytest.mark.parametrize("cls", [Int4Tensor, Int8Tensor, Int8DynActTensor, Float8Tensor])
def test_fsdp_sharding_ops(cls):
    """What fully_shard does to a parameter, replayed: chunk, new_zeros, narrow().copy_(), view(-1)."""
    q = _quantized(cls)
    chunks = torch.chunk(q, WORLD, dim=0)
    for chunk in chunks:
        padded = q.new_zeros((17, 64))
        assert getattr(padded, "packing", "plain") == "plain"
        padded.narrow(0, 0, chunk.shape[0]).copy_(chunk)
        shard = padded.narrow(0, 0, chunk.shape[0])
        torch.testing.assert_close(shard.dequantize(), chunk.dequantize(), rtol=0, atol=0)
        assert padded.view(-1).shape == (17 * 64,)
        assert (padded.dequantize()[chunk.shape[0] :] == 0).all()


@pytest.mark.parametrize("n", [64, 48])
def test_fsdp_sharding_ops_on_a_tiled_int4_weight(n):
    """The same replay for an int4 weight in the "tiled" packing (the CUDA default for whole
    16 x 128 tiles): chunks of whole tile rows (64 rows) are views, others (48 rows: 24 each)
    copies; either way the plain shards hold exactly the chunk's values."""
    q = Int4Tensor.from_float(torch.randn(n, 256), group_size=64, packing="tiled")
    rows = -(-n // WORLD)
    for chunk in torch.chunk(q, WORLD, dim=0):
        padded = q.new_zeros((rows, 256))
        assert padded.packing == "plain"
        padded.narrow(0, 0, chunk.shape[0]).copy_(chunk)
        torch.testing.assert_close(padded.dequantize()[: chunk.shape[0]], chunk.dequantize(), rtol=0, atol=0)
    assert torch.equal(torch.cat([c.dequantize() for c in torch.chunk(q, WORLD, dim=0)]), q.dequantize())


class _Mesh:
    def __init__(self, world):
        self.world = world

    def size(self):
        return self.world


def _as_fsdp_copies(tensors):
    """What FSDP's copy-in/out does to all-gather inputs that share one float dtype.

    It copies them with ``_foreach_copy_`` in that dtype, which on CUDA goes
    through fp32: signalling-NaN bit patterns come back changed. Packed bytes
    must survive that, so apply it here (on CPU the copy is bit-exact).
    """
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1 and tensors[0].is_floating_point():
        return [t.float().to(t.dtype) for t in tensors]
    return tensors


def _all_gather(q):
    """pre_all_gather on each shard of ``q``, concatenated as the collective would: (shard 0, inputs, meta)."""
    n = q.shape[0]
    padded = -(-n // WORLD)
    shards = list(torch.chunk(q, WORLD, dim=0))
    while len(shards) < WORLD:  # FSDP's empty shard: an empty tensor, the padded shard narrowed to 0 rows
        assert q.new_empty(0).numel() == 0
        shards.append(q.new_zeros((padded, q.shape[1])).narrow(0, 0, 0))
    inputs, meta = [], None
    for shard in shards:
        ins, meta = shard.fsdp_pre_all_gather(_Mesh(WORLD), q.shape, (q.shape[1], 1), nn.Linear(1, 1), None)
        if shard.shape[0] != padded:  # FSDP's rule for a padded shard
            assert all(t.shape == (padded, q.shape[1]) for t in ins)
        inputs.append(ins)
    return shards[0], inputs, meta


def _gathered(inputs):
    return _as_fsdp_copies([torch.cat(parts) for parts in zip(*inputs)])


def _assert_own_storage(tensors):
    """Each tensor alone in a storage of exactly its size: what FSDP's free/alloc_storage assume."""
    ptrs = [t.untyped_storage().data_ptr() for t in tensors]
    assert len(set(ptrs)) == len(ptrs), "fields share a storage"
    for t in tensors:
        assert t.storage_offset() == 0
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _free_and_realloc(tensors):
    """FSDP between all-gathers: ``free_storage`` then ``alloc_storage`` on each tensor, in turn."""
    for t in tensors:
        t.untyped_storage().resize_(0)
    for t in tensors:
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t.untyped_storage().resize_(t.numel() * t.element_size())


QUANTIZED = [Int4Tensor, Int8Tensor, Int8DynActTensor, Float8Tensor]


@pytest.mark.parametrize("cls", QUANTIZED)
@pytest.mark.parametrize("n", [1, 32, 33])
def test_all_gather_hooks_round_trip(cls, n):
    """pre_all_gather on each shard, concatenate as the collective would, post_all_gather: the same weight.

    Then FSDP's next iteration: it frees the all-gather outputs and the unsharded
    inner tensors, reallocates each storage to its own tensor's size, gathers
    into the same buffers and refills the weight with ``post_all_gather(out=)``.
    With N = 1 the unpacked fields once were views into one shared buffer, which
    that reallocation shrank under them (heap corruption on the next refill).
    """
    q = _quantized(cls, n=n)
    shard, inputs, meta = _all_gather(q)
    if n % WORLD == 0:
        assert sum(t.numel() * t.element_size() for ins in inputs for t in ins) == q.nbytes_packed
    gathered = _gathered(inputs)
    full, inner = shard.fsdp_post_all_gather(gathered, meta, q.dtype)
    full = torch.as_strided(full, q.shape, (q.shape[1], 1), 0)
    torch.testing.assert_close(full.dequantize(), q.dequantize(), rtol=0, atol=0)
    _assert_own_storage(inner)  # before the reallocation below: on failure, fail here rather than corrupt memory
    _free_and_realloc([*gathered, *inner])
    _assert_own_storage(inner)
    for t in full._tensors():
        t.zero_()
    for t, fresh in zip(gathered, _gathered(inputs)):
        t.copy_(fresh)
    assert shard.fsdp_post_all_gather(gathered, meta, q.dtype, out=full) is None
    torch.testing.assert_close(full.dequantize(), q.dequantize(), rtol=0, atol=0)
    _assert_own_storage(inner)


@pytest.mark.parametrize("cls", QUANTIZED)
@pytest.mark.parametrize("n", [1, 32, 33])
def test_all_gather_refill_keeps_version_counters(cls, n):
    """``post_all_gather(out=)`` refills the weight without bumping its fields' version counters.

    A compiled backward (FSDP2 + torch.compile, N not divisible by the world
    size) saves the fields; a bumped version failed it with "modified by an
    inplace operation". FSDP keeps the versions of its own all-gather copy-out.
    """
    q = _quantized(cls, n=n)
    shard, inputs, meta = _all_gather(q)
    gathered = _gathered(inputs)
    full, _ = shard.fsdp_post_all_gather(gathered, meta, q.dtype)
    full = torch.as_strided(full, q.shape, (q.shape[1], 1), 0)
    for t, fresh in zip(gathered, _gathered(inputs)):
        t.copy_(fresh)
    before = [t._version for t in full._tensors()]
    assert shard.fsdp_post_all_gather(gathered, meta, q.dtype, out=full) is None
    assert [t._version for t in full._tensors()] == before
    torch.testing.assert_close(full.dequantize(), q.dequantize(), rtol=0, atol=0)


# ---------------------------------------------------------------------------- 2 processes
class LoRALinear(nn.Module):
    """A frozen (quantized) base plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t()


def _model(dims, config, seed, device, lora=False):
    torch.manual_seed(seed)
    layers = []
    for k, n in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(k, n, bias=False), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).to(device)
    lowbit.quantize_(model, config)
    if lora:
        for p in model.parameters():
            p.requires_grad_(False)
        for i, mod in enumerate(model):
            if isinstance(mod, nn.Linear):
                model[i] = LoRALinear(mod, RANK).to(device)
    return model


def _shard(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # name the mesh's device: on a CUDA host FSDP2 would otherwise place gloo shards on the GPU
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for mod in model:
        if isinstance(mod, (nn.Linear, LoRALinear)):
            fully_shard(mod, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class _CountAllGather:
    """Bytes of every all-gather output, counted at the c10d call FSDP makes."""

    names = ("all_gather_single", "all_gather_into_tensor")

    def __enter__(self):
        self.sizes, self.saved = [], {}
        for name in self.names:
            if hasattr(dist, name):
                self.saved[name] = fn = getattr(dist, name)
                setattr(dist, name, self._wrap(fn))
        return self

    def _wrap(self, fn):
        def counted(output_tensor, input_tensor, *args, **kwargs):
            self.sizes.append(output_tensor.numel() * output_tensor.element_size())
            return fn(output_tensor, input_tensor, *args, **kwargs)

        return counted

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _expected_bytes(weight) -> int:
    n, k = weight.shape
    if n % WORLD == 0:
        return weight.nbytes_packed
    row = weight.nbytes_packed // n
    carriers = -(-row // k)  # uint8 [P, K] tensors per shard
    return WORLD * -(-n // WORLD) * k * carriers


def _infer(name, device, exact):
    rank = dist.get_rank()
    config = CONFIGS[name]()
    model = _model(INFER_DIMS, config, 0, device)
    packed = [m.weight.nbytes_packed for m in model if isinstance(m, nn.Linear)]
    expected = [_expected_bytes(m.weight) for m in model if isinstance(m, nn.Linear)]
    whole = [(type(m.weight).__name__, m.weight.dequantize()) for m in model if isinstance(m, nn.Linear)]
    torch.manual_seed(1)
    x = torch.randn(WORLD, 5, INFER_DIMS[0], device=device)
    backend = "reference" if exact else "auto"
    with torch.no_grad(), lowbit.use_backend(backend):
        ref = model(x[rank])
    _shard(model)
    with torch.no_grad(), lowbit.use_backend(backend), _CountAllGather() as counter:
        out = model(x[rank])
    # DTensor.full_tensor() of each sharded weight (N = 96, 64: even shards; 33: padded ones)
    full = [m.weight.full_tensor() for m in model if isinstance(m, nn.Linear)]
    return {
        "full_tensor": [
            (type(f).__name__ == cls, tuple(f.shape) == tuple(w.shape), torch.equal(f.dequantize(), w))
            for f, (cls, w) in zip(full, whole)
        ],
        "max_err": (out - ref).abs().max().item(),
        "ref_norm": ref.abs().max().item(),
        "gathered": counter.sizes,
        "expected": expected,
        "packed": packed,
        "bf16": [n * k * 2 for k, n in zip(INFER_DIMS[:-1], INFER_DIMS[1:])],
    }


def _batches(steps, world, device):
    """The same batch every step, so the loss must fall; 4 rows per rank."""
    torch.manual_seed(2)
    x = torch.randn(4 * world, LORA_DIMS[0], device=device)
    y = torch.randn(4 * world, LORA_DIMS[-1], device=device)
    return x.expand(steps, *x.shape), y.expand(steps, *y.shape)


def _lora_steps(model, xs, ys, steps, local: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(steps):
        loss = nn.functional.mse_loss(model(xs[step]), ys[step])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if local:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(loss.item())
    return losses


def _lora_and_checkpoint(device, ckpt_dir):
    rank, world, steps = dist.get_rank(), dist.get_world_size(), 3
    config = CONFIGS["int4"]()
    xs, ys = _batches(steps, world, device)
    mine = slice(4 * rank, 4 * rank + 4)
    with lowbit.use_backend("reference"):
        ref_losses = _lora_steps(_model(LORA_DIMS, config, 0, device, lora=True), xs, ys, steps, local=False)
        model = _shard(_model(LORA_DIMS, config, 0, device, lora=True))
        losses = _lora_steps(model, xs[:, mine], ys[:, mine], steps, local=True)

        # save sharded, load into differently initialised models: sharded, and unsharded (resharding 2 -> 1)
        import torch.distributed.checkpoint as dcp

        probe = xs[0, mine]
        with torch.no_grad():
            want = model(probe)
        dcp.save(checkpoint_state_dict(model), checkpoint_id=ckpt_dir)
        other = _shard(_model(LORA_DIMS, config, 1, device, lora=True))
        with torch.no_grad():
            before = (other(probe) - want).abs().max().item()
        dcp.load(checkpoint_state_dict(other), checkpoint_id=ckpt_dir)
        single = _model(LORA_DIMS, config, 3, device, lora=True)
        state = checkpoint_state_dict(single)
        dcp.load(state, checkpoint_id=ckpt_dir)
        load_checkpoint_state_dict(single, state)
        with torch.no_grad():
            sharded_err = (other(probe) - want).abs().max().item()
            single_err = (single(probe) - want).abs().max().item()
    return {
        "ref_losses": ref_losses,
        "losses": losses,
        "before_load": before,
        "sharded_load_err": sharded_err,
        "single_load_err": single_err,
    }


def _qat(device):
    """QAT-prepared layers hold plain trainable weights: FSDP shards them as usual."""
    rank, world, steps = dist.get_rank(), dist.get_world_size(), 3
    prepare = lowbit.QATConfig(CONFIGS["int4"](), step="prepare")
    xs, ys = _batches(steps, world, device)
    mine = slice(4 * rank, 4 * rank + 4)

    def model():
        torch.manual_seed(0)
        dims = LORA_DIMS
        layers = [m for k, n in zip(dims[:-1], dims[1:]) for m in (nn.Linear(k, n, bias=False), nn.ReLU())]
        return lowbit.quantize_(nn.Sequential(*layers[:-1]).to(device), prepare)

    ref_losses = _lora_steps(model(), xs, ys, steps, local=False)
    losses = _lora_steps(_shard(model()), xs[:, mine], ys[:, mine], steps, local=True)
    return {"ref_losses": ref_losses, "losses": losses}


def _worker(rank, world, port, backend, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    from datetime import timedelta

    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        exact = backend == "gloo"
        names = [n for n in CONFIGS if n != "fp8" or backend == "gloo" or torch.cuda.get_device_capability() >= (8, 9)]
        results = {f"infer_{n}": _infer(n, device, exact) for n in names}
        results["lora"] = _lora_and_checkpoint(device, os.path.join(out_dir, "ckpt"))
        if hasattr(lowbit, "QATConfig"):
            results["qat"] = _qat(device)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(backend):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(WORLD, _free_port(), backend, out_dir), nprocs=WORLD)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


def _two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()


BACKENDS = [
    pytest.param("gloo", marks=pytest.mark.skipif(not dist.is_gloo_available(), reason="needs gloo")),
    pytest.param("nccl", marks=pytest.mark.skipif(not _two_gpus(), reason="needs 2 CUDA GPUs and NCCL")),
]


@pytest.fixture(scope="module", params=BACKENDS)
def fsdp_run(request):
    return request.param, _run(request.param)


def _loss_rtol(backend):
    # full batch on one process vs half batches with averaged gradients: fp32 summation order only
    return 1e-4 if backend == "gloo" else 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fsdp_full_tensor_gathers_the_quantized_weight(fsdp_run, name):
    """``DTensor.full_tensor()`` of a sharded weight is the whole quantized weight, its packed
    fields gathered (even and padded shards); it raised on the collective / the padding op."""
    backend, ranks = fsdp_run
    for res in ranks:
        if f"infer_{name}" not in res:
            pytest.skip(f"{name} needs a newer GPU")
        assert res[f"infer_{name}"]["full_tensor"] == [(True, True, True)] * 3


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fsdp_forward_matches_single_process(fsdp_run, name):
    backend, ranks = fsdp_run
    for res in ranks:
        if f"infer_{name}" not in res:
            pytest.skip(f"{name} needs a newer GPU")
        r = res[f"infer_{name}"]
        if backend == "gloo":  # same kernels on the same CPU: bit-identical
            assert r["max_err"] == 0, r
        else:
            assert r["max_err"] <= 1e-2 * r["ref_norm"] + 1e-3, r


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fsdp_all_gathers_packed_bytes(fsdp_run, name):
    _, ranks = fsdp_run
    for res in ranks:
        if f"infer_{name}" not in res:
            pytest.skip(f"{name} needs a newer GPU")
        r = res[f"infer_{name}"]
        # one all-gather per fully_shard-ed layer, in forward order
        assert r["gathered"] == r["expected"], r
        # the evenly sharded layers move exactly the packed bytes, well under bf16
        for got, packed, bf16 in zip(r["gathered"][:-1], r["packed"], r["bf16"]):
            assert got == packed < bf16
        # N = 33: one row of bytes per padded row; never more than bf16 would gather (34 rows)
        n = INFER_DIMS[-1]
        assert r["gathered"][-1] <= r["bf16"][-1] // n * WORLD * -(-n // WORLD)
        if name == "int4":
            assert r["gathered"][-1] * 1.9 < r["bf16"][-1]


@pytest.mark.slow
def test_fsdp_lora_training_matches_single_process(fsdp_run):
    backend, ranks = fsdp_run
    for res in ranks:
        r = res["lora"]
        torch.testing.assert_close(r["losses"], r["ref_losses"], rtol=_loss_rtol(backend), atol=1e-6)
        assert r["losses"][2] < r["losses"][1] < r["losses"][0]


@pytest.mark.slow
def test_fsdp_qat_training_matches_single_process(fsdp_run):
    backend, ranks = fsdp_run
    for res in ranks:
        if "qat" not in res:
            pytest.skip("lowbit.QATConfig is not available")
        r = res["qat"]
        torch.testing.assert_close(r["losses"], r["ref_losses"], rtol=_loss_rtol(backend), atol=1e-6)
        assert r["losses"][2] < r["losses"][1] < r["losses"][0]


@pytest.mark.slow
def test_fsdp_distributed_checkpoint_round_trip(fsdp_run):
    _, ranks = fsdp_run
    for res in ranks:
        r = res["lora"]
        assert r["before_load"] > 1e-3  # the fresh model really differs
        assert r["sharded_load_err"] == 0
        assert r["single_load_err"] <= 1e-5
