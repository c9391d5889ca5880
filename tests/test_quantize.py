"""quantize_: selection, the report, bad input, and a differential check against torchao."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.ops import reference as ref


def mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 10))


def test_quantizes_every_linear_and_records_it():
    m = mlp()
    out = lowbit.quantize_(m, lowbit.int8_weight_only())
    assert out is m
    assert m.lowbit_report.quantized == ["0", "2", "3"]
    assert m.lowbit_report.skipped == {}
    for i in (0, 2, 3):
        assert isinstance(m[i].weight, lowbit.Int8Tensor)
        assert isinstance(m[i].weight, nn.Parameter) and not m[i].weight.requires_grad
        assert not isinstance(m[i].bias, lowbit.QTensor)


def test_filter_fn_selects_layers():
    m = mlp()
    lowbit.quantize_(
        m, lowbit.int4_weight_only(32), filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and fqn != "3"
    )
    assert isinstance(m[0].weight, lowbit.Int4Tensor) and not isinstance(m[3].weight, lowbit.QTensor)
    assert m.lowbit_report.quantized == ["0", "2"]


def test_group_size_not_dividing_k_is_a_logged_listed_skip(caplog):
    m = nn.Sequential(nn.Linear(96, 32), nn.Linear(32, 8))
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        lowbit.quantize_(m, lowbit.int4_weight_only(group_size=64))
    assert m.lowbit_report.quantized == []
    assert "in_features=96" in m.lowbit_report.skipped["0"] and "group_size=64" in m.lowbit_report.skipped["0"]
    assert "1" in m.lowbit_report.skipped
    assert "skipped 0" in caplog.text and "group_size=64" in caplog.text
    assert type(m[0].weight) is nn.Parameter


def test_bad_group_size_in_from_float():
    with pytest.raises(ValueError, match="group_size must be one of"):
        lowbit.Int4Tensor.from_float(torch.randn(8, 96), group_size=48)
    with pytest.raises(ValueError, match="does not divide"):
        lowbit.Int4Tensor.from_float(torch.randn(8, 96), group_size=64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weight_names_layer_and_count(bad):
    m = nn.Sequential(nn.Linear(64, 32), nn.Sequential(nn.Linear(32, 16)))
    with torch.no_grad():
        m[1][0].weight[3, 4] = bad
        m[1][0].weight[5, 6] = bad
    with pytest.raises(ValueError, match=r"'1\.0'.*2 NaN/Inf"):
        lowbit.quantize_(m, lowbit.int8_weight_only())


def test_unknown_config_is_a_type_error():
    with pytest.raises(TypeError, match="unknown config"):
        lowbit.quantize_(mlp(), {"scheme": "int4"})


def test_already_quantized_layers_are_skipped_with_reason():
    m = lowbit.quantize_(mlp(), lowbit.int8_weight_only())
    lowbit.quantize_(m, lowbit.int4_weight_only(32))
    assert "already quantized" in m.lowbit_report.skipped["0"]


def test_progress_bar_for_many_layers(capsys):
    m = nn.Sequential(*[nn.Linear(32, 32) for _ in range(70)])
    lowbit.quantize_(m, lowbit.int8_weight_only())
    assert "lowbit quantize" in capsys.readouterr().err
    assert len(m.lowbit_report.quantized) == 70


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown lowbit backend 'fast'"):
        with lowbit.use_backend("fast"):
            pass


def test_int8_weight_only_agrees_with_torchao():
    """An independent implementation of the same scheme: torchao's int8 weight-only on CPU.

    torchao picks a slightly different scale (it spreads amax over 127.5 steps), so codes
    may differ by one step; everything else must agree.
    """
    torchao_q = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    w = torch.randn(192, 256) * 0.02
    x = torch.randn(7, 256)
    theirs = nn.Linear(256, 192, bias=False)
    with torch.no_grad():
        theirs.weight.copy_(w)
    torchao_q.quantize_(theirs, torchao_q.Int8WeightOnlyConfig())
    ours = lowbit.Int8Tensor.from_float(w)
    t = theirs.weight
    assert (t.qdata.int() - ours.qdata.int()).abs().max() <= 1
    assert torch.allclose(t.scale.flatten().float(), ours.scale.float(), rtol=1e-2)
    ref_out = F.linear(x, w)
    with torch.no_grad():
        a, b = F.linear(x, ours), theirs(x)
    assert ref.sqnr(b, a) > 38
    assert abs(ref.sqnr(ref_out, a) - ref.sqnr(ref_out, b)) < 1.5
