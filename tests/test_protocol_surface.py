"""The protocol core's public surface: what ``import refimpl.protocol`` costs and exports."""

import subprocess
import sys

import refimpl.protocol


def test_protocol_core_imports_without_numba():
    """The sans-IO core needs the standard library and numpy only (no compiler at import)."""
    code = ("import sys, refimpl.protocol; "
            "bad = sorted(m for m in ('numba', 'llvmlite', 'trio') if m in sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
