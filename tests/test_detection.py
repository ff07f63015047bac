"""Site detection on real DiT graphs: the sites found are the ones the architecture has."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import chipmunk_compile
import tiny_models
from helpers import compile_chipmunk, rel_err

# (attention sites rewritten, attention sites left dense, mlp sites rewritten, mlp sites left dense) per tiny
# config; every site left dense has a reason, and every site in a transformer block a layer
EXPECTED = {
    "flux": (2, 0, 3, 0),            # double block joint attn + single block attn; ff, ff_context, fused proj_out
    "sd3": (1, 0, 1, 0),             # one joint block (last block: context_pre_only, no ff_context)
    "wan": (1, 1, 1, 0),             # self-attn rewritten, cross-attn to text left dense; ffn
    "hunyuan_video": (2, 1, 3, 1),   # double + single block attention (key-padding mask); ff, ff_context, fused
                                     # proj_out; the text refiner block (attention + SiLU MLP, text tokens only)
                                     # is a conditioning stack, not a layer: left dense
    "pixart": (1, 1, 1, 0),          # self-attn, cross-attn left dense, ff
    "cogvideox": (1, 0, 1, 0),       # joint attention, ff
    "plain_dit": (2, 0, 2, 0),       # hand-written softmax attention, SwiGLU with separate gate/up linears
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_sites_per_architecture(name):
    model, make_inputs = tiny_models.FACTORIES[name]()
    report = chipmunk_compile.explain(model, options={"first_dense_layers": 0}, **make_inputs())
    attn_ok, attn_dense, mlp_ok, mlp_dense = EXPECTED[name]
    assert report.count("attention", rewritten=True) == attn_ok, str(report)
    assert report.count("attention", rewritten=False) == attn_dense, str(report)
    assert report.count("mlp", rewritten=True) == mlp_ok, str(report)
    assert report.count("mlp", rewritten=False) == mlp_dense, str(report)
    for site in report.sites:
        assert site.rewritten == (site.reason == "")
        assert site.module and (site.layer is not None or "refiner" in site.module)


def test_reasons_and_layers():
    model, make_inputs = tiny_models.wan()
    report = chipmunk_compile.explain(model, **make_inputs())
    cross = [s for s in report.sites if s.module.endswith("attn2")]
    assert "cross-attention" in cross[0].reason
    # first_dense_layers=2 (default) keeps layer 0 dense: nothing rewritten in a 1-layer model
    assert all(not s.rewritten for s in report.sites)
    assert any("first_dense_layers" in s.reason for s in report.sites)
    hunyuan, hunyuan_inputs = tiny_models.hunyuan_video()
    masked = chipmunk_compile.explain(hunyuan, options={"first_dense_layers": 0}, **hunyuan_inputs())
    attention = {s.module: s for s in masked.sites if s.kind == "attention"}
    assert "key-padding" in attention["context_embedder.token_refiner.refiner_blocks.0.attn"].reason
    assert attention["transformer_blocks.0.attn"].rewritten and attention["single_transformer_blocks.0.attn"].rewritten


def test_flux_layers_count_double_and_single_blocks():
    model, make_inputs = tiny_models.flux(num_layers=2, num_single_layers=2)
    report = chipmunk_compile.explain(model, options={"first_dense_layers": 3}, **make_inputs())
    layers = {s.module.split(".attn")[0]: s.layer for s in report.sites if s.kind == "attention"}
    assert layers == {"transformer_blocks.0": 0, "transformer_blocks.1": 1, "single_transformer_blocks.0": 2,
                      "single_transformer_blocks.1": 3}
    assert [s.rewritten for s in report.sites if s.kind == "attention"] == [False, False, False, True]
    static = [s.details["static_columns"] for s in report.sites if s.kind == "attention" and s.rewritten]
    assert static == [[0, 5]]  # the 5 text tokens in front of the image tokens


class GatedBlock(nn.Module):
    """diffusers FeedForward variants (GEGLU, SwiGLU chunked projections) and SDPA with GQA."""

    def __init__(self, act):
        super().__init__()
        from diffusers.models.attention import FeedForward
        self.ff = FeedForward(32, mult=2, activation_fn=act)
        self.q, self.kv = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, 4, 8).transpose(1, 2)
        k, v = self.kv(x).view(B, N, 2, 2, 8).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return x + self.ff(x + o.transpose(1, 2).reshape(B, N, 32))


class GatedNet(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.blocks = nn.ModuleList([GatedBlock(act), GatedBlock(act)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("act", ["geglu", "swiglu", "gelu", "gelu-approximate"])
def test_gated_and_gqa_sites(act):
    torch.manual_seed(0)
    report = chipmunk_compile.explain(GatedNet(act).eval(), torch.randn(1, 40, 32),
                                      options={"first_dense_layers": 0})
    assert report.count("attention", rewritten=True) == 2, str(report)
    assert report.count("mlp", rewritten=True) == 2, str(report)
    mlp = [s for s in report.sites if s.kind == "mlp"][0]
    assert mlp.details["gated"] == (act in ("geglu", "swiglu"))


def test_embedder_mlp_is_not_a_site():
    model, make_inputs = tiny_models.plain_dit()
    report = chipmunk_compile.explain(model, options={"first_dense_layers": 0}, **make_inputs())
    assert not any(s.module.startswith("t_embed") for s in report.sites)


class _Stage(nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.blocks = nn.ModuleList(tiny_models.PlainBlock(32, 2, 64) for _ in range(depth))

    def forward(self, h, c):
        for block in self.blocks:
            h = block(h, c)
        return h


class _StagedDiT(tiny_models.PlainDiT):
    """stages[i].blocks[j], as hourglass / multi-stage DiTs nest them."""

    def __init__(self):
        super().__init__(depth=1)
        del self.blocks
        self.stages = nn.ModuleList([_Stage(3), _Stage(3)])

    def forward(self, x, t):
        c = self.t_embed(t[:, None])
        h = self.embed(x)
        for stage in self.stages:
            h = stage(h, c)
        return self.out(h)


class _Wrapper(nn.Module):
    """A pipeline-style holder keeping the transformer in a one-element list."""

    def __init__(self, inner):
        super().__init__()
        self.models = nn.ModuleList([inner])

    def forward(self, x, t):
        return self.models[0](x, t)


@pytest.mark.parametrize("layout", ["staged", "wrapped"])
def test_layers_count_the_innermost_block_lists(layout):
    torch.manual_seed(0)
    _, make_inputs = tiny_models.plain_dit()
    model = (_StagedDiT() if layout == "staged" else _Wrapper(tiny_models.PlainDiT(depth=4))).eval()
    report = chipmunk_compile.explain(model, **make_inputs())
    attention = [s for s in report.sites if s.kind == "attention"]
    assert [s.layer for s in attention] == list(range(len(attention))), [(s.module, s.layer) for s in attention]
    # first_dense_layers=2 (default) keeps exactly the first two blocks dense.
    assert [s.rewritten for s in attention] == [False, False] + [True] * (len(attention) - 2)


def test_flux_layers_with_one_single_block():
    model, make_inputs = tiny_models.flux(num_layers=2, num_single_layers=1)
    report = chipmunk_compile.explain(model, options={"first_dense_layers": 0}, **make_inputs())
    layers = {s.module.split(".attn")[0]: s.layer for s in report.sites if s.kind == "attention"}
    assert layers == {"transformer_blocks.0": 0, "transformer_blocks.1": 1, "single_transformer_blocks.0": 2}


@pytest.mark.parametrize("refiner_blocks", [1, 2])
def test_text_refiner_blocks_are_not_layers(refiner_blocks):
    """HunyuanVideo's text refiner (two blocks inside context_embedder, text tokens only, before the transformer)
    is a conditioning stack: counted as layers 0-1 it took first_dense_layers=2 and left the transformer's first
    blocks sparse."""
    from diffusers import HunyuanVideoTransformer3DModel
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                           num_layers=2, num_single_layers=1, num_refiner_layers=refiner_blocks,
                                           patch_size=2,
                                           patch_size_t=1, text_embed_dim=32, pooled_projection_dim=32,
                                           guidance_embeds=True, rope_axes_dim=(4, 6, 6)).eval()
    _, make_inputs = tiny_models.hunyuan_video()
    report = chipmunk_compile.explain(model, options={"first_dense_layers": 2}, **make_inputs())
    refiner = [s for s in report.sites if ".refiner_blocks." in s.module]
    assert len(refiner) == 2 * refiner_blocks and all(s.layer is None and not s.rewritten for s in refiner)
    assert all("text refiner" in s.reason for s in refiner if s.kind == "mlp")  # (attention: its mask's reason)
    layers = {s.module.split(".attn")[0]: (s.layer, s.rewritten) for s in report.sites
              if s.kind == "attention" and s not in refiner}
    assert layers == {"transformer_blocks.0": (0, False), "transformer_blocks.1": (1, False),
                      "single_transformer_blocks.0": (2, True)}


def test_three_layer_mlp_is_one_site_not_two_overlapping():
    class DeepMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 32)

        def forward(self, x):
            return self.c(F.gelu(self.b(F.gelu(self.a(x)))))

    class DeepBlock(tiny_models.PlainBlock):
        def __init__(self):
            super().__init__(32, 2, 64)
            self.deep = DeepMLP()

        def forward(self, x, c):
            return x + self.deep(self.norm2(x))

    torch.manual_seed(0)
    model = tiny_models.PlainDiT(depth=2).eval()
    model.blocks = nn.ModuleList([DeepBlock(), DeepBlock()]).eval()
    _, make_inputs = tiny_models.plain_dit()
    report = chipmunk_compile.explain(model, options={"first_dense_layers": 0}, **make_inputs())
    mlp = [s for s in report.sites if s.kind == "mlp"]
    assert [s.module.rsplit(".", 1)[-1] for s in mlp if s.rewritten] == ["b", "b"]
    assert all("overlaps the MLP site" in s.reason for s in mlp if not s.rewritten) and len(mlp) == 4


def test_mixture_of_experts_blocks_are_the_layers_not_the_experts():
    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))

    class MoEBlock(tiny_models.PlainBlock):
        def __init__(self):
            super().__init__(32, 2, 64)
            self.experts = nn.ModuleList(Expert() for _ in range(3))

        def forward(self, x, c):
            h = self.norm1(x)
            B, N, C = h.shape
            q, k, v = self.qkv(h).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
            h = self.norm2(x)
            return x + sum(expert(h) for expert in self.experts)

    torch.manual_seed(0)
    model = tiny_models.PlainDiT(depth=3).eval()
    model.blocks = nn.ModuleList(MoEBlock() for _ in range(3)).eval()
    _, make_inputs = tiny_models.plain_dit()
    report = chipmunk_compile.explain(model, **make_inputs())
    layers = {(s.kind, s.module): s.layer for s in report.sites}
    for (kind, module), layer in layers.items():
        assert layer == int(module.split(".")[1]), (kind, module, layer)  # blocks.<layer>...
    assert sum(kind == "mlp" for kind, _ in layers) == 9
    assert [s.rewritten for s in report.sites if s.kind == "attention"] == [False, False, True]


# Layouts from a probe of diffusers' image DiTs (Chroma, Z-Image, DiT), in plain PyTorch.
class _SiluMLP(nn.Module):
    def __init__(self, d_in, d_hidden, d_out):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class _CustomNorm(nn.Module):  # a norm that is not a torch.nn class (as diffusers' RMSNorm)
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class _Block(nn.Module):
    def __init__(self, d=32, heads=2, timestep_mlp=False):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff, self.n1, self.n2 = _SiluMLP(d, 64, d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.temb = _SiluMLP(16, d, d) if timestep_mlp else None  # DiT: a timestep embedder in every block

    def forward(self, x, t_freq=None):
        if self.temb is not None:
            x = x + self.temb(t_freq)[:, None]  # t_freq: [B, 16], no token axis
        B, N, C = x.shape
        q, k, v = self.qkv(self.n1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        return x + self.ff(self.n2(x))


def _sinusoid(t, dim=16):
    freqs = torch.exp(-torch.arange(dim // 2) / (dim // 2) * 9.21)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], -1)


def _attention_layers(report):
    return [(s.layer, s.rewritten) for s in report.sites if s.kind == "attention"]


def test_a_list_of_mlps_beside_attention_blocks_is_not_layers():
    """Chroma's approximator (a list of MLPs turning the timestep into modulation vectors) took layers 0-1."""
    class Approximator(nn.Module):
        def __init__(self, d=32):
            super().__init__()
            self.in_proj = nn.Linear(16, d)
            self.layers = nn.ModuleList(_SiluMLP(d, d, d) for _ in range(2))

        def forward(self, x):
            x = self.in_proj(x)
            for layer in self.layers:
                x = x + layer(x)
            return x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.approx = Approximator()
            self.inp, self.blocks = nn.Linear(4, 32), nn.ModuleList(_Block() for _ in range(3))

        def forward(self, x, t):
            h = self.inp(x) + self.approx(_sinusoid(t)[:, None].expand(-1, 20, -1)).mean(1, keepdim=True)
            for block in self.blocks:
                h = block(h)
            return h

    torch.manual_seed(0)
    report = chipmunk_compile.explain(Model().eval(), torch.randn(1, 64, 4), torch.tensor([500.0]))
    approx = [s for s in report.sites if s.module.startswith("approx")]
    assert approx and not any(s.rewritten or s.layer is not None for s in approx)
    assert _attention_layers(report) == [(0, False), (1, False), (2, True)]


def test_an_indexed_module_outside_the_block_lists_is_not_a_layer():
    """Z-Image's cap_embedder = Sequential(RMSNorm, Linear): its custom norm was counted as layer 0."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.cap_embedder = nn.Sequential(_CustomNorm(8), nn.Linear(8, 32))
            self.inp, self.blocks = nn.Linear(4, 32), nn.ModuleList(_Block() for _ in range(3))

        def forward(self, x, cap):
            h = torch.cat([self.cap_embedder(cap), self.inp(x)], dim=1)
            for block in self.blocks:
                h = block(h)
            return h

    torch.manual_seed(0)
    report = chipmunk_compile.explain(Model().eval(), torch.randn(1, 64, 4), torch.randn(1, 8, 8))
    assert _attention_layers(report) == [(0, False), (1, False), (2, True)]


def test_a_timestep_embedder_inside_each_block_is_not_an_mlp_site():
    """DiT's AdaLayerNormZero embeds the timestep in every block: a [B, C] vector that changes completely each
    step, so caching its hidden units would condition whole blocks on stale values."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.blocks = nn.Linear(4, 32), nn.ModuleList(_Block(timestep_mlp=True) for _ in range(2))

        def forward(self, x, t):
            h, t_freq = self.inp(x), _sinusoid(t)
            for block in self.blocks:
                h = block(h, t_freq)
            return h

    torch.manual_seed(0)
    report = chipmunk_compile.explain(Model().eval(), torch.randn(1, 64, 4), torch.tensor([500.0]),
                                      options={"first_dense_layers": 0})
    temb = [s for s in report.sites if ".temb" in s.module]
    assert temb and not any(s.rewritten for s in temb) and all("no token axis" in s.reason for s in temb)
    assert [s.rewritten for s in report.sites if s.module.endswith("ff.linear_2")] == [True, True]


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_activation_computed_in_float32_between_16_bit_linears_is_an_mlp_site(dtype):
    """Lumina2's FP32SiLU: silu(h.float()).to(h.dtype) inside a SwiGLU feed-forward. The casts are what the
    chipmunk op's float32 epilogue does, so the feed-forward is a site; all units kept reproduces the model."""
    class FP32SiLU(nn.Module):
        def forward(self, h):
            return F.silu(h.float()).to(h.dtype)

    class SwiGLU(nn.Module):
        def __init__(self, d=32, hidden=64):
            super().__init__()
            self.linear_1, self.linear_2, self.linear_3 = nn.Linear(d, hidden), nn.Linear(hidden, d), nn.Linear(d, hidden)
            self.act = FP32SiLU()

        def forward(self, x):
            return self.linear_2(self.act(self.linear_1(x)) * self.linear_3(x))

    class Block(_Block):
        def __init__(self):
            super().__init__()
            self.ff = SwiGLU()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(2))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    model = Model().eval().to(dtype)
    x = torch.randn(1, 64, 32, dtype=dtype)
    report = chipmunk_compile.explain(model, x, options={"first_dense_layers": 0})
    mlp = [s for s in report.sites if s.kind == "mlp"]
    assert len(mlp) == 2 and all(s.rewritten and s.variant == "gated" for s in mlp), mlp
    compiled = compile_chipmunk(model, attn_sparsity=0.0, mlp_sparsity=0.0, attn_random_fraction=0.0,
                                mlp_random_fraction=0.0, num_steps=3)
    for step in range(3):
        got = compiled(x + 0.05 * step)
        assert rel_err(got, model(x + 0.05 * step)) < (1e-5 if dtype == torch.float32 else 2e-2), step


def test_text_only_blocks_before_the_transformer_are_not_layers_but_a_smaller_middle_stage_is():
    """Text-only blocks at the top level (Kandinsky 5, Lumina2's context refiner) run before the transformer
    on a few tokens: conditioning, not layers. A low-resolution stage between two full-resolution ones (an
    hourglass model) runs on fewer tokens too, but between them: it stays a layer."""
    class TextThenImage(nn.Module):
        def __init__(self):
            super().__init__()
            self.text_blocks = nn.ModuleList(_Block() for _ in range(2))
            self.blocks = nn.ModuleList(_Block() for _ in range(3))

        def forward(self, x, text):
            for block in self.text_blocks:
                text = block(text)
            h = torch.cat([text, x], dim=1)
            for block in self.blocks:
                h = block(h)
            return h

    class Hourglass(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.ModuleList(_Block() for _ in range(2))
            self.mid = nn.ModuleList(_Block() for _ in range(2))
            self.up = nn.ModuleList(_Block() for _ in range(2))

        def forward(self, x):
            for block in self.down:
                x = block(x)
            h = x.reshape(1, 16, 4, 32).mean(2)  # 64 -> 16 tokens
            for block in self.mid:
                h = block(h)
            x = x + h.repeat_interleave(4, dim=1)
            for block in self.up:
                x = block(x)
            return x

    torch.manual_seed(0)
    report = chipmunk_compile.explain(TextThenImage().eval(), torch.randn(1, 64, 32), torch.randn(1, 8, 32),
                                      options={"first_dense_layers": 0})
    text = [s for s in report.sites if s.module.startswith("text_blocks")]
    assert len(text) == 4 and all(s.layer is None and not s.rewritten for s in text)
    assert _attention_layers(report) == [(None, False)] * 2 + [(0, True), (1, True), (2, True)]
    report = chipmunk_compile.explain(Hourglass().eval(), torch.randn(1, 64, 32), options={"first_dense_layers": 0})
    assert _attention_layers(report) == [(layer, True) for layer in range(6)]


class _TokenSelectingBlock(nn.Module):
    """Self-attention over the tokens a mask keeps, chosen with torch.nonzero (as diffusers' Mochi processor does)."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, text, keep):
        # The image tokens and the text tokens the mask keeps: a sequence of 8 + (data-dependent) tokens.
        kept = torch.cat([x, text.index_select(1, torch.nonzero(keep).flatten())], dim=1)
        B, N, C = kept.shape
        q, k, v = self.qkv(kept).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return x + self.out(o[:, :x.shape[1]])


class _TokenSelectingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_TokenSelectingBlock() for _ in range(2))

    def forward(self, x, text, keep):
        for block in self.blocks:
            x = block(x, text, keep)
        return x


def test_data_dependent_sequence_length_is_named_as_such():
    """With Dynamo capturing nonzero (capture_dynamic_output_shape_ops), the attention's sequence length is an
    unbacked symbol: the reason names the data-dependent selection, not dynamic shapes (which dynamic=False would
    not change)."""
    keep = torch.ones(6, dtype=torch.bool)
    keep[4:] = False
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        report = chipmunk_compile.explain(_TokenSelectingModel().eval(), torch.randn(1, 8, 32), torch.randn(1, 6, 32),
                                          keep, options={"first_dense_layers": 0})
    attention = [s for s in report.sites if s.kind == "attention"]
    assert len(attention) == 2 and not any(s.rewritten for s in attention)
    assert all("data-dependent sequence length" in s.reason for s in attention), [s.reason for s in attention]


class _AttentionPoolHead(nn.Module):
    """A head outside the blocks: learned queries attend to the tokens (cross-attention), then an MLP."""

    def __init__(self, d=32):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 2, 4, d // 2))
        self.kv = nn.Linear(d, 2 * d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h):
        B, N, C = h.shape
        k, v = self.kv(h).reshape(B, N, 2, 2, C // 2).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(self.query.expand(B, -1, -1, -1), k, v)
        pooled = o.transpose(1, 2).reshape(B, 4, C)
        return self.fc2(F.gelu(self.fc1(pooled)))


class _TextProjection(nn.Module):
    """A caption projection over text tokens (linear-gelu-linear, no attention), e.g. PixArt's."""

    def __init__(self, d=32):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


def test_a_block_compiled_alone_is_one_block_but_a_head_or_embedder_alone_is_not():
    """Regional compilation (or a graph break in the block loop) gives a block its own graph: its self-attention
    and MLP are sites of that one block. A graph of another part of the model compiled alone (a pooling head
    attending from learned queries, a text projection MLP) has no self-attention and stays as it was."""
    torch.manual_seed(0)
    block = tiny_models.PlainBlock(32, 2, 64).eval()
    report = chipmunk_compile.explain(block, torch.randn(1, 64, 32), torch.randn(1, 32),
                                      options={"first_dense_layers": 0})
    assert [(s.kind, s.rewritten, s.layer) for s in report.sites] == [("attention", True, 0), ("mlp", True, 0)]
    head = chipmunk_compile.explain(_AttentionPoolHead().eval(), torch.randn(1, 64, 32),
                                    options={"first_dense_layers": 0})
    assert not head.rewritten and all(s.layer is None for s in head.sites), str(head)
    assert "cross-attention" in head.sites[0].reason
    text = chipmunk_compile.explain(_TextProjection().eval(), torch.randn(1, 8, 32), options={"first_dense_layers": 0})
    assert text.sites == []
    # in a whole model the same head keeps its ordinary handling: outside the blocks, not a site of theirs
    class WithHead(tiny_models.PlainDiT):
        def __init__(self):
            super().__init__()
            self.head = _AttentionPoolHead()

        def forward(self, x, t):
            c = self.t_embed(t[:, None])
            h = self.embed(x)
            for blk in self.blocks:
                h = blk(h, c)
            return self.head(h)

    whole = chipmunk_compile.explain(WithHead().eval(), torch.randn(1, 64, 4), torch.tensor([0.5]),
                                     options={"first_dense_layers": 0})
    assert len(whole.rewritten) == 4 and all(s.module.startswith("blocks.") for s in whole.rewritten), str(whole)
    assert [s.layer for s in whole.rewritten] == [0, 0, 1, 1]
    assert [s.layer for s in whole.sites if s.module.startswith("head")] == [None]  # the head's cross-attention


def test_blocks_held_as_attributes_are_not_taken_for_one_block():
    """A whole model whose blocks are separate attributes (no block list) is not one block: treating it as one
    would give every site layer 0 (so first_dense_layers would keep the whole model dense without a word). Its
    sites stay outside the blocks, with the fallback warning naming the case."""
    class AttributeBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 32)
            self.b0, self.b1 = tiny_models.PlainBlock(32, 2, 64), tiny_models.PlainBlock(32, 2, 64)

        def forward(self, x, c):
            return self.b1(self.b0(self.embed(x), c), c)

    torch.manual_seed(0)
    model = AttributeBlocks().eval()
    report = chipmunk_compile.explain(model, torch.randn(1, 64, 4), torch.randn(1, 32),
                                      options={"first_dense_layers": 0})
    assert report.sites and not report.rewritten and all(s.layer is None for s in report.sites), str(report)
    torch._dynamo.reset()
    with pytest.warns(chipmunk_compile.ChipmunkFallbackWarning, match="separate attributes"):
        with torch.no_grad():
            compile_chipmunk(model)(torch.randn(1, 64, 4), torch.randn(1, 32))
