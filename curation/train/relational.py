"""Relational attention: who may attend to whom when a video is generated from several subjects' references.

The self-attention sequence of one sample is `[video tokens | group 0 | group 1 | ... | group K-1]`, where group k
holds the reference tokens of subject k (its masked subject crop and its face crop, `slots` images of `per_slot`
tokens each). The rules:

- self-attention: video tokens attend to everything; reference tokens of subject k attend only to their own group.
  So references stay cohesive (a subject's face and body crops see each other), never mix with another subject, and
  stay clean conditions (they do not read the noisy video). Padding (a missing face crop, an absent subject) is
  never attended to.
- cross-attention: video tokens attend to the whole caption, as in Wan; reference tokens of subject k attend to the
  caption tokens of subject k's phrase and attributes plus the context tokens no subject owns, never to another
  subject's phrase.

Both rules are written twice: as dense boolean masks (`self_attention_mask`, `cross_attention_mask`: the
specification, used by the tests and as the dense baseline of `bench/attention.py`) and as the blocked computation
the model runs (`blocked_self_attention`, `blocked_cross_attention`), which never materialises the masked-out
blocks. Tests check that the two agree.
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
    """q, k, v: [B, H, N, D]; mask broadcastable to [B, H, Nq, Nk] (bool, True = attend)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One masked SDPA over the whole sequence: the specification (and the dense baseline of the benchmark)."""
    return _sdpa(q, k, v, mask[:, None])


def blocked_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The relational self-attention without the masked-out blocks.

    q, k, v: [B, H, N, D] in layout order. Two SDPA calls: video queries over all real keys, and each subject's
    reference queries over its own group only (groups batched together). Cost: Nv * N + K * G^2 instead of N^2.
    """
    nv, kk, g = layout.n_video, layout.n_subjects, layout.group_size
    if kk == 0:
        return _sdpa(q, k, v, None)
    b, h, _, d = q.shape
    key_ok = layout.key_valid()[:, None, None, :]  # [B, 1, 1, N]
    out_v = _sdpa(q[:, :, :nv], k, v, key_ok)
    qr = q[:, :, nv:].reshape(b, h, kk, g, d).transpose(1, 2).reshape(b * kk, h, g, d)
    kr = k[:, :, nv:].reshape(b, h, kk, g, d).transpose(1, 2).reshape(b * kk, h, g, d)
    vr = v[:, :, nv:].reshape(b, h, kk, g, d).transpose(1, 2).reshape(b * kk, h, g, d)
    own = layout.ref_token_valid().reshape(b * kk, g)
    own = torch.where(own.any(dim=1, keepdim=True), own, torch.ones_like(own))
    out_r = _sdpa(qr, kr, vr, own[:, None, None, :])
    out_r = out_r.reshape(b, kk, h, g, d).transpose(1, 2).reshape(b, h, kk * g, d)
    return torch.cat([out_v, out_r], dim=2)


def blocked_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The relational cross-attention: video queries over the whole caption (no mask, as Wan), reference queries
    of subject k over `subject_text_allowed[k]`. q: [B, H, N, D]; k, v: [B, H, L, D]."""
    nv, kk, g = layout.n_video, layout.n_subjects, layout.group_size
    if kk == 0:
        return _sdpa(q, k, v, None)
    out_v = _sdpa(q[:, :, :nv], k, v, None)
    allowed = subject_text_allowed(layout).repeat_interleave(g, dim=1)  # [B, K*G, L]
    out_r = _sdpa(q[:, :, nv:], k, v, allowed[:, None])
    return torch.cat([out_v, out_r], dim=2)


def group_attention_mass(q: torch.Tensor, k: torch.Tensor, layout: Layout, queries: torch.Tensor) -> torch.Tensor:
    """Share of each chosen video query's self-attention that lands on each subject's reference tokens.

    q, k: [B, H, N, D]; `queries`: indices of the video tokens to read (a subset keeps the cost at
    len(queries) * N). Returns [B, K, len(queries)], averaged over heads; the mask loss turns it into a map.
    """
    nv, kk, g = layout.n_video, layout.n_subjects, layout.group_size
    b, h, _, d = q.shape
    scores = q[:, :, queries] @ k.transpose(-1, -2) * d**-0.5  # [B, H, Q, N]
    scores = scores.masked_fill(~layout.key_valid()[:, None, None, :], float("-inf"))
    probs = scores.float().softmax(dim=-1)[..., nv:]  # mass on reference tokens only
    mass = probs.reshape(b, h, len(queries), kk, g).sum(dim=-1).mean(dim=1)  # [B, Q, K]
    return mass.transpose(1, 2)


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
