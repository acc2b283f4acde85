"""A Wan2.1 DiT (diffusers' `WanTransformer3DModel`) conditioned on per-subject references through relational
attention, with the frozen `AutoencoderKLWan` and umT5 text encoder around it.

How references enter the model: each subject's crops (masked subject, face) are VAE-encoded as one-frame videos and
patch-embedded with the DiT's own patch embedding, then appended to the video tokens. Every token runs through the
unchanged Wan blocks; only the attention processors differ (`RelationalProcessor`, rules in
`curation.train.relational`). Subject k's tokens get RoPE positions on a frame of their own after the video
(t = frames + k: groups are far apart in time and cohesive inside; its face crop shifted diagonally in (h, w) from
its subject crop, as LumosX does: `token_positions`), plus a learned group embedding and slot embedding (both
zero-initialised, so with no references the model is exactly the pretrained Wan; a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from curation.errors import ConfigError
from curation.train.config import ModelConfig
from curation.train.relational import (
    Layout,
    blocked_cross_attention,
    blocked_self_attention,
    dense_cross_attention,
    dense_self_attention,
)


class RelationalContext:
    """What the attention processors of one forward pass share: the token layout and the mask-loss capture."""

    def __init__(self, cross_mode: str = "hard", soft_ratio: float = 0.1, soft_pool: int = 8) -> None:
        self.layout: Layout | None = None
        self.capture_layers: set[int] = set()
        self.captured: list[tuple[str, torch.Tensor]] = []
        self.dense = False  # run the dense masked specification instead of the blocked kernels (tests, bench)
        self.cross_mode, self.soft_ratio, self.soft_pool = cross_mode, soft_ratio, soft_pool


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved-pair RoPE. x: [B, N, H, D]; cos/sin: [1, N, 1, D] (repeat-interleaved)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return out.type_as(x)


class RelationalProcessor:
    """Attention processor for a Wan block's attn1 (self) or attn2 (cross) that applies the relational rules.

    Without a layout (no references) it computes exactly what diffusers' `WanAttnProcessor` computes.
    """

    def __init__(self, ctx: RelationalContext, cross: bool, layer: int) -> None:
        self.ctx, self.cross, self.layer = ctx, cross, layer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        src = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(src)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(src).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, N, D]
        lay, ctx = self.ctx.layout, self.ctx
        if lay is None or lay.n_subjects == 0:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            routing = self.layer in ctx.capture_layers
            if self.cross:
                fn = dense_cross_attention if ctx.dense else blocked_cross_attention
                out, maps = fn(q, k, v, lay, routing, ctx.cross_mode, ctx.soft_ratio, ctx.soft_pool)
            else:
                out, maps = (dense_self_attention if ctx.dense else blocked_self_attention)(q, k, v, lay, routing)
            if maps is not None:
                ctx.captured.append(("cross" if self.cross else "self", maps))
        out = out.transpose(1, 2).flatten(2).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def token_positions(grid: tuple[int, int, int], n_subjects: int, ref_grid: tuple[int, int], slots: int) -> torch.Tensor:
    """[N, 3] RoPE (t, h, w) positions of the video tokens followed by each subject's reference tokens.

    Video token (f, h, w) -> (f, h, w). Subject k takes the frame after the video plus k (t = F + k), as LumosX
    does; within it, its image s (0: subject crop, 1: face crop) is shifted diagonally by s image sizes,
    (h + s * rh, w + s * rw), so two crops of one subject never share a position.
    """
    f, h, w = grid
    tf, th, tw = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    pos = [torch.stack([tf.flatten(), th.flatten(), tw.flatten()], dim=1)]
    rh, rw = ref_grid
    gh, gw = torch.meshgrid(torch.arange(rh), torch.arange(rw), indexing="ij")
    one = torch.stack([gh.flatten(), gw.flatten()], dim=1)
    group = torch.cat([one + torch.tensor([s * rh, s * rw]) for s in range(slots)])
    for k in range(n_subjects):
        pos.append(torch.cat([torch.full((group.shape[0], 1), f + k), group], dim=1))
    return torch.cat(pos)


@dataclass
class Encoders:
    """The frozen parts: VAE, text encoder, tokenizer."""

    vae: Any
    text_encoder: Any
    tokenizer: Any


class RelationalWan(nn.Module):
    """WanTransformer3DModel + reference tokens + relational attention."""

    def __init__(
        self,
        transformer: Any,
        max_subjects: int,
        slots: int,
        cross_mode: str = "hard",
        soft_ratio: float = 0.1,
        soft_pool: int = 8,
    ) -> None:
        super().__init__()
        if transformer.config.added_kv_proj_dim is not None or transformer.config.image_dim is not None:
            raise ConfigError(
                "the relational trainer takes a Wan2.1 T2V transformer; image-conditioned I2V is not supported"
            )
        self.transformer = transformer
        dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        self.group_embed = nn.Parameter(torch.zeros(max(1, max_subjects), dim))
        self.slot_embed = nn.Parameter(torch.zeros(slots, dim))
        self.ctx = RelationalContext(cross_mode, soft_ratio, soft_pool)
        self.gradient_checkpointing = False
        for i, block in enumerate(transformer.blocks):
            block.attn1.set_processor(RelationalProcessor(self.ctx, cross=False, layer=i))
            block.attn2.set_processor(RelationalProcessor(self.ctx, cross=True, layer=i))

    @property
    def patch(self) -> tuple[int, int, int]:
        return tuple(self.transformer.config.patch_size)  # type: ignore[return-value]

    def rope(self, grid: tuple[int, int, int], n_subjects: int, ref_grid: tuple[int, int], slots: int) -> Any:
        """cos/sin [1, N, 1, D] for the video grid followed by n_subjects groups of reference tokens
        (positions from `token_positions`)."""
        r = self.transformer.rope
        p = token_positions(grid, n_subjects, ref_grid, slots).to(r.freqs_cos.device)
        if int(p.max()) >= r.freqs_cos.shape[0]:
            raise ConfigError(f"positions up to {int(p.max())} exceed the RoPE table ({r.freqs_cos.shape[0]})")
        sizes = [r.t_dim, r.h_dim, r.w_dim]
        cos = torch.cat([c[p[:, i]] for i, c in enumerate(r.freqs_cos.split(sizes, dim=1))], dim=1)
        sin = torch.cat([s[p[:, i]] for i, s in enumerate(r.freqs_sin.split(sizes, dim=1))], dim=1)
        return cos[None, :, None, :], sin[None, :, None, :]

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text_states: torch.Tensor,
        ref_latents: torch.Tensor | None = None,
        ref_valid: torch.Tensor | None = None,
        subject_text: torch.Tensor | None = None,
        text_valid: torch.Tensor | None = None,
        capture_layers: set[int] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
        """latents [B, C, F, H, W]; ref_latents [B, K, S, C, 1, h, w] with ref_valid [B, K, S]; subject_text
        [B, K, L] (caption tokens of each subject's phrase); text_valid [B, L].

        Returns the prediction for the video latents and, for each attention of each captured block, ("self" or
        "cross", routing maps [B, H, Nv, K]): each head's share of every video token's attention on each subject's
        references (self) or words (cross)."""
        t = self.transformer
        b, _, f, h, w = latents.shape
        pt, ph, pw = self.patch
        grid = (f // pt, h // ph, w // pw)
        tokens = t.patch_embedding(latents).flatten(2).transpose(1, 2)
        n_video = tokens.shape[1]
        k = 0 if ref_latents is None else int(ref_latents.shape[1])
        ref_grid, slots = (1, 1), 1
        layout: Layout | None = None
        if k:
            assert ref_latents is not None and ref_valid is not None and subject_text is not None
            _, _, s, c, _, rh, rw = ref_latents.shape
            r = t.patch_embedding(ref_latents.reshape(b * k * s, c, 1, rh, rw)).flatten(2).transpose(1, 2)
            ref_grid = (rh // ph, rw // pw)
            r = r.reshape(b, k, s, -1, r.shape[-1])
            if text_valid is None:
                text_valid = torch.ones(b, text_states.shape[1], dtype=torch.bool, device=latents.device)
            layout = Layout(n_video, k, s, r.shape[3], ref_valid, subject_text, text_valid, ref_grid)
            slots = s
            r = r + self.group_embed[:k, None, None, :].to(r.dtype) + self.slot_embed[None, :s, None, :].to(r.dtype)
            tokens = torch.cat([tokens, r.reshape(b, -1, r.shape[-1])], dim=1)
        tokens = tokens.contiguous()
        rope = self.rope(grid, k, ref_grid, slots)
        temb, proj, text, _ = t.condition_embedder(timestep, text_states, None)
        proj = proj.unflatten(1, (6, -1))

        capture = set(capture_layers or ()) if layout else set()
        captured: list[tuple[str, torch.Tensor]] = []
        for block in t.blocks:
            args = (block, tokens, text, proj, rope, layout, capture)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens, *cap = checkpoint(self._block, *args, use_reentrant=False)
            else:
                tokens, *cap = self._block(*args)
            captured.extend(zip(cap[0::2], cap[1::2], strict=True))

        video = tokens[:, :n_video]
        shift, scale = (t.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        video = (t.norm_out(video.float()) * (1 + scale) + shift).type_as(video)
        video = t.proj_out(video)
        video = video.reshape(b, *grid, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return video.flatten(6, 7).flatten(4, 5).flatten(2, 3), captured

    def _block(
        self,
        block: Any,
        tokens: torch.Tensor,
        text: torch.Tensor,
        proj: torch.Tensor,
        rope: Any,
        layout: Layout | None,
        capture: set[int],
    ) -> Any:
        """One Wan block; returns its output and what its processors captured.

        The layout and capture settings are arguments, not state left on the context, so that gradient
        checkpointing's recomputation in backward runs exactly the forward it replaces.
        """
        self.ctx.layout, self.ctx.capture_layers = layout, capture
        self.ctx.captured = []
        try:
            out = block(tokens, text, proj, rope)
            # flat (kind, maps, kind, maps, ...): checkpoint() passes tensors through, and strings ride along
            return (out, *(x for kind, maps in self.ctx.captured for x in (kind, maps)))
        finally:
            self.ctx.layout, self.ctx.captured = None, []


def relational(dit: Any, cfg: ModelConfig) -> RelationalWan:
    """Wrap a Wan transformer with the reference tokens and attention rules `cfg` asks for."""
    return RelationalWan(
        dit, cfg.max_subjects, 2 if cfg.face_refs else 1, cfg.cross_attention, cfg.soft_ratio, cfg.soft_pool
    )


def build_tiny(cfg: ModelConfig, seed: int, vocab_size: int) -> tuple[RelationalWan, Encoders]:
    """Random-init tiny Wan DiT, Wan VAE and umT5 encoder (deterministic from `seed`)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from curation.train.text import ByteTokenizer

    d = cfg.tiny
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        vae = AutoencoderKLWan(
            base_dim=d.vae_base_dim,
            z_dim=d.z_dim,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * d.z_dim,
            latents_std=[1.0] * d.z_dim,
        )
        te = UMT5EncoderModel(
            UMT5Config(
                vocab_size=vocab_size,
                d_model=d.text_dim,
                d_kv=d.text_dim // d.text_heads,
                d_ff=2 * d.text_dim,
                num_layers=d.text_layers,
                num_heads=d.text_heads,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
        dit = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=d.heads,
            attention_head_dim=d.head_dim,
            in_channels=d.z_dim,
            out_channels=d.z_dim,
            text_dim=d.text_dim,
            freq_dim=d.freq_dim,
            ffn_dim=d.ffn_dim,
            num_layers=d.layers,
            rope_max_seq_len=256,
        )
    finally:
        torch.random.set_rng_state(gen_state)
    return relational(dit, cfg), Encoders(vae, te, ByteTokenizer())


def build_pretrained(cfg: ModelConfig) -> tuple[RelationalWan, Encoders]:
    """Wan2.1-T2V weights from a diffusers-format folder (transformer/, vae/, text_encoder/, tokenizer/)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from curation.train.text import HFTokenizer

    cfg.check_weights()
    root = str(cfg.path)
    dit = WanTransformer3DModel.from_pretrained(root, subfolder="transformer")
    vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae")
    te = UMT5EncoderModel.from_pretrained(root, subfolder="text_encoder")
    return relational(dit, cfg), Encoders(vae, te, HFTokenizer(f"{root}/tokenizer"))


def build(cfg: ModelConfig, seed: int) -> tuple[RelationalWan, Encoders]:
    from curation.train.text import ByteTokenizer

    if cfg.kind == "tiny":
        return build_tiny(cfg, seed, ByteTokenizer.vocab_size)
    return build_pretrained(cfg)
