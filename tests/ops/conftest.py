"""Fixtures shared by the launch-plan tests (test_launch_paths.py, test_launch_plans_dequant_w8a8.py)."""

import pytest

from lowbit.ops.triton import _int4_gemv, _utils
from lowbit.ops.triton import int4 as int4_mod


@pytest.fixture
def fresh_plans(monkeypatch):
    """Plans on, the int4 launchers' plan caches empty and every kind's checks to come; the int4
    GEMM's / dequantize path's cache."""
    monkeypatch.setattr(_int4_gemv, "_GLU_PLANS", {})
    monkeypatch.setattr(int4_mod, "_PLANS", {})
    monkeypatch.setattr(_utils, "_plan_checks", dict.fromkeys(_utils._plan_checks, 0))
    monkeypatch.setattr(_utils, "PLANS", True)
    return int4_mod._PLANS
