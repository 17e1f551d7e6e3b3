"""The numerics contract's arithmetic (tools.contract, spec/numerics.md): the
per-op error as test-backend-ops computes it, and the end-to-end bands."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tools.contract import (KldResult, assert_op_within_contract, kld_verdict,
                            nmse, nmse_bound, op_error)

KLD_OUTPUT = """
====== Perplexity statistics ======
Mean PPL(Q)                   : 831.992133 ±  52.111540
Mean PPL(base)                : 831.988797 ±  52.111331
Mean ln(PPL(Q)/PPL(base))     :   0.000004 ±   0.000002
Mean PPL(Q)/PPL(base)         :   1.000004 ±   0.000002

====== KL divergence statistics ======
Mean    KLD:   0.000031 ±   0.000001
Maximum KLD:   0.000013
Same top p: 98.413 ± 0.913 %
"""


def test_nmse_is_test_backend_ops_formula():
    ref = np.array([1.0, -2.0, 3.0], np.float32)
    got = np.array([1.0, -2.0, 3.5], np.float32)
    assert nmse(ref, got) == pytest.approx(0.25 / 14)
    assert nmse(np.zeros(3), np.zeros(3)) == 0.0
    assert nmse(np.zeros(3), np.ones(3)) == math.inf


def test_nan_and_infinities_must_be_where_the_reference_has_them():
    ref = np.array([1.0, np.nan, np.inf, -np.inf, 2.0], np.float32)
    assert op_error(ref, ref.copy()) == (0.0, None)
    assert "NaN" in op_error(ref, np.array([1.0, 0.0, np.inf, -np.inf, 2.0]))[1]
    assert "infinity" in op_error(ref, np.array([1.0, np.nan, -np.inf, -np.inf, 2.0]))[1]
    assert "infinity" in op_error(ref, np.array([1.0, np.nan, 3e38, -np.inf, 2.0]))[1]
    # FLT_MAX counts as an infinity, as in test-backend-ops
    flt_max = np.finfo(np.float32).max
    assert op_error(np.array([np.inf]), np.array([flt_max]))[1] is None


def test_bounds_and_assertion():
    assert nmse_bound("MUL_MAT") == 5e-4 and nmse_bound("SOFT_MAX") == 1e-6
    assert nmse_bound("RMS_NORM") == 1e-7
    assert nmse_bound("CPY", same_type_copy=True) == 0.0 and nmse_bound("CPY") == 1e-7
    ref = np.linspace(-1, 1, 1000).astype(np.float32)
    assert_op_within_contract(ref * (1 + 1e-5), ref, "MUL_MAT")
    with pytest.raises(AssertionError, match="NMSE"):
        assert_op_within_contract(ref * (1 + 1e-3), ref, "SOFT_MAX")
    with pytest.raises(AssertionError, match="NMSE"):
        assert_op_within_contract(np.nextafter(ref, 2), ref, "CPY", same_type_copy=True)


def test_kld_output_is_parsed():
    r = KldResult.parse(KLD_OUTPUT)
    assert r == KldResult(mean_kld=0.000031, same_top=0.98413, ppl_ratio=1.000004,
                          log_ppl_unc=0.000002)
    assert KldResult.parse(KLD_OUTPUT.replace("0.000031", "-0.000000")).mean_kld == 0.0
    assert KldResult.parse(KLD_OUTPUT.replace("±   0.000002", "±       -nan")).log_ppl_unc == 0.0
    with pytest.raises(ValueError, match="same_top"):
        KldResult.parse(KLD_OUTPUT.replace("Same top p", "Same"))


def test_bands_follow_the_alternatives_and_floors():
    exact = KldResult(0.0, 1.0, 1.0)
    repack = KldResult(3e-4, 0.97, 0.998)
    # where llama.cpp's alternatives coincide with the native run, the floors hold
    assert kld_verdict(KldResult(9e-6, 0.975, 1.0009), {"a": exact, "b": exact}) == []
    bad = kld_verdict(KldResult(2e-5, 0.96, 1.002), {"a": exact, "b": exact})
    assert len(bad) == 3 and "mean KLD" in bad[0] and "same top" in bad[1] and "PPL" in bad[2]
    # elsewhere, twice the furthest alternative, and its same-top rate less two points
    assert kld_verdict(KldResult(5.9e-4, 0.951, 0.9961), {"a": exact, "b": repack}) == []
    bad = kld_verdict(KldResult(6.1e-4, 0.949, 0.995), {"a": exact, "b": repack})
    assert len(bad) == 3
    # a shift of ln PPL within four of its own standard errors is chance, beyond them a bias
    assert kld_verdict(KldResult(5e-4, 0.97, 0.9950, 1.3e-3), {"a": exact, "b": repack}) == []
    bad = kld_verdict(KldResult(5e-4, 0.97, 0.9930, 1.3e-3), {"a": exact, "b": repack})
    assert len(bad) == 1 and "PPL" in bad[0]
