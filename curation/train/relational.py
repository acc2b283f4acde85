"""Relational attention: who may attend to whom when a video is generated from several subjects' references.

The self-attention sequence of one sample is `[video tokens | group 0 | group 1 | ... | group K-1]`, where group k
holds the reference tokens of subject k (its masked subject crop and its face crop, `slots` images of `per_slot`
tokens each). The rules:

- self-attention: video tokens attend to everything; reference tokens of subject k attend only to their own group.
  So references stay cohesive (a subject's face and body crops see each other), never mix with another subject, and
  stay clean conditions (they do not read the noisy video). Padding (a missing face crop, an absent subject) is
  never attended to.
- cross-attention, two modes (`model.cross_attention`): video tokens attend to the whole caption, as in Wan.
  "hard": reference tokens of subject k attend to the caption tokens of subject k's phrase and attributes plus the
  context tokens no subject owns, never to another subject's phrase. "soft" (as LumosX does): reference tokens read
  every real caption token, with an additive bias on the logits, ratio x |score| x (+1 on k's own words, minus the
  mean of the other subjects' ownership on theirs, 0 on context), where the score is computed from the reference
  queries averaged over `pool` x `pool` windows of each crop.

Both rules are written twice: as dense specifications (`self_attention_mask`, `cross_attention_mask`,
`dense_self_attention`, `dense_cross_attention`: used by the tests and as the dense baseline of
`bench/attention.py`) and as the blocked computation the model runs (`blocked_self_attention`,
`blocked_cross_attention`), which never materialises the masked-out blocks. Tests check that the two agree.

Both can also return the routing maps the mask loss supervises: for every head and video token, the share of its
self-attention on each subject's reference tokens (S) and of its cross-attention on each subject's words (A).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Layout:
    """Where each kind of token sits in a batch's self-attention sequence (same layout for every sample).

    `ref_valid[b, k, s]` says whether sample b has image s (0 = subject crop, 1 = face crop) for subject k;
    `subject_text[b, k, l]` whether caption token l belongs to subject k's phrase; `text_valid[b, l]` whether token l
    is a real token (not padding).
    """

    n_video: int
    n_subjects: int
    slots: int
    per_slot: int
    ref_valid: torch.Tensor  # [B, K, S] bool
    subject_text: torch.Tensor  # [B, K, L] bool
    text_valid: torch.Tensor  # [B, L] bool
    ref_grid: tuple[int, int] | None = None  # (h, w) tokens of one reference image; None: per_slot x 1

    @property
    def group_size(self) -> int:
        return self.slots * self.per_slot

    @property
    def n_ref(self) -> int:
        return self.n_subjects * self.group_size

    @property
    def n_total(self) -> int:
        return self.n_video + self.n_ref

    @property
    def batch(self) -> int:
        return int(self.text_valid.shape[0])

    def ref_token_valid(self) -> torch.Tensor:
        """[B, K, G] bool: which reference tokens are real (their image exists)."""
        return self.ref_valid.repeat_interleave(self.per_slot, dim=2)

    def key_valid(self) -> torch.Tensor:
        """[B, N] bool: tokens that may be attended to at all."""
        v = torch.ones(self.batch, self.n_video, dtype=torch.bool, device=self.ref_valid.device)
        return torch.cat([v, self.ref_token_valid().flatten(1)], dim=1)

    def context_text(self) -> torch.Tensor:
        """[B, L] bool: real caption tokens that belong to no subject (shared context: verbs, scene words)."""
        owned = self.subject_text.any(dim=1) if self.n_subjects else torch.zeros_like(self.text_valid)
        return self.text_valid & ~owned


def self_attention_mask(layout: Layout) -> torch.Tensor:
    """[B, N, N] bool, True where query token i may attend to key token j (the relational self-attention rule)."""
    b, nv, k, g = layout.batch, layout.n_video, layout.n_subjects, layout.group_size
    n = layout.n_total
    dev = layout.ref_valid.device
    mask = torch.zeros(b, n, n, dtype=torch.bool, device=dev)
    key_ok = layout.key_valid()
    mask[:, :nv, :] = key_ok[:, None, :]  # video -> video and every real reference token
    ref_ok = layout.ref_token_valid()  # [B, K, G]
    for s in range(k):
        lo = nv + s * g
        own = ref_ok[:, s]  # [B, G]
        # a group with no real token attends to itself, so its rows are never empty (their outputs are unused)
        own = torch.where(own.any(dim=1, keepdim=True), own, torch.ones_like(own))
        mask[:, lo : lo + g, lo : lo + g] = own[:, None, :]
    return mask


def cross_attention_mask(layout: Layout) -> torch.Tensor:
    """[B, N, L] bool, True where visual token i may attend to caption token l (the relational cross-attention rule)."""
    b, nv, k, g = layout.batch, layout.n_video, layout.n_subjects, layout.group_size
    n, length = layout.n_total, layout.text_valid.shape[1]
    mask = torch.ones(b, n, length, dtype=torch.bool, device=layout.text_valid.device)  # video rows: whole caption
    allowed = subject_text_allowed(layout)  # [B, K, L]
    for s in range(k):
        mask[:, nv + s * g : nv + (s + 1) * g, :] = allowed[:, s, None, :]
    return mask


def subject_text_allowed(layout: Layout) -> torch.Tensor:
    """[B, K, L] bool: caption tokens subject k's references may read: its own phrase plus the shared context.

    A row that would be empty (no phrase, no context) falls back to every real token, so softmax stays defined.
    """
    if layout.n_subjects == 0:
        return layout.subject_text
    allowed = layout.subject_text | layout.context_text()[:, None, :]
    empty = ~allowed.any(dim=2, keepdim=True)
    return torch.where(empty, layout.text_valid[:, None, :].expand_as(allowed), allowed)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q, k, v: [B, H, N, D]; mask broadcastable to [B, H, Nq, Nk] (bool, True = attend; or float, added)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One masked SDPA over the whole sequence: the specification (and the dense baseline of the benchmark).
    A [B, Nq, Nk] mask applies to every head; a [B, H, Nq, Nk] float mask is a per-head additive bias."""
    return _sdpa(q, k, v, mask[:, None] if mask.dim() == 3 else mask)


# -- routing maps (what the mask loss reads) --------------------------------------------------------------------
# The share of a video token's attention that lands on subject k's keys is softmax(QK^T) @ I_k, with I_k the
# indicator of k's keys. Appending the K indicators to V as extra channels gives every video token's output and all
# its shares from the same attention call: exact, for every token and head, at about 8 / D extra cost (K channels,
# padded to a multiple of 8 for the GPU kernels).


def group_indicator(layout: Layout) -> torch.Tensor:
    """[B, N, K]: 1 on the real reference tokens of subject k in the self-attention sequence."""
    nv, k, g = layout.n_video, layout.n_subjects, layout.group_size
    ind = torch.zeros(layout.batch, layout.n_total, k, device=layout.ref_valid.device)
    ok = layout.ref_token_valid().float()
    for s in range(k):
        ind[:, nv + s * g : nv + (s + 1) * g, s] = ok[:, s]
    return ind


def text_indicator(layout: Layout) -> torch.Tensor:
    """[B, L, K]: 1 on the caption tokens of subject k's phrase and attributes."""
    return (layout.subject_text & layout.text_valid[:, None, :]).transpose(1, 2).float()


def _with_routing(v: torch.Tensor, indicator: torch.Tensor | None) -> torch.Tensor:
    """V with the K indicator channels appended, zero-padded to a multiple of 8 channels: GPU memory-efficient
    attention kernels need that (flash needs V as wide as Q and is out either way); without it SDPA falls back to
    the math kernel, which materialises the whole score matrix."""
    if indicator is None:
        return v
    b, h, _, d = v.shape
    k = indicator.shape[-1]
    extra = indicator.to(v.dtype)[:, None].expand(b, h, -1, -1)
    pad = -(d + k) % 8
    if pad:
        extra = F.pad(extra, (0, pad))
    return torch.cat([v, extra], dim=-1)


def _split_routing(
    out: torch.Tensor, d: int, nv: int, routing: bool, k: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention output (first d channels) and the video rows' routing maps (the next k channels)."""
    if not routing:
        return out, None
    return out[..., :d], out[:, :, :nv, d : d + k]


Attention = tuple[torch.Tensor, torch.Tensor | None]
"""The attention output [B, H, N, D] and, when asked for, the routing maps [B, H, Nv, K]: for each head and video
token, the share of its attention on each subject's references (self) or on each subject's words (cross)."""


def blocked_self_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, routing: bool = False
) -> Attention:
    """The relational self-attention without the masked-out blocks.

    q, k, v: [B, H, N, D] in layout order. Two SDPA calls: video queries over all real keys, and each subject's
    reference queries over its own group only (groups batched together). Cost: Nv * N + K * G^2 instead of N^2.
    """
    nv, kk, g = layout.n_video, layout.n_subjects, layout.group_size
    if kk == 0:
        return _sdpa(q, k, v, None), None
    b, h, _, d = q.shape
    key_ok = layout.key_valid()[:, None, None, :]  # [B, 1, 1, N]
    vv = _with_routing(v, group_indicator(layout) if routing else None)
    out_v, maps = _split_routing(_sdpa(q[:, :, :nv], k, vv, key_ok), d, nv, routing, kk)
    qr = q[:, :, nv:].reshape(b, h, kk, g, d).transpose(1, 2).reshape(b * kk, h, g, d)
    kr = k[:, :, nv:].reshape(b, h, kk, g, d).transpose(1, 2).reshape(b * kk, h, g, d)
    vr = v[:, :, nv:].reshape(b, h, kk, g, d).transpose(1, 2).reshape(b * kk, h, g, d)
    own = layout.ref_token_valid().reshape(b * kk, g)
    own = torch.where(own.any(dim=1, keepdim=True), own, torch.ones_like(own))
    out_r = _sdpa(qr, kr, vr, own[:, None, None, :])
    out_r = out_r.reshape(b, kk, h, g, d).transpose(1, 2).reshape(b, h, kk * g, d)
    return torch.cat([out_v, out_r], dim=2), maps


def dense_self_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, routing: bool = False
) -> Attention:
    """The specification of `blocked_self_attention`: one SDPA under `self_attention_mask`."""
    d = q.shape[-1]
    vv = _with_routing(v, group_indicator(layout) if routing else None)
    return _split_routing(
        dense_attention(q, k, vv, self_attention_mask(layout)), d, layout.n_video, routing, layout.n_subjects
    )


# -- cross-attention: hard mask or LumosX-style soft bias ------------------------------------------------------


def soft_text_template(layout: Layout) -> torch.Tensor:
    """[B, K, L] in [-1, 1]: +1 on subject k's own words, minus the mean ownership of the other present subjects
    on theirs, 0 on shared context and padding. Subjects without any reference image (batch padding) count for
    nobody."""
    present = layout.ref_valid.any(dim=2)  # [B, K]
    own = (layout.subject_text & layout.text_valid[:, None, :] & present[..., None]).float()
    others = present.sum(dim=1).sub(1).clamp_min(1).float()[:, None, None]
    return (own - (own.sum(dim=1, keepdim=True) - own) / others) * present[..., None]


def pool_reference_queries(q_ref: torch.Tensor, layout: Layout, pool: int) -> torch.Tensor:
    """Average reference queries over `pool` x `pool` windows of each reference image's token grid, each token taking
    its window's mean. q_ref: [B, H, K*G, D]. A window at the edge averages the tokens it covers (LumosX pads with
    zeros and divides by pool^2; the same at grids that are multiples of `pool`, e.g. 256-px crops at pool 8)."""
    rh, rw = layout.ref_grid or (layout.per_slot, 1)
    if pool <= 1 or rh * rw == 1:
        return q_ref
    b, h, _, d = q_ref.shape
    imgs = layout.n_subjects * layout.slots
    x = q_ref.reshape(b, h, imgs, rh, rw, d).permute(0, 1, 2, 5, 3, 4).reshape(-1, d, rh, rw)
    x = F.avg_pool2d(x.float(), pool, pool, ceil_mode=True).to(q_ref.dtype)
    x = x.repeat_interleave(pool, dim=2).repeat_interleave(pool, dim=3)[:, :, :rh, :rw]
    return x.reshape(b, h, imgs, d, rh, rw).permute(0, 1, 2, 4, 5, 3).reshape(b, h, imgs * rh * rw, d)


def soft_cross_bias(q_ref: torch.Tensor, k: torch.Tensor, layout: Layout, ratio: float, pool: int) -> torch.Tensor:
    """[B, H, K*G, L] additive logits for the reference queries (LumosX's soft relational cross-attention).

    bias = ratio * |pooled score| * template: a reference reads its own subject's words more strongly and the other
    subjects' words more weakly, in proportion to how strongly it already reads them; every real word stays
    readable. Padding gets -inf.
    """
    g = layout.group_size
    pooled = pool_reference_queries(q_ref, layout, pool)
    scores = (pooled.float() @ k.float().transpose(-1, -2)) * q_ref.shape[-1] ** -0.5
    tmpl = soft_text_template(layout).repeat_interleave(g, dim=1)[:, None]  # [B, 1, K*G, L]
    bias = ratio * scores.abs() * tmpl
    return bias.masked_fill(~layout.text_valid[:, None, None, :], float("-inf")).to(q_ref.dtype)


def blocked_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    routing: bool = False,
    mode: str = "hard",
    ratio: float = 0.1,
    pool: int = 8,
) -> Attention:
    """The relational cross-attention: video queries over the whole caption (no mask, as Wan); reference queries of
    subject k over `subject_text_allowed[k]` (mode "hard") or over every real word with `soft_cross_bias` (mode
    "soft"). q: [B, H, N, D]; k, v: [B, H, L, D]."""
    nv, kk, g = layout.n_video, layout.n_subjects, layout.group_size
    if kk == 0:
        return _sdpa(q, k, v, None), None
    d = q.shape[-1]
    vv = _with_routing(v, text_indicator(layout) if routing else None)
    out_v, maps = _split_routing(_sdpa(q[:, :, :nv], k, vv, None), d, nv, routing, kk)
    if mode == "soft":
        out_r = _sdpa(q[:, :, nv:], k, v, soft_cross_bias(q[:, :, nv:], k, layout, ratio, pool))
    else:
        allowed = subject_text_allowed(layout).repeat_interleave(g, dim=1)  # [B, K*G, L]
        out_r = _sdpa(q[:, :, nv:], k, v, allowed[:, None])
    return torch.cat([out_v, out_r], dim=2), maps


def dense_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    routing: bool = False,
    mode: str = "hard",
    ratio: float = 0.1,
    pool: int = 8,
) -> Attention:
    """The specification of `blocked_cross_attention`: one SDPA over every row, with the hard mask or with the
    soft bias on the reference rows (video rows unbiased)."""
    d, nv = q.shape[-1], layout.n_video
    vv = _with_routing(v, text_indicator(layout) if routing else None)
    if mode == "soft":
        b, h, n = q.shape[:3]
        mask = torch.zeros(b, h, n, k.shape[2], dtype=q.dtype, device=q.device)
        mask[:, :, nv:] = soft_cross_bias(q[:, :, nv:], k, layout, ratio, pool)
    else:
        mask = cross_attention_mask(layout)
    return _split_routing(dense_attention(q, k, vv, mask), d, nv, routing, layout.n_subjects)


def attention_flops(n_video: int, n_subjects: int, group: int, n_text: int, dim: int) -> dict[str, float]:
    """Multiply-adds x2 of the score and value products (QK^T and PV) for one self- plus one cross-attention layer.

    dense: every query against every key (what a masked dense kernel computes). relational: only the blocks the
    rules allow (video x all, each group x itself; cross: every query x the caption, as both run it).
    """
    n = n_video + n_subjects * group
    dense_self = 2 * 2 * n * n * dim
    rel_self = 2 * 2 * (n_video * n + n_subjects * group * group) * dim
    cross = 2 * 2 * n * n_text * dim
    return {"dense": float(dense_self + cross), "relational": float(rel_self + cross)}
