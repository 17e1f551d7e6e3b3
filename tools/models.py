"""Small random GGUF models for end-to-end tests: llama, the architectures built like it,
qwen3moe and gpt-oss (mixtures of experts).

Weights are random (seeded), so a model's text is gibberish, but deterministic gibberish that
any two correct implementations agree on.  The vocabulary holds printable pieces only, so
outputs compare as text.  Quantised variants are made with the peer's own ``llama-quantize``
(the same code users run), never by hand.

    from tools.models import LlamaSpec, ModelSpec, write_gguf, write_llama_gguf
    path = write_llama_gguf(tmp_path / "m.gguf", LlamaSpec(n_layer=2, n_head=4, n_head_kv=2))
    path = write_gguf(tmp_path / "g.gguf", ModelSpec(arch="gemma3", n_embd=128, key_length=64))

Besides ``llama``, :data:`ARCH_FEATURES` lists the architectures written and what each adds to
llama's block (tensor names and hyper-parameters as llama.cpp 0.3.36 loads them,
src/models/<arch>.cpp).  What an architecture computes without a tensor of its own (qwen's
NEOX rope, gemma3's embedding scaling by sqrt(n_embd) and GELU-gated FFN, gpt-oss's
SWIGLU_OAI experts and softmax over the chosen experts' logits) is llama.cpp's part.
"""

from __future__ import annotations

import string
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

#: ``llama-quantize`` type names for the formats the tests use.
QUANT_NAMES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1",
               "q4_k": "Q4_K_S", "q6_k": "Q6_K", "bf16": "BF16", "f16": "F16",
               "iq4_xs": "IQ4_XS", "iq3_s": "IQ3_S",  # IQ3_S needs no importance matrix
               "mxfp4_moe": "MXFP4_MOE"}  # experts MXFP4, the other matrices Q8_0

#: architecture -> what its blocks add to (or change in) llama's
ARCH_FEATURES = {
    "llama": frozenset(),
    "qwen2": frozenset({"qkv_bias"}),                       # biases on Q, K and V
    "qwen3": frozenset({"qk_norm"}),                        # per-head RMS norm of Q and K
    "phi3": frozenset({"fused_qkv", "fused_up"}),           # attn_qkv; ffn_up holds gate and up
    "gemma3": frozenset({"qk_norm", "post_norms", "tied_output"}),  # + post-attn/ffw norms
    "qwen3moe": frozenset({"qk_norm", "moe"}),               # experts instead of one FFN
    # gpt-oss (llama.cpp's LLM_ARCH_OPENAI_MOE): Q/K/V and output biases, a learned sink logit
    # per head, the FFN's norm named post_attention_norm, experts with biases and a router bias;
    # sliding-window attention on even layers (the loader's default pattern of 2)
    "gpt-oss": frozenset({"qkv_bias", "out_bias", "attn_sinks", "post_attention_ffn_norm",
                          "moe", "moe_bias"}),
    # Mamba (v1): no attention and no FFN; each block is a selective state-space mixer
    # (ssm_in, a causal conv1d, ssm_x, ssm_dt, A, D, ssm_out) of d_inner = 2·n_embd channels
    "mamba": frozenset({"ssm"}),
}


@dataclass(frozen=True)
class ModelSpec:
    """Hyper-parameters of a tiny model of one of :data:`ARCH_FEATURES`' architectures."""

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx_train: int = 512
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    seed: int = 0
    weight_scale: float = 1.0  # multiplies the 1/sqrt(fan_in) initialisation
    output_scale: float = 1.0  # extra factor on the output projection (peakier logits)
    #: vocabulary size; None is the small printable test vocabulary (:func:`vocabulary`), a
    #: larger number pads it with synthetic pieces (benchmarks: a real model's output matrix)
    n_vocab: int | None = None
    arch: str = "llama"
    #: head size when it is not n_embd / n_head (``attention.key_length``, as gemma3 and qwen3)
    key_length: int | None = None
    #: sliding-window attention (gemma3): window, every how many layers one is global, and the
    #: local layers' rope base
    sliding_window: int = 0
    swa_pattern: int = 0
    rope_theta_swa: float = 0.0
    #: qwen3moe, gpt-oss: a mixture of ``n_expert`` experts of ``n_ff`` each, ``n_expert_used``
    #: routed per token (qwen3moe: softmax gating, normalised weights; gpt-oss: softmax over the
    #: chosen experts' logits)
    n_expert: int = 0
    n_expert_used: int = 0
    #: mamba: state size per channel and convolution width (d_inner is 2·n_embd, the time-step
    #: rank ceil(n_embd / 16), as the loader and Mamba's conversions have them)
    d_state: int = 16
    d_conv: int = 4

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.key_length or self.n_embd // self.n_head

    def named(self, **kw) -> "ModelSpec":
        """A copy with some fields changed."""
        return replace(self, **kw)


#: the name the llama tests, benchmarks and captures use
LlamaSpec = ModelSpec


def vocabulary(n_vocab: int | None = None) -> list[str]:
    """The pieces: control tokens, then printable single characters and frequent pairs, then
    (up to ``n_vocab``) synthetic three-letter pieces."""
    specials = ["<unk>", "<s>", "</s>"]
    chars = list(string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,;:!?'-")
    spaced = ["\u2581" + c for c in string.ascii_lowercase] + ["\u2581"]
    pairs = ["th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or",
             "te", "of", "ed", "is", "it", "al", "ar", "st", "to", "nt", "ng"]
    pieces = specials + chars + spaced + ["\u2581" + p for p in pairs] + pairs
    if n_vocab is not None and n_vocab > len(pieces):
        letters = string.ascii_lowercase
        extra = ("".join((letters[i // 676 % 26], letters[i // 26 % 26], letters[i % 26]))
                 + ("" if i < 17576 else str(i // 17576)) for i in range(n_vocab - len(pieces)))
        pieces += list(extra)
    return pieces


def write_llama_gguf(path: Path, spec: ModelSpec = ModelSpec()) -> Path:
    """Write an F32 llama model with random weights to ``path``."""
    return write_gguf(path, replace(spec, arch="llama"))


def write_gguf(path: Path, spec: ModelSpec) -> Path:
    """Write an F32 model of ``spec.arch`` with random weights to ``path``."""
    import gguf  # imported here: only model-writing tests need it

    features = ARCH_FEATURES[spec.arch]
    path = Path(path)
    rng = np.random.default_rng(spec.seed)
    vocab = vocabulary(spec.n_vocab)
    n_vocab = len(vocab)
    w = gguf.GGUFWriter(str(path), spec.arch)
    w.add_name(f"refimpl-test-{spec.n_layer}L-{spec.n_embd}d")
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    ssm = "ssm" in features
    w.add_feed_forward_length(0 if ssm else spec.n_ff)
    w.add_head_count(0 if ssm else spec.n_head)
    if ssm:
        w.add_head_count_kv(0)
        w.add_ssm_conv_kernel(spec.d_conv)
        w.add_ssm_inner_size(2 * spec.n_embd)
        w.add_ssm_state_size(spec.d_state)
        w.add_ssm_time_step_rank(-(-spec.n_embd // 16))
    else:
        w.add_head_count_kv(spec.n_head_kv)
    if spec.key_length:
        w.add_key_length(spec.key_length)
        w.add_value_length(spec.key_length)
    if not ssm:
        w.add_rope_dimension_count(spec.head_dim)
        w.add_rope_freq_base(spec.rope_theta)
    if spec.sliding_window:
        w.add_sliding_window(spec.sliding_window)
        if spec.swa_pattern:
            w.add_sliding_window_pattern(spec.swa_pattern)
        if spec.rope_theta_swa:
            w.add_rope_freq_base_swa(spec.rope_theta_swa)
    w.add_layer_norm_rms_eps(spec.rms_eps)
    if "moe" in features:
        w.add_expert_count(spec.n_expert)
        w.add_expert_used_count(spec.n_expert_used)
        w.add_expert_feed_forward_length(spec.n_ff)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab)
    w.add_token_scores([0.0] * 3 + [-float(i) / n_vocab - len(p) * 0.0 for i, p in enumerate(vocab[3:])])
    w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                      + [gguf.TokenType.NORMAL] * (n_vocab - 3))
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def mat(rows: int, cols: int) -> np.ndarray:  # numpy (rows, cols) = ggml ne (cols, rows)
        return (rng.standard_normal((rows, cols)) * spec.weight_scale / np.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def bias(n: int) -> np.ndarray:
        return (0.1 * rng.standard_normal(n)).astype(np.float32)

    e, q, kv, ff = spec.n_embd, spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim, spec.n_ff
    embd = rng.standard_normal((n_vocab, e)).astype(np.float32)
    if "tied_output" in features:  # the output is the embedding: gemma scales it by sqrt(n_embd)
        embd *= np.float32(spec.output_scale / np.sqrt(e))
    w.add_tensor("token_embd.weight", embd)
    for i in range(spec.n_layer):
        blk = f"blk.{i}"
        w.add_tensor(f"{blk}.attn_norm.weight", norm(e))
        if ssm:
            _ssm_block(w, blk, spec, rng, mat, bias)
            continue
        if "fused_qkv" in features:
            w.add_tensor(f"{blk}.attn_qkv.weight", mat(q + 2 * kv, e))
        else:
            w.add_tensor(f"{blk}.attn_q.weight", mat(q, e))
            w.add_tensor(f"{blk}.attn_k.weight", mat(kv, e))
            w.add_tensor(f"{blk}.attn_v.weight", mat(kv, e))
        w.add_tensor(f"{blk}.attn_output.weight", mat(e, q))
        if "out_bias" in features:
            w.add_tensor(f"{blk}.attn_output.bias", bias(e))
        if "attn_sinks" in features:  # one logit per head, joining each row's softmax
            w.add_tensor(f"{blk}.attn_sinks.weight", rng.standard_normal(spec.n_head).astype(np.float32))
        ffn_norm = "post_attention_norm" if "post_attention_ffn_norm" in features else "ffn_norm"
        w.add_tensor(f"{blk}.{ffn_norm}.weight", norm(e))
        if "moe" in features:
            w.add_tensor(f"{blk}.ffn_gate_inp.weight", mat(spec.n_expert, e) * 4)
            if "moe_bias" in features:
                w.add_tensor(f"{blk}.ffn_gate_inp.bias", bias(spec.n_expert) * 4)
            for name, rows, cols in (("gate", ff, e), ("up", ff, e), ("down", e, ff)):
                w.add_tensor(f"{blk}.ffn_{name}_exps.weight",
                             np.stack([mat(rows, cols) for _ in range(spec.n_expert)]))
                if "moe_bias" in features:  # numpy (n_expert, rows) = ggml ne (rows, n_expert)
                    w.add_tensor(f"{blk}.ffn_{name}_exps.bias",
                                 np.stack([bias(rows) for _ in range(spec.n_expert)]))
        elif "fused_up" in features:
            w.add_tensor(f"{blk}.ffn_up.weight", mat(2 * ff, e))
        else:
            w.add_tensor(f"{blk}.ffn_gate.weight", mat(ff, e))
            w.add_tensor(f"{blk}.ffn_up.weight", mat(ff, e))
        if "moe" not in features:
            w.add_tensor(f"{blk}.ffn_down.weight", mat(e, ff))
        if "qkv_bias" in features:
            for name, n in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
                w.add_tensor(f"{blk}.{name}.bias", bias(n))
        if "qk_norm" in features:
            w.add_tensor(f"{blk}.attn_q_norm.weight", norm(spec.head_dim))
            w.add_tensor(f"{blk}.attn_k_norm.weight", norm(spec.head_dim))
        if "post_norms" in features:
            w.add_tensor(f"{blk}.post_attention_norm.weight", norm(e))
            w.add_tensor(f"{blk}.post_ffw_norm.weight", norm(e))
    w.add_tensor("output_norm.weight", norm(e))
    if "tied_output" not in features:
        w.add_tensor("output.weight", mat(n_vocab, e) * spec.output_scale)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _ssm_block(w, blk: str, spec: ModelSpec, rng, mat, bias) -> None:
    """Mamba's mixer tensors of one block (shapes as numpy, the reverse of ggml's ``ne``)."""
    e, d_inner, d_state = spec.n_embd, 2 * spec.n_embd, spec.d_state
    dt_rank = -(-e // 16)
    w.add_tensor(f"{blk}.ssm_in.weight", mat(2 * d_inner, e))
    w.add_tensor(f"{blk}.ssm_conv1d.weight", mat(d_inner, spec.d_conv))
    w.add_tensor(f"{blk}.ssm_conv1d.bias", bias(d_inner))
    w.add_tensor(f"{blk}.ssm_x.weight", mat(dt_rank + 2 * d_state, d_inner))
    w.add_tensor(f"{blk}.ssm_dt.weight", mat(d_inner, dt_rank))
    w.add_tensor(f"{blk}.ssm_dt.bias", bias(d_inner))
    # A = -exp(A_log) with Mamba's initialisation A_log = log(1 .. d_state)
    w.add_tensor(f"{blk}.ssm_a", -np.tile(np.arange(1, d_state + 1, dtype=np.float32), (d_inner, 1)))
    w.add_tensor(f"{blk}.ssm_d", (1.0 + 0.1 * rng.standard_normal(d_inner)).astype(np.float32))
    w.add_tensor(f"{blk}.ssm_out.weight", mat(e, d_inner))


def quantize(src: Path, dst: Path, kind: str, peer_bin: Path) -> Path:
    """Convert ``src`` with the peer's ``llama-quantize`` to ``kind`` (a key of QUANT_NAMES)."""
    from .peers import peer_env

    proc = subprocess.run([str(Path(peer_bin) / "llama-quantize"), "--allow-requantize",
                           str(src), str(dst), QUANT_NAMES[kind]],
                          capture_output=True, text=True, env=peer_env(Path(peer_bin)))
    if proc.returncode != 0:
        raise RuntimeError(f"llama-quantize {kind} failed:\n{proc.stdout}\n{proc.stderr}")
    return Path(dst)
