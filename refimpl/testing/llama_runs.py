"""Run the stock llama.cpp tools (from the peer build) on a model, locally or through RPC.

Used by the end-to-end tests and by the docs' agreement measurements: the same model, prompt
and settings once on llama.cpp's own CPU backend and once with every layer on an RPC server.
"""

from __future__ import annotations

import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .peers import peer_env

_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)")
_WORDS = ["the", "cat", "sat", "on", "mat", "and", "dog", "ran", "to", "tree", "in", "park",
          "with", "red", "ball", "she", "he", "it", "is", "at", "of", "an", "end", "stone"]


def sample_text(n_words: int = 3000, seed: int = 0) -> str:
    """A fixed pseudo-random text over the test vocabulary's letters."""
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(n_words))


@dataclass
class RunSettings:
    """What both runs of a comparison share."""

    flash_attn: bool = False
    threads: int = 1
    ctx: int = 256
    seed: int = 1


def _common(settings: RunSettings, rpc: str | None) -> list[str]:
    args = ["-t", str(settings.threads), "-c", str(settings.ctx), "--seed", str(settings.seed),
            "-fa", "on" if settings.flash_attn else "off"]
    if rpc:
        args += ["-ngl", "99", "--rpc", rpc]
    else:
        args += ["-ngl", "0"]
    return args


def completion(bin_dir: Path, model: Path, prompt: str, n_predict: int, settings: RunSettings,
               rpc: str | None = None, timeout: float = 600) -> str:
    """Greedy generation (``--temp 0 --ignore-eos``); returns the generated text only."""
    cmd = [str(bin_dir / "llama-completion"), "-m", str(model), "-p", prompt, "-n", str(n_predict),
           "--temp", "0", "--ignore-eos", "-no-cnv", *_common(settings, rpc)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=peer_env(bin_dir),
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-completion failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = proc.stdout
    stripped = out.lstrip()
    if stripped.startswith(prompt):
        return stripped[len(prompt):]
    return out


def perplexity(bin_dir: Path, model: Path, text_file: Path, settings: RunSettings,
               rpc: str | None = None, chunks: int = 4, timeout: float = 600) -> float:
    """``llama-perplexity`` over ``text_file``; returns the final estimate."""
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text_file),
           "--chunks", str(chunks), *_common(settings, rpc)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=peer_env(bin_dir),
                          timeout=timeout)
    m = _PPL.search(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"llama-perplexity failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return float(m.group(1))


def agreement(reference: str, other: str) -> float:
    """Share of the reference's characters reproduced before the first difference."""
    if not reference:
        return 1.0
    n = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        n += 1
    return n / len(reference)
