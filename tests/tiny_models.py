"""Tiny random-init DiTs (diffusers and plain PyTorch) with input builders, shared by the tests.

Each factory returns (model, make_inputs) where make_inputs(batch, size, step, seed) gives the kwargs of one
denoising call; ``size`` scales the token grid so a new resolution is one argument away.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def flux(num_layers=1, num_single_layers=1):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=num_layers,
                                   num_single_layers=num_single_layers, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                   axes_dims_rope=(4, 6, 6)).eval()

    def make_inputs(batch=1, size=8, step=0, seed=0, latents=None):
        g = _gen(seed)
        n = size * size
        ids = torch.zeros(n, 3)
        ids[:, 1] = torch.arange(size).repeat_interleave(size)
        ids[:, 2] = torch.arange(size).repeat(size)
        return dict(hidden_states=latents if latents is not None else torch.randn(batch, n, 4, generator=g),
                    encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
                    pooled_projections=torch.randn(batch, 32, generator=g),
                    timestep=torch.full((batch,), 1.0 - step / 50), img_ids=ids, txt_ids=torch.zeros(5, 3),
                    return_dict=False)
    return model, make_inputs


def sd3():
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                  pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16).eval()

    def make_inputs(batch=1, size=8, step=0, seed=0, latents=None):
        g = _gen(seed)
        return dict(hidden_states=latents if latents is not None else torch.randn(batch, 4, size, size, generator=g),
                    encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                    pooled_projections=torch.randn(batch, 32, generator=g),
                    timestep=torch.full((batch,), 1000.0 - step * 20), return_dict=False)
    return model, make_inputs


def wan():
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1,
                                  rope_max_seq_len=32).eval()

    def make_inputs(batch=1, size=8, step=0, seed=0, latents=None):
        g = _gen(seed)
        return dict(hidden_states=latents if latents is not None else torch.randn(batch, 4, 2, size, size, generator=g),
                    encoder_hidden_states=torch.randn(batch, 7, 32, generator=g),
                    timestep=torch.full((batch,), 1000.0 - step * 20), return_dict=False)
    return model, make_inputs


def hunyuan_video():
    from diffusers import HunyuanVideoTransformer3DModel
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                           patch_size_t=1, text_embed_dim=32, pooled_projection_dim=32,
                                           guidance_embeds=True, rope_axes_dim=(4, 6, 6)).eval()

    def make_inputs(batch=1, size=8, step=0, seed=0, latents=None):
        g = _gen(seed)
        return dict(hidden_states=latents if latents is not None else torch.randn(batch, 4, 2, size, size, generator=g),
                    encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                    # The last text tokens are padding (sample b: 1 + b of them): a key-padding attention mask.
                    encoder_attention_mask=(torch.arange(6)[None, :] < 5 - torch.arange(batch)[:, None]).long(),
                    pooled_projections=torch.randn(batch, 32, generator=g),
                    timestep=torch.full((batch,), 1000.0 - step * 20), guidance=torch.full((batch,), 3.5),
                    return_dict=False)
    return model, make_inputs


def pixart():
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                     num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=32,
                                     caption_channels=32, norm_type="ada_norm_single",
                                     use_additional_conditions=False).eval()

    def make_inputs(batch=1, size=8, step=0, seed=0, latents=None):
        g = _gen(seed)
        return dict(hidden_states=latents if latents is not None else torch.randn(batch, 4, size, size, generator=g),
                    encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                    timestep=torch.full((batch,), 1000.0 - step * 20, dtype=torch.long), return_dict=False)
    return model, make_inputs


def cogvideox():
    from diffusers import CogVideoXTransformer3DModel
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                        num_layers=1, sample_width=8, sample_height=8, sample_frames=5,
                                        patch_size=2, text_embed_dim=32, time_embed_dim=32, max_text_seq_length=6,
                                        temporal_compression_ratio=4).eval()

    def make_inputs(batch=1, size=8, step=0, seed=0, latents=None):
        g = _gen(seed)
        return dict(hidden_states=latents if latents is not None else torch.randn(batch, 2, 4, size, size, generator=g),
                    encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                    timestep=torch.full((batch,), 999 - step * 20, dtype=torch.long), return_dict=False)
    return model, make_inputs


class PlainBlock(nn.Module):
    """A DiT block written by hand: manual softmax attention, GQA SDPA cross-check, SwiGLU MLP."""

    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.w_gate, self.w_up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim)
        self.ada = nn.Linear(dim, 2 * dim)

    def forward(self, x, c):
        shift, scale = self.ada(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm1(x) * (1 + scale) + shift
        B, N, C = h.shape
        q, k, v = self.qkv(h).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * (1.0 / math.sqrt(C // self.heads)), dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        h = self.norm2(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class PlainDiT(nn.Module):
    def __init__(self, in_ch=4, dim=32, heads=2, depth=2, hidden=64):
        super().__init__()
        self.embed = nn.Linear(in_ch, dim)
        self.t_embed = nn.Sequential(nn.Linear(1, dim), nn.GELU(), nn.Linear(dim, dim))  # not a site
        self.blocks = nn.ModuleList(PlainBlock(dim, heads, hidden) for _ in range(depth))
        self.out = nn.Linear(dim, in_ch)

    def forward(self, x, t):
        c = self.t_embed(t[:, None])
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h)


def plain_dit(depth=2):
    torch.manual_seed(0)
    model = PlainDiT(depth=depth).eval()

    def make_inputs(batch=1, size=8, step=0, seed=0, latents=None):
        g = _gen(seed)
        return dict(x=latents if latents is not None else torch.randn(batch, size * size, 4, generator=g),
                    t=torch.full((batch,), 1.0 - step / 50))
    return model, make_inputs


FACTORIES = {"flux": flux, "sd3": sd3, "wan": wan, "hunyuan_video": hunyuan_video, "pixart": pixart,
             "cogvideox": cogvideox, "plain_dit": plain_dit}
