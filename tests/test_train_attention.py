"""Relational attention: the masks say who may attend to whom, the blocked kernels obey them, and the whole tiny
model keeps subjects apart end to end (1-4 subjects)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from curation.train.config import ModelConfig  # noqa: E402
from curation.train.model import build, token_positions  # noqa: E402
from curation.train.relational import (  # noqa: E402
    Layout,
    blocked_cross_attention,
    blocked_self_attention,
    cross_attention_mask,
    dense_attention,
    dense_cross_attention,
    dense_self_attention,
    self_attention_mask,
    soft_cross_bias,
    soft_text_template,
    subject_text_allowed,
)

B, H, D, NV, L = 2, 2, 8, 12, 20
SLOTS, PER_SLOT = 2, 3


def _layout(k: int) -> Layout:
    """Subject s owns caption tokens [2 + 3s, 5 + 3s); the last 4 tokens are padding; sample 1 lacks subject 0's
    face crop."""
    ref_valid = torch.ones(B, k, SLOTS, dtype=torch.bool)
    if k:
        ref_valid[1, 0, 1] = False
    text_valid = torch.ones(B, L, dtype=torch.bool)
    text_valid[:, L - 4 :] = False  # padding
    subject_text = torch.zeros(B, k, L, dtype=torch.bool)
    for s in range(k):
        subject_text[:, s, 2 + 3 * s : 5 + 3 * s] = True
    return Layout(NV, k, SLOTS, PER_SLOT, ref_valid, subject_text, text_valid)


def _group(lay: Layout, s: int) -> slice:
    lo = lay.n_video + s * lay.group_size
    return slice(lo, lo + lay.group_size)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_self_mask_separates_subjects_and_keeps_groups_cohesive(k: int) -> None:
    lay = _layout(k)
    m = self_attention_mask(lay)
    assert m.shape == (B, NV + k * SLOTS * PER_SLOT, NV + k * SLOTS * PER_SLOT)
    valid = lay.key_valid()
    assert torch.equal(m[:, :NV, :], valid[:, None, :].expand(B, NV, -1))  # video sees video + real references
    for a in range(k):
        ga = _group(lay, a)
        assert not m[:, ga, :NV].any()  # references never read the noisy video
        for b in range(k):
            gb = _group(lay, b)
            if a != b:
                assert not m[:, ga, gb].any(), f"subject {a} attends to subject {b}'s references"
            else:
                assert torch.equal(m[:, ga, gb], valid[:, None, gb].expand(B, lay.group_size, -1))
    if k:  # the missing face crop of sample 1, subject 0 is attended by nobody
        face = slice(_group(lay, 0).start + PER_SLOT, _group(lay, 0).stop)
        assert not m[1, :, face].any() and m[0, :, face][:NV].all()


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_cross_mask_binds_each_phrase_to_its_subject(k: int) -> None:
    lay = _layout(k)
    m = cross_attention_mask(lay)
    assert m.shape == (B, NV + k * SLOTS * PER_SLOT, L)
    assert m[:, :NV].all()  # video reads the whole caption, as Wan does
    context = lay.context_text()
    for a in range(k):
        rows = m[:, _group(lay, a)]
        own = lay.subject_text[:, a]
        assert rows[:, :, own[0]].all(), "A's references must read A's phrase"
        for b in range(k):
            if b != a:
                assert not rows[:, :, lay.subject_text[0, b]].any(), f"subject {a} reads subject {b}'s phrase"
        assert torch.equal(rows[:, 0], own | context)  # own phrase + shared context, never padding
        assert not rows[:, :, ~lay.text_valid[0]].any()


def test_a_subject_with_no_words_still_has_somewhere_to_attend() -> None:
    lay = _layout(2)
    lay.subject_text[:] = False
    lay.subject_text[:, 0, : L - 4] = True  # subject 0 owns every real token; subject 1 owns none, context is empty
    allowed = subject_text_allowed(lay)
    assert allowed[:, 1].any(dim=1).all() and not allowed[:, 1, L - 4 :].any()


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_blocked_kernels_equal_the_dense_masked_specification(k: int) -> None:
    lay = _layout(k)
    g = torch.Generator().manual_seed(k)
    n = lay.n_total
    q, kk, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
    out, _ = blocked_self_attention(q, kk, v, lay)
    ref = dense_attention(q, kk, v, self_attention_mask(lay))
    assert out.shape == (B, H, n, D)
    assert torch.allclose(out, ref, atol=1e-5)
    tk, tv = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    out, _ = blocked_cross_attention(q, tk, tv, lay, mode="hard")
    ref = dense_attention(q, tk, tv, cross_attention_mask(lay))
    assert torch.allclose(out, ref, atol=1e-5)
    if k:  # the soft mode and the routing maps: blocked == dense specification, for both attentions
        for pool in (1, 2, 8):
            out, maps = blocked_cross_attention(q, tk, tv, lay, True, "soft", 0.1, pool)
            ref, ref_maps = dense_cross_attention(q, tk, tv, lay, True, "soft", 0.1, pool)
            assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(maps, ref_maps, atol=1e-5)
        out, maps = blocked_self_attention(q, kk, v, lay, routing=True)
        ref, ref_maps = dense_self_attention(q, kk, v, lay, routing=True)
        assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(maps, ref_maps, atol=1e-5)


def test_blocked_self_attention_isolates_subjects_numerically() -> None:
    """Changing subject 1's keys/values leaves subject 0's outputs bit-identical and changes the video's."""
    lay = _layout(3)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, lay.n_total, D, generator=g) for _ in range(3))
    base, _ = blocked_self_attention(q, k, v, lay)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, _group(lay, 1)] += 3.0
    v2[:, :, _group(lay, 1)] -= 2.0
    moved, _ = blocked_self_attention(q, k2, v2, lay)
    assert torch.equal(moved[:, :, _group(lay, 0)], base[:, :, _group(lay, 0)])
    assert torch.equal(moved[:, :, _group(lay, 2)], base[:, :, _group(lay, 2)])
    assert not torch.allclose(moved[:, :, :NV], base[:, :, :NV])


def _tiny(seed: int = 0, cross: str = "hard"):
    model, _ = build(ModelConfig(cross_attention=cross), seed)
    with torch.no_grad():  # non-zero group/slot embeddings so the test exercises them
        model.group_embed.normal_(generator=torch.Generator().manual_seed(5))
        model.slot_embed.normal_(generator=torch.Generator().manual_seed(6))
    return model.eval()


def _inputs(k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(B, 4, 3, 8, 8, generator=g)
    ts = torch.tensor([250.0, 750.0])
    text = torch.randn(B, L, 32, generator=g)
    refs = torch.randn(B, k, SLOTS, 4, 1, 4, 4, generator=g)
    lay = _layout(k)
    return lat, ts, text, refs, lay.ref_valid, lay.subject_text, lay.text_valid


def test_without_references_the_model_is_exactly_wan() -> None:
    model = _tiny()
    lat, ts, text, *_ = _inputs(0)
    with torch.no_grad():
        ours, captured = model(lat, ts, text)
        wan = model.transformer(lat, ts, text).sample
    assert torch.equal(ours, wan) and captured == []


@pytest.mark.parametrize("cross", ["hard", "soft"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_model_shapes_and_dense_equals_blocked(k: int, cross: str) -> None:
    model = _tiny(cross=cross)
    args = _inputs(k)
    with torch.no_grad():
        out, cap = model(*args, capture_layers={0, 1})
        model.ctx.dense = True
        dense, dense_cap = model(*args, capture_layers={0, 1})
        model.ctx.dense = False
    assert out.shape == args[0].shape
    assert [kind for kind, _ in cap] == ["self", "cross", "self", "cross"]
    for (_, maps), (_, ref) in zip(cap, dense_cap, strict=True):
        assert maps.shape == (B, H, 3 * 4 * 4, k)  # every head, every video token, every subject
        assert (maps >= 0).all() and (maps.sum(dim=-1) <= 1 + 1e-5).all()  # shares of one softmax
        assert torch.allclose(maps, ref, atol=1e-5)
    assert torch.allclose(out, dense, atol=1e-5)


def _probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention probabilities written out (the test's own softmax, not the kernels')."""
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    s = s + mask if mask.dtype != torch.bool else s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1)


def test_routing_maps_are_each_subjects_share_of_the_attention() -> None:
    lay = _layout(3)
    g = torch.Generator().manual_seed(3)
    q, kk, v = (torch.randn(B, H, lay.n_total, D, generator=g) for _ in range(3))
    _, maps = blocked_self_attention(q, kk, v, lay, routing=True)
    p = _probs(q, kk, self_attention_mask(lay)[:, None])[:, :, :NV]
    for s in range(3):
        assert torch.allclose(maps[..., s], p[..., _group(lay, s)].sum(-1), atol=1e-5)
    tk, tv = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    _, maps = blocked_cross_attention(q, tk, tv, lay, routing=True)
    p = (q[:, :, :NV] @ tk.transpose(-1, -2) * D**-0.5).softmax(-1)  # video rows read the whole caption
    for s in range(3):
        assert torch.allclose(maps[..., s], p[..., lay.subject_text[0, s]].sum(-1), atol=1e-5)


def test_soft_template_raises_own_words_and_lowers_the_others() -> None:
    lay = _layout(3)
    lay.ref_valid[1, 2] = False  # sample 1: subject 2 is batch padding (no image)
    t = soft_text_template(lay)
    for s in range(3):
        own = lay.subject_text[0, s]
        assert (t[0, s, own] == 1).all()
        for o in range(3):
            if o != s:
                assert torch.allclose(t[0, s, lay.subject_text[0, o]], torch.tensor(-0.5))  # two others: -1/2
    context = lay.context_text()[0]
    assert (t[:, :, context] == 0).all() and (t[:, :, ~lay.text_valid[0]] == 0).all()
    # sample 1 has two present subjects: each other's words at -1; the absent subject's words count for nobody
    assert (t[1, 0, lay.subject_text[1, 1]] == -1).all() and (t[1, 0, lay.subject_text[1, 2]] == 0).all()
    assert (t[1, 2] == 0).all()


def test_soft_bias_is_ratio_times_pooled_score_times_template_and_keeps_every_word() -> None:
    lay = _layout(2)
    lay.ref_grid = (PER_SLOT, 1)
    g = torch.Generator().manual_seed(4)
    nr = lay.n_ref
    qr, tk = torch.randn(B, H, nr, D, generator=g), torch.randn(B, H, L, D, generator=g)
    tmpl = soft_text_template(lay).repeat_interleave(lay.group_size, dim=1)[:, None]
    bias = soft_cross_bias(qr, tk, lay, 0.1, pool=1)
    want = 0.1 * (qr @ tk.transpose(-1, -2) * D**-0.5).abs() * tmpl
    valid = lay.text_valid[:, None, None, :].expand_as(want)
    assert torch.allclose(bias[valid], want[valid], atol=1e-6) and torch.isinf(bias[~valid]).all()
    # pool >= the image: each image's queries are replaced by their mean before scoring
    pooled = qr.reshape(B, H, 2 * SLOTS, PER_SLOT, D).mean(3, keepdim=True).expand(-1, -1, -1, PER_SLOT, -1)
    want = 0.1 * (pooled.reshape(B, H, nr, D) @ tk.transpose(-1, -2) * D**-0.5).abs() * tmpl
    assert torch.allclose(soft_cross_bias(qr, tk, lay, 0.1, pool=8)[valid], want[valid], atol=1e-5)
    # read through the kernel with V = identity: attention probabilities of every row
    q = torch.randn(B, H, lay.n_total, D, generator=g)
    eye = torch.eye(L).expand(B, H, L, L)
    soft, _ = blocked_cross_attention(q, tk, eye, lay, mode="soft", ratio=0.5, pool=1)
    hard, _ = blocked_cross_attention(q, tk, eye, lay, mode="hard")
    plain = _probs(q, tk, torch.zeros(1))  # unbiased, padding included: what the video rows read (as Wan)
    refs = slice(NV, None)
    real = lay.text_valid[0]
    assert (soft[:, :, refs][..., real] > 0).all() and (soft[:, :, refs][..., ~real] == 0).all()  # every real word
    assert (hard[:, :, _group(lay, 0)][..., lay.subject_text[0, 1]] == 0).all()  # hard: B's words unreadable
    assert torch.allclose(soft[:, :, :NV], plain[:, :, :NV], atol=1e-6)  # video rows unbiased
    for s, o in ((0, 1), (1, 0)):
        rows = _group(lay, s)
        own, other = lay.subject_text[0, s], lay.subject_text[0, o]
        unbiased = _probs(q[:, :, rows], tk, lay.text_valid[:, None, None, :])  # same rows, padding masked
        assert (soft[:, :, rows][..., own].sum(-1) > unbiased[..., own].sum(-1)).all()
        assert (soft[:, :, rows][..., other].sum(-1) < unbiased[..., other].sum(-1)).all()


def test_each_crop_of_a_subject_has_its_own_rope_positions() -> None:
    f, h, w, rh, rw = 3, 4, 5, 2, 3
    p = token_positions((f, h, w), 2, (rh, rw), slots=2)
    nv, per = f * h * w, rh * rw
    assert p.shape == (nv + 2 * 2 * per, 3)
    assert p[:nv].tolist() == [[a, b, c] for a in range(f) for b in range(h) for c in range(w)]
    for k in range(2):
        crop0 = p[nv + 2 * k * per : nv + (2 * k + 1) * per]
        crop1 = p[nv + (2 * k + 1) * per : nv + (2 * k + 2) * per]
        assert (crop0[:, 0] == f + k).all() and (crop1[:, 0] == f + k).all()  # one frame per subject
        assert crop0[:, 1:].tolist() == [[a, b] for a in range(rh) for b in range(rw)]
        assert torch.equal(crop1[:, 1:], crop0[:, 1:] + torch.tensor([rh, rw]))  # face crop shifted diagonally
        assert len({tuple(x) for x in torch.cat([crop0, crop1]).tolist()}) == 2 * per  # no shared position


def _ref_states(model, args) -> torch.Tensor:
    """Hidden states of every token after the last block (via a hook)."""
    seen: list[torch.Tensor] = []
    h = model.transformer.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        h.remove()
    return seen[-1]


def test_through_every_layer_subject_a_never_sees_subject_b() -> None:
    """End to end over both blocks: changing subject B's reference images or B's caption phrase leaves subject
    A's reference tokens unchanged; changing A's phrase changes them (A's text binds to A's references)."""
    model = _tiny(cross="hard")
    lat, ts, text, refs, rv, st, tv = _inputs(3)
    nv = 3 * 4 * 4
    group = SLOTS * 4  # 2 slots x (4/2 x 4/2) tokens
    a = slice(nv, nv + group)
    base = _ref_states(model, (lat, ts, text, refs, rv, st, tv))
    refs_b = refs.clone()
    refs_b[:, 1] += 1.5
    assert torch.equal(_ref_states(model, (lat, ts, text, refs_b, rv, st, tv))[:, a], base[:, a])
    phrase_b = st[0, 1]
    text_b = text.clone()
    text_b[:, phrase_b] += 2.0
    moved_b = _ref_states(model, (lat, ts, text_b, refs, rv, st, tv))
    assert torch.equal(moved_b[:, a], base[:, a])
    assert not torch.allclose(moved_b[:, :nv], base[:, :nv])  # the video does read B's words
    text_a = text.clone()
    text_a[:, st[0, 0]] += 2.0
    assert not torch.allclose(_ref_states(model, (lat, ts, text_a, refs, rv, st, tv))[:, a], base[:, a])


def test_soft_mode_keeps_references_apart_but_lets_them_read_every_word() -> None:
    """Soft cross-attention (LumosX): B's images still never reach A's references (self-attention rule), but B's
    words do (every word stays readable, only reweighted)."""
    model = _tiny(cross="soft")
    lat, ts, text, refs, rv, st, tv = _inputs(3)
    a = slice(3 * 4 * 4, 3 * 4 * 4 + SLOTS * 4)
    base = _ref_states(model, (lat, ts, text, refs, rv, st, tv))
    refs_b = refs.clone()
    refs_b[:, 1] += 1.5
    assert torch.equal(_ref_states(model, (lat, ts, text, refs_b, rv, st, tv))[:, a], base[:, a])
    text_b = text.clone()
    text_b[:, st[0, 1]] += 2.0
    assert not torch.allclose(_ref_states(model, (lat, ts, text_b, refs, rv, st, tv))[:, a], base[:, a])
