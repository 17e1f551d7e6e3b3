"""The numerics contract of spec/numerics.md, as code the tests call.

Two halves:

* **Per op** (spec/numerics.md, "Per op"): a result is judged the way llama.cpp's
  ``test-backend-ops`` judges a backend against ggml's CPU backend: NaN and infinities where
  the reference has them, and the normalised mean squared error
  ``Σ(ref - got)² / Σ ref²`` at most the bound ``test-backend-ops`` gives that op
  (:data:`NMSE_BOUNDS`, read from ``tests/test-backend-ops.cpp`` of llama.cpp 0.3.36).
  :func:`op_error` measures, :func:`assert_op_within_contract` asserts.
* **End to end** (spec/numerics.md, "End to end"): ``llama-perplexity --kl-divergence``
  compares a run's logits with those the host's native llama.cpp CPU run saved.
  :class:`KldResult` holds what it prints; :func:`kld_verdict` applies the contract's bands
  to refimpl's result given the results of llama.cpp's own alternative builds on the same
  host.

Nothing here depends on the host's instruction set: the bounds are the same on every x86-64
machine, and the end-to-end bands are relative to what llama.cpp's own builds do on it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

# -- per op ----------------------------------------------------------------------------------

#: test-backend-ops' ``max_nmse_err()`` of the ops refimpl implements (llama.cpp 0.3.36).  Ops
#: not listed use the default, :data:`DEFAULT_NMSE_BOUND`.  A same-type CPY is held to 0.
NMSE_BOUNDS = {
    "MUL_MAT": 5e-4,
    "MUL_MAT_ID": 5e-4,
    "OUT_PROD": 5e-4,
    "FLASH_ATTN_EXT": 5e-4,
    "SOFT_MAX": 1e-6,
    "CONV_2D": 5e-4,
    "CONV_TRANSPOSE_2D": 5e-4,
}

#: ``test_case::max_nmse_err()``: every op without an override.
DEFAULT_NMSE_BOUND = 1e-7

#: test-backend-ops treats FLT_MAX as an infinity (``isinf_or_max``).
_FLT_MAX = float(np.finfo(np.float32).max)


def nmse_bound(op: str, *, same_type_copy: bool = False) -> float:
    """The NMSE bound test-backend-ops gives ``op`` (an op name such as ``"SOFT_MAX"``)."""
    if op in ("CPY", "DUP", "CONT") and same_type_copy:
        return 0.0
    return NMSE_BOUNDS.get(op, DEFAULT_NMSE_BOUND)


def nmse(ref: np.ndarray, got: np.ndarray) -> float:
    """test-backend-ops' error: float32 differences squared in float32, summed in float64,
    over the sum of the reference's squares (0/0 is 0: two all-zero results agree)."""
    a = np.ascontiguousarray(ref, np.float32).ravel()
    b = np.ascontiguousarray(got, np.float32).ravel()
    with np.errstate(over="ignore", invalid="ignore"):
        d = a - b
        num = float(np.sum((d * d).astype(np.float64)))
        den = float(np.sum((a * a).astype(np.float64)))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def op_error(ref: np.ndarray, got: np.ndarray) -> tuple[float, str | None]:
    """``(nmse, problem)``: ``problem`` names the first NaN or infinity that is not where the
    reference has one (test-backend-ops' NaN and inf checks); NMSE is taken over the values
    that are finite in both."""
    a = np.ascontiguousarray(ref, np.float32).ravel()
    b = np.ascontiguousarray(got, np.float32).ravel()
    if a.shape != b.shape:
        return math.inf, f"shape {np.shape(got)} instead of {np.shape(ref)}"
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if (nan_a != nan_b).any():
        i = int(np.flatnonzero(nan_a != nan_b)[0])
        return math.inf, f"NaN mismatch at {i}: reference {a[i]}, got {b[i]}"
    inf_a = np.isinf(a) | (np.abs(a) == _FLT_MAX)
    inf_b = np.isinf(b) | (np.abs(b) == _FLT_MAX)
    bad = (inf_a != inf_b) | (inf_a & inf_b & (np.signbit(a) != np.signbit(b)))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        return math.inf, f"infinity mismatch at {i}: reference {a[i]}, got {b[i]}"
    finite = ~(nan_a | inf_a)
    return nmse(a[finite], b[finite]), None


def assert_op_within_contract(got: np.ndarray, ref: np.ndarray, op: str, *,
                              same_type_copy: bool = False) -> float:
    """Fail unless ``got`` is within test-backend-ops' bound for ``op`` of the reference
    ``ref`` (ggml's CPU backend); returns the NMSE."""
    bound = nmse_bound(op, same_type_copy=same_type_copy)
    err, problem = op_error(ref, got)
    if problem is not None:
        raise AssertionError(f"{op}: {problem}")
    if not err <= bound:
        a = np.ascontiguousarray(ref, np.float32).ravel()
        b = np.ascontiguousarray(got, np.float32).ravel()
        with np.errstate(invalid="ignore"):
            i = int(np.nanargmax(np.abs(a - b)))
        raise AssertionError(f"{op}: NMSE {err:.3e} > test-backend-ops' bound {bound:.0e} "
                             f"(largest difference at {i}: reference {a[i]}, got {b[i]})")
    return err


# -- end to end ------------------------------------------------------------------------------

_KLD_LINES = {
    "ppl_ratio": re.compile(r"Mean\s+PPL\(Q\)/PPL\(base\)\s*:\s*([0-9.eE+-]+)"),
    "log_ppl_unc": re.compile(r"Mean\s+ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*[0-9.eE+-]+\s*±\s*(-?nan|[0-9.eE+-]+)"),
    "mean_kld": re.compile(r"Mean\s+KLD:\s*([0-9.eE+-]+)"),
    "same_top": re.compile(r"Same top p:\s*([0-9.eE+-]+)"),
}


@dataclass(frozen=True)
class KldResult:
    """What ``llama-perplexity --kl-divergence`` prints of one run against the base logits:
    mean KL divergence (nats per token), the share of tokens whose most likely next token is
    the base run's (0..1), the ratio of the two perplexities, and the standard error
    llama-perplexity gives for the mean of ln(PPL ratio) (the per-token log-probability
    differences' spread over the square root of their number)."""

    mean_kld: float
    same_top: float
    ppl_ratio: float
    log_ppl_unc: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "KldResult":
        """Read the statistics block of llama-perplexity's output."""
        vals = {}
        for key, rx in _KLD_LINES.items():
            m = rx.search(text)
            if not m:
                raise ValueError(f"llama-perplexity printed no '{key}' line")
            vals[key] = float(m.group(1))
        # llama-perplexity may print -0.000000 (rounding noise of the 16-bit reference)
        kld = vals["mean_kld"] if vals["mean_kld"] > 0 else 0.0
        unc = vals["log_ppl_unc"]     # nan when every token's difference is 0
        return cls(mean_kld=kld, same_top=vals["same_top"] / 100.0,
                   ppl_ratio=vals["ppl_ratio"], log_ppl_unc=0.0 if math.isnan(unc) else unc)


#: spec/numerics.md, "End to end".  refimpl may be this many times further from the host's
#: native CPU run than the furthest of llama.cpp's own alternatives is (mean KLD, and
#: |ln PPL ratio|) ...
KLD_MARGIN = 2.0
#: ... and may lose this many more same-top-token points than the worst of them ...
SAME_TOP_MARGIN = 0.02
#: ... and, where llama.cpp's alternatives all coincide with the native run (or nearly), these
#: floors apply instead: mean KLD 1e-5 nats (ten steps of what llama-perplexity prints),
#: 3 % of top tokens, ln PPL ratio 1e-3.
KLD_FLOOR = 1e-5
SAME_TOP_FLOOR = 0.97
LOG_PPL_FLOOR = 1e-3
#: ... and |ln PPL ratio| may always reach this many of its own standard errors: a server
#: whose per-token log-probabilities scatter (as every other order of summation makes them,
#: llama.cpp's own included) moves the mean by chance; only a shift beyond chance is a bias.
LOG_PPL_SIGMAS = 4.0


def kld_verdict(ours: KldResult, alternatives: dict[str, KldResult]) -> list[str]:
    """The contract's end-to-end bands (spec/numerics.md): refimpl's statistics against the
    host's native CPU run, given those of llama.cpp's own alternatives against the same run
    (its portable build; its SSE4.2-only build; its native build without weight repacking,
    which is what its own ggml-rpc-server computes).  Returns the violations (empty when within)."""
    alts = list(alternatives.values())
    who = ", ".join(f"{k}: KLD {v.mean_kld:.2e}, top {v.same_top:.2%}, PPL ratio "
                    f"{v.ppl_ratio:.5f}" for k, v in alternatives.items())
    bad = []
    kld_bound = max(KLD_MARGIN * max(a.mean_kld for a in alts), KLD_FLOOR)
    if not ours.mean_kld <= kld_bound:
        bad.append(f"mean KLD {ours.mean_kld:.3e} > {kld_bound:.3e}")
    top_bound = min(min(a.same_top for a in alts) - SAME_TOP_MARGIN, SAME_TOP_FLOOR)
    if not ours.same_top >= top_bound:
        bad.append(f"same top token {ours.same_top:.2%} < {top_bound:.2%}")
    ppl_bound = max(KLD_MARGIN * max(abs(math.log(a.ppl_ratio)) for a in alts), LOG_PPL_FLOOR,
                    LOG_PPL_SIGMAS * ours.log_ppl_unc)
    if not abs(math.log(ours.ppl_ratio)) <= ppl_bound:
        bad.append(f"PPL ratio {ours.ppl_ratio:.5f} outside exp(±{ppl_bound:.2e})")
    return [f"{b} (llama.cpp's alternatives: {who})" for b in bad]


__all__ = ["DEFAULT_NMSE_BOUND", "KLD_FLOOR", "KLD_MARGIN", "KldResult", "LOG_PPL_FLOOR",
           "LOG_PPL_SIGMAS",
           "NMSE_BOUNDS", "SAME_TOP_FLOOR", "SAME_TOP_MARGIN", "assert_op_within_contract",
           "kld_verdict", "nmse", "nmse_bound", "op_error"]
