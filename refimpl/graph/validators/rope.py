"""What ggml accepts for the ops of :mod:`refimpl.kernels.rope` (validation, any device)."""

from __future__ import annotations

import numpy as np

from ..build import Node
from ..checks import (
    F16,
    F32,
    I32,
    elementwise_strides,
    fail,
    no_src_beyond,
    require,
    same_shape,
    src,
    type_in,
)
from ..ops import Op
from ..registry import validates

MODE_NORMAL, MODE_NEOX, MODE_MROPE, MODE_VISION, MODE_IMROPE = 0, 2, 8, 24, 40
MODES = (MODE_NORMAL, MODE_NEOX, MODE_MROPE, MODE_VISION, MODE_IMROPE)


class RopeParams:
    """The op parameters of a ROPE node, decoded."""

    def __init__(self, node: Node):
        params = node.op_params                       # int32[16]
        ints = params.tolist()
        self.n_dims, self.mode, self.n_ctx_orig = ints[1], ints[2], ints[4]
        (self.freq_base, self.freq_scale, self.ext_factor, self.attn_factor,
         self.beta_fast, self.beta_slow) = params[5:11].view(np.float32)   # float32 scalars
        self.sections = tuple(ints[11:15])
        self.n_offs = ints[15]

    @property
    def multi(self) -> bool:
        """Multi-section modes (MROPE, VISION, IMROPE) take four positions per token."""
        return bool(self.mode & MODE_MROPE)


@validates(Op.ROPE, Op.ROPE_BACK)
def check_rope(node: Node) -> None:
    """ROPE (ggml_rope_ext, ggml_rope_multi) in normal, NeoX, MRoPE, IMRoPE and vision modes,
    and ROPE_BACK (ggml_rope_ext_back, ggml_rope_multi_back: the same node rotating the other
    way): raise GraphInvalid unless ggml would accept the node."""
    a = src(node, 0, "input")
    pos = src(node, 1, "positions")
    no_src_beyond(node, 3)
    type_in(a, {F32, F16}, node, "src0")
    require(node.type == a.type, node, "dst must have src0's type")
    same_shape(node, a, node, "dst and src0")
    for t, what in ((node, "dst"), (a, "src0")):
        elementwise_strides(t, node, what)
        if t.nb[0] != t.traits.type_size:
            fail(node, f"{what} rows must be packed (nb[0])")
    p = RopeParams(node)
    if p.mode not in MODES:
        fail(node, f"rope mode {p.mode} is not one of {list(MODES)}")
    n0 = a.ne[0]
    if n0 % 2 != 0:
        fail(node, f"ne[0]={n0} must be even")
    if not (p.n_dims > 0 and p.n_dims % 2 == 0):
        fail(node, f"n_dims={p.n_dims} must be even and positive")
    if not (p.n_offs >= 0 and p.n_offs % 2 == 0):
        fail(node, f"n_offs={p.n_offs} must be even and >= 0")
    if not (p.n_offs + p.n_dims <= n0):
        fail(node, f"n_offs + n_dims = {p.n_offs + p.n_dims} exceeds ne[0]={n0}")
    if p.multi:
        secs = p.sections
        if not (all(s >= 0 for s in secs) and sum(secs) > 0):
            fail(node, f"sections {list(secs)} must be >= 0 with a positive sum")
        if not (sum(secs) <= n0):
            fail(node, f"sections {list(secs)} exceed ne[0]={n0}")
    if p.mode == MODE_VISION:
        if p.n_dims * 2 != n0:
            fail(node, f"vision mode needs n_dims = ne[0]/2 (n_dims={p.n_dims})")
        require(p.n_offs == 0, node, "vision mode has no offset")
    type_in(pos, {I32}, node, "src1")
    elementwise_strides(pos, node, "src1")
    require(pos.ne[1] == pos.ne[2] == pos.ne[3] == 1, node, "src1 must be a vector")
    need = a.ne[2] * (4 if p.multi else 1)
    if pos.ne[0] != need:
        fail(node, f"src1 holds {pos.ne[0]} positions, {need} needed")
    ff = node.src[2] if len(node.src) > 2 else None
    if ff is not None:
        ff = src(node, 2, "frequency factors")
        type_in(ff, {F32}, node, "src2")
        elementwise_strides(ff, node, "src2")
        need_ff = n0 // 2 if p.mode == MODE_VISION else p.n_dims // 2
        if not (ff.ne[0] >= need_ff):
            fail(node, f"src2 holds {ff.ne[0]} frequency factors, "
                       f"{need_ff} needed")
