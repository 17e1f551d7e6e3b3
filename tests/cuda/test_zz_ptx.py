"""Every kernel signature the simulator ran in this session also compiles for a real GPU
(runs last in tests/cuda: the file name sorts after the kernel tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import LAUNCHED, SIMULATED


def test_launched_kernels_compile_to_ptx(tmp_path):
    if not SIMULATED:
        pytest.skip("kernels ran on a real GPU, which compiled them")
    if not LAUNCHED:
        pytest.skip("no CUDA kernel ran in this session")
    entries = [(mod, name, list(sig)) for (mod, name), sigs in sorted(LAUNCHED.items())
               for sig in sorted(sigs)]
    path = tmp_path / "signatures.json"
    path.write_text(json.dumps(entries))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("ptx_check.py")),
                           str(path)], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode == 3:
        pytest.skip(f"numba has no NVVM here ({proc.stdout.strip()}); "
                    f"pip install nvidia-cuda-nvcc-cu12 to compile the kernels")
    assert proc.returncode == 0, proc.stdout + proc.stderr
