"""Relational attention: the masks say who may attend to whom, the blocked kernels obey them, and the whole tiny
model keeps subjects apart end to end (1-4 subjects)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from curation.train.config import ModelConfig  # noqa: E402
from curation.train.model import build  # noqa: E402
from curation.train.relational import (  # noqa: E402
    Layout,
    blocked_cross_attention,
    blocked_self_attention,
    cross_attention_mask,
    dense_attention,
    self_attention_mask,
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
    out = blocked_self_attention(q, kk, v, lay)
    ref = dense_attention(q, kk, v, self_attention_mask(lay))
    assert out.shape == (B, H, n, D)
    assert torch.allclose(out, ref, atol=1e-5)
    tk, tv = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    out = blocked_cross_attention(q, tk, tv, lay)
    ref = dense_attention(q, tk, tv, cross_attention_mask(lay))
    assert torch.allclose(out, ref, atol=1e-5)


def test_blocked_self_attention_isolates_subjects_numerically() -> None:
    """Changing subject 1's keys/values leaves subject 0's outputs bit-identical and changes the video's."""
    lay = _layout(3)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, lay.n_total, D, generator=g) for _ in range(3))
    base = blocked_self_attention(q, k, v, lay)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, _group(lay, 1)] += 3.0
    v2[:, :, _group(lay, 1)] -= 2.0
    moved = blocked_self_attention(q, k2, v2, lay)
    assert torch.equal(moved[:, :, _group(lay, 0)], base[:, :, _group(lay, 0)])
    assert torch.equal(moved[:, :, _group(lay, 2)], base[:, :, _group(lay, 2)])
    assert not torch.allclose(moved[:, :, :NV], base[:, :, :NV])


def _tiny(seed: int = 0):
    model, _ = build(ModelConfig(), seed)
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


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_model_shapes_and_dense_equals_blocked(k: int) -> None:
    model = _tiny()
    args = _inputs(k)
    with torch.no_grad():
        out, cap = model(*args, capture_layers={0, 1}, mask_queries=20)
        model.ctx.dense = True
        dense, _ = model(*args)
        model.ctx.dense = False
    assert out.shape == args[0].shape
    assert len(cap) == 2 and cap[0].shape == (B, k, 20)
    assert (cap[0] >= 0).all() and (cap[0].sum(dim=1) <= 1 + 1e-5).all()  # shares of one softmax
    assert torch.allclose(out, dense, atol=1e-5)


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
    model = _tiny()
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
