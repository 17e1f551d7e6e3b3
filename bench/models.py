"""The benchmark's models: random-weight llama-architecture GGUFs of real models' shapes.

``SHAPES`` are SmolLM-135M's (n_embd 576, 30 layers, 9 query / 3 KV heads, ff 1536, 49152
tokens) and a Llama-3.2-1B-like one (n_embd 2048, 16 layers, 32/8 heads, ff 8192, 32000
tokens).  :func:`model` writes a shape once in F32 with the gguf package and quantises it with
the peer's own ``llama-quantize``; files are kept in ``$REFIMPL_BENCH_CACHE`` (default
``~/.cache/refimpl-bench``), never in the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

from tools.models import LlamaSpec, quantize, write_llama_gguf

SHAPES = {
    "135m": LlamaSpec(n_embd=576, n_layer=30, n_head=9, n_head_kv=3, n_ff=1536, n_vocab=49152,
                      n_ctx_train=2048, seed=11, output_scale=2.0),
    "1b": LlamaSpec(n_embd=2048, n_layer=16, n_head=32, n_head_kv=8, n_ff=8192, n_vocab=32000,
                    n_ctx_train=2048, seed=12, output_scale=2.0),
}

#: Weight types measured, as tools.models.QUANT_NAMES spells them (q4_k: Q4_K_S).
TYPES = ["f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k"]


def cache_dir() -> Path:
    """Where the benchmark's models are kept."""
    return Path(os.environ.get("REFIMPL_BENCH_CACHE", Path.home() / ".cache" / "refimpl-bench"))


def model(shape: str, kind: str, peer_bin: Path) -> Path:
    """The GGUF of ``shape`` in weight type ``kind``, written (and quantised) on first use."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    f32 = root / f"llama-{shape}-f32.gguf"
    if not f32.is_file():
        tmp = f32.with_suffix(".tmp")
        write_llama_gguf(tmp, SHAPES[shape])
        tmp.replace(f32)
    if kind == "f32":
        return f32
    out = root / f"llama-{shape}-{kind}.gguf"
    if not out.is_file():
        tmp = out.with_suffix(".tmp")
        quantize(f32, tmp, kind, peer_bin)
        tmp.replace(out)
    return out
