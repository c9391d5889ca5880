"""deepcopy, device moves, state_dict round trips and weights_only loads keep outputs bit-identical."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lowbit

CONFIGS = {
    "int4": lowbit.int4_weight_only(group_size=32),
    "int8": lowbit.int8_weight_only(),
    "w8a8": lowbit.int8_dynamic_activation_int8_weight(),
    "fp8": lowbit.float8_dynamic_activation_float8_weight(),
}


def make_model(name, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).to(torch.bfloat16)
    return lowbit.quantize_(m, CONFIGS[name])


X = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)


def run(m):
    with torch.no_grad():
        return m(X)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_deepcopy_clone_and_to_cpu_are_bit_identical(name):
    m = make_model(name)
    want = run(m)
    assert torch.equal(run(copy.deepcopy(m)), want)
    assert torch.equal(run(m.to("cpu")), want)
    w = m[0].weight
    for other in (w.clone(), w.detach(), w.to("cpu"), copy.deepcopy(w)):
        assert type(other) is type(w)
        assert torch.equal(other.dequantize(), w.dequantize())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_into_quantized_model(name, tmp_path):
    m = make_model(name, seed=0)
    other = make_model(name, seed=1)
    assert not torch.equal(run(other), run(m))
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    sd = torch.load(tmp_path / "sd.pt", weights_only=True)
    other.load_state_dict(sd)
    assert torch.equal(run(other), run(m))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_state_dict_assign_into_meta_model(name):
    m = make_model(name)
    with torch.device("meta"):
        empty = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).to(torch.bfloat16)
    empty.load_state_dict(m.state_dict(), assign=True)
    assert type(empty[0].weight) is type(m[0].weight)
    assert torch.equal(run(empty), run(m))


def test_weights_only_load_in_fresh_process(tmp_path):
    outputs = {}
    for name in CONFIGS:
        m = make_model(name)
        torch.save({"sd": m.state_dict(), "x": X}, tmp_path / f"{name}.pt")
        outputs[name] = run(m)
    script = textwrap.dedent(
        f"""
        import torch, lowbit
        from torch import nn
        for name in {list(CONFIGS)!r}:
            blob = torch.load(r"{tmp_path}/" + name + ".pt", weights_only=True)
            m = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).to(torch.bfloat16)
            lowbit.quantize_(m, {{"int4": lowbit.int4_weight_only(32), "int8": lowbit.int8_weight_only(),
                "w8a8": lowbit.int8_dynamic_activation_int8_weight(),
                "fp8": lowbit.float8_dynamic_activation_float8_weight()}}[name])
            m.load_state_dict(blob["sd"])
            with torch.no_grad():
                torch.save(m(blob["x"]), r"{tmp_path}/" + name + ".out")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    for name, want in outputs.items():
        assert torch.equal(torch.load(tmp_path / f"{name}.out", weights_only=True), want), name


def test_weights_only_load_refuses_without_lowbit_registration(tmp_path):
    """The allowlist is what makes weights_only loading work: a plain process refuses."""
    m = make_model("int8")
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    script = f"import torch; torch.load(r'{tmp_path}/sd.pt', weights_only=True)"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "weights_only" in proc.stderr.lower() + proc.stdout.lower()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dtype_casts_are_errors(name):
    w = make_model(name)[0].weight
    for cast in (lambda t: t.to(torch.float16), lambda t: t.half(), lambda t: t.float()):
        with pytest.raises(TypeError, match="dequantize"):
            cast(w)
    # same dtype is fine
    assert type(w.to(torch.bfloat16)) is type(w)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_slicing_rows_matches_dequantized_rows(name):
    w = make_model(name)[0].weight
    full = w.dequantize()
    for start, end in ((0, 16), (16, 96), (5, 37)):
        part = w[start:end]
        assert part.shape == (end - start, 64)
        assert torch.equal(part.dequantize(), full[start:end])
    a, b = w.split([32, 64])
    assert torch.equal(torch.cat([a.dequantize(), b.dequantize()]), full)
    assert torch.equal(w.narrow(0, 8, 16).dequantize(), full[8:24])


def test_unsupported_op_names_op_and_class():
    w = make_model("int4")[0].weight
    with pytest.raises(NotImplementedError, match=r"Int4Tensor.*aten\.(mul|add)"):
        w * 2


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_precision_state_dict_into_quantized_model_quantizes_it(name):
    torch.manual_seed(3)
    fp = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).to(torch.bfloat16)
    want = lowbit.quantize_(__import__("copy").deepcopy(fp), CONFIGS[name])
    target = make_model(name, seed=4)
    target.load_state_dict(fp.state_dict())
    assert torch.equal(run(target), run(want))
