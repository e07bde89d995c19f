"""quant/math.py: round trips within the stated error bound (hypothesis), packing, bad inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openautoglm.quant.math import (
    dequantize,
    error_bound,
    pack_int4,
    quantize,
    quantize_per_token,
    to_fp8,
    unpack_int4,
)

SLACK = 1e-5  # float32 rounding of the scale arithmetic


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.sampled_from([4, 8]),
    symmetric=st.booleans(),
    gran=st.sampled_from(["tensor", "channel", "group", "token"]),
    group=st.sampled_from([32, 64, 128]),
    rows=st.integers(1, 6),
    groups=st.integers(1, 3),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-10, 10),
    zero_point=st.sampled_from(["float", "int"]),
)
def test_error_never_exceeds_bound(seed, bits, symmetric, gran, group, rows, groups, scale, offset, zero_point):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, group * groups, generator=g) * scale + offset
    kw = dict(symmetric=symmetric, granularity=gran, group_size=group if gran == "group" else None,
              zero_point=zero_point)
    qt = quantize(x, bits, **kw)
    err = (dequantize(qt) - x).abs()
    bound = error_bound(x, bits, **kw)
    assert bound.shape == x.shape
    assert bool((err <= bound * (1 + SLACK) + 1e-6 * x.abs().max()).all())


def test_bound_is_half_a_step():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert torch.allclose(error_bound(x, 8, symmetric=False), torch.full_like(x, 3.0 / 255 / 2))
    assert torch.allclose(error_bound(x, 4, symmetric=True), torch.full_like(x, 3.0 / 7 / 2))


@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False)])
def test_round_trip_and_dtypes(bits, symmetric):
    x = torch.randn(16, 256)
    qt = quantize(x, bits, symmetric=symmetric, granularity="group", group_size=64)
    assert qt.q.dtype == (torch.int8 if symmetric else torch.uint8)
    assert qt.scale.shape == (16, 4)
    rel = (dequantize(qt) - x).norm() / x.norm()
    assert rel < (0.01 if bits == 8 else 0.15)


def test_integer_zero_point():
    x = torch.randn(8, 128) + 0.3
    qt = quantize(x, 4, symmetric=False, granularity="group", group_size=32, zero_point="int")
    assert qt.zero.dtype == torch.uint8 and int(qt.zero.max()) <= 15
    assert ((dequantize(qt) - x).abs() <= error_bound(x, 4, symmetric=False, granularity="group", group_size=32,
                                                       zero_point="int") * 1.00001).all()
    with pytest.raises(ValueError, match="zero_point"):
        quantize(x, 4, symmetric=False, zero_point="half")


def test_constant_and_zero_tensors_are_exact():
    for x in (torch.zeros(3, 64), torch.full((3, 64), 2.5)):
        for sym in (True, False):
            qt = quantize(x, 4, symmetric=sym, granularity="group", group_size=32)
            assert torch.allclose(dequantize(qt), x, atol=1e-6)


def test_per_token_activations():
    x = torch.randn(2, 5, 128) * torch.linspace(0.1, 10, 5).view(1, 5, 1)
    q, s = quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (2, 5, 1)
    assert ((q.float() * s - x).abs() <= s / 2 + 1e-6).all()


def test_int4_packing_round_trip_and_order():
    q = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    p = pack_int4(q)
    assert p.shape == (7, 32) and p.dtype == torch.uint8
    assert int(p[0, 0]) == int(q[0, 0]) * 16 + int(q[0, 1])  # even element in the high nibble
    assert torch.equal(unpack_int4(p), q)


def test_fp8_rows():
    x = torch.randn(4, 64) * 100
    q, s = to_fp8(x)
    assert q.dtype == torch.float8_e4m3fn
    assert ((q.float() * s - x).norm() / x.norm()) < 0.05


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3), "bits=3"),
    (dict(bits=8, granularity="group", group_size=48), "does not divide"),
    (dict(bits=8, granularity="rows"), "granularity"),
])
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(torch.randn(4, 64), **kwargs)


def test_nan_and_odd_packing_rejected():
    x = torch.randn(4, 64)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize(x)
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(TypeError):
        quantize(torch.ones(4, 4, dtype=torch.int32))
