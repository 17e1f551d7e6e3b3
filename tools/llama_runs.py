"""Run the stock llama.cpp tools (from the peer build) on a model, locally or through RPC.

Used by the end-to-end tests and by the docs' agreement measurements: the same model, prompt
and settings once on llama.cpp's own CPU backend and once with every layer on an RPC server.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .contract import KldResult
from .peers import cache_root, peer_env

_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)")
#: The last line llama-completion logs (its performance summary).
_COMPLETION_END = re.compile(r"common_perf_print:\s+total time")
#: llama.cpp's tools log through a background thread that is not drained at exit (upstream
#: https://github.com/ggml-org/llama.cpp/issues/22142): on a loaded machine a run that exits
#: with status 0 can lose its last lines, generated text and final estimate included.  The
#: tools run with a preload shim that drains the log at exit (log_flush_preload.c); a run that
#: still ends without its final line is repeated, at most this many times in all.
ATTEMPTS = 3


def build_log_shim(bin_dir: Path) -> Path:
    """Compile log_flush_preload.c (cached by the hash of its source)."""
    src = Path(__file__).with_name("log_flush_preload.c")
    key = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    out = cache_root() / f"log_flush_preload-{key}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp.so")
        subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(tmp), str(src), "-ldl"],
                       check=True)
        tmp.replace(out)
    return out


def tool_env(bin_dir: Path) -> dict:
    """Environment for a llama.cpp tool: the peer's libraries and the log-draining shim."""
    env = peer_env(bin_dir)
    shim = str(build_log_shim(bin_dir))
    env["LD_PRELOAD"] = shim + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    return env


def _run_tool(cmd: list[str], bin_dir: Path, complete: re.Pattern, what: str,
              timeout: float, lib_dir: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` until its output reaches the line ``complete`` matches (see ATTEMPTS);
    ``lib_dir`` puts other ggml libraries (the portable build's) before the peer's own."""
    env = tool_env(bin_dir)
    if lib_dir is not None:
        env["LD_LIBRARY_PATH"] = f"{lib_dir}:{env['LD_LIBRARY_PATH']}"
    for _ in range(ATTEMPTS):
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env,
                              timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        if complete.search(proc.stdout + proc.stderr):
            return proc
    raise RuntimeError(f"{what} exited {ATTEMPTS} times without its final log line:\n"
                       f"{proc.stderr[-3000:]}")


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
    #: llama.cpp's CPU backend repacks Q4_0/Q4_K (and IQ4_NL) weights into interleaved
    #: layouts whose dot products round differently; False runs it with ``--no-repack``, the
    #: arithmetic every RPC server is measured against (spec/ops/matmul.md)
    repack: bool = True
    #: ``-ub``: tokens per graph (None: llama.cpp's default); 1 runs one token per step, as
    #: generation does
    ubatch: int | None = None
    #: ``-ctk`` / ``-ctv``: the KV cache's types (None: llama.cpp's default, F16); a quantised
    #: V cache needs flash attention
    cache_k: str | None = None
    cache_v: str | None = None


def _common(settings: RunSettings, rpc: str | None) -> list[str]:
    args = ["-t", str(settings.threads), "-c", str(settings.ctx), "--seed", str(settings.seed),
            "-fa", "on" if settings.flash_attn else "off"]
    if not settings.repack:
        args.append("--no-repack")
    if settings.ubatch:
        args += ["-ub", str(settings.ubatch)]
    if settings.cache_k:
        args += ["-ctk", settings.cache_k]
    if settings.cache_v:
        args += ["-ctv", settings.cache_v]
    if rpc:
        args += ["-ngl", "99", "--rpc", rpc]
    else:
        args += ["-ngl", "0"]
    return args


def completion(bin_dir: Path, model: Path, prompt: str, n_predict: int, settings: RunSettings,
               rpc: str | None = None, timeout: float = 600, lib_dir: Path | None = None) -> str:
    """Greedy generation (``--temp 0 --ignore-eos``); returns the generated text only
    (``lib_dir``: run on the CPU with the ggml libraries found there)."""
    cmd = [str(bin_dir / "llama-completion"), "-m", str(model), "-p", prompt, "-n", str(n_predict),
           "--temp", "0", "--ignore-eos", "-no-cnv", *_common(settings, rpc)]
    proc = _run_tool(cmd, bin_dir, _COMPLETION_END, "llama-completion", timeout, lib_dir=lib_dir)
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
    proc = _run_tool(cmd, bin_dir, _PPL, "llama-perplexity", timeout)
    return float(_PPL.search(proc.stdout + proc.stderr).group(1))


_KLD_END = re.compile(r"Same top p:")


def save_base_logits(bin_dir: Path, model: Path, text_file: Path, settings: RunSettings,
                     out: Path, chunks: int = 2, timeout: float = 600) -> float:
    """``llama-perplexity --kl-divergence-base out`` on the host's llama.cpp CPU alone: the
    reference logits of the numerics contract (spec/numerics.md); returns its perplexity."""
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text_file),
           "--chunks", str(chunks), "--kl-divergence-base", str(out), *_common(settings, None)]
    proc = _run_tool(cmd, bin_dir, _PPL, "llama-perplexity (base logits)", timeout)
    return float(_PPL.search(proc.stdout + proc.stderr).group(1))


def kl_divergence(bin_dir: Path, model: Path, base: Path, settings: RunSettings,
                  rpc: str | None = None, lib_dir: Path | None = None, chunks: int = 2,
                  timeout: float = 900) -> KldResult:
    """``llama-perplexity --kl-divergence`` against the logits :func:`save_base_logits` saved,
    on an RPC server (``rpc``) or on the CPU with the ggml libraries of ``lib_dir``."""
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(model), "--kl-divergence",
           "--kl-divergence-base", str(base), "--chunks", str(chunks), *_common(settings, rpc)]
    proc = _run_tool(cmd, bin_dir, _KLD_END, "llama-perplexity --kl-divergence", timeout,
                     lib_dir=lib_dir)
    return KldResult.parse(proc.stdout + proc.stderr)


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
