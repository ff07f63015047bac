"""The reference DiT: a small diffusers ``FluxTransformer2DModel`` in pixel space, class-conditional.

Layout: a 64x64 RGB image is packed 2x2 into 32x32 = 1024 image tokens of 12 channels (``patch_size=1``,
``in_channels=12``); the class label becomes ``TEXT_TOKENS`` learned "text" tokens (``encoder_hidden_states``)
and a learned pooled vector (``pooled_projections``), produced by ``ClassConditioner``.  RoPE ids: text tokens
all zeros, image token (row, col) -> ``(0, row, col)``.  No guidance embedding.  The timestep passed to the
transformer is the flow-matching sigma in [0, 1] (Flux multiplies it by 1000 internally).

Weights live in ``weights/`` next to this file (or any directory with the same layout)::

    weights/config.json                        diffusers FluxTransformer2DModel config
    weights/diffusion_pytorch_model.safetensors  transformer weights (fp16)
    weights/conditioner.safetensors            ClassConditioner weights (fp16)
    weights/reference.json                     ReferenceConfig (conditioner, scheduler shift), training notes

(flat, so that ``FluxTransformer2DModel.from_pretrained(weights_dir)`` reads it directly)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from chipmunk_compile.reference_model.data import IMAGE_SIZE, NUM_CLASSES

__all__ = [
    "ReferenceConfig",
    "DEFAULT_CONFIG",
    "WEIGHTS_DIR",
    "TEXT_TOKENS",
    "build_transformer",
    "ClassConditioner",
    "pack",
    "unpack",
    "image_ids",
    "text_ids",
    "load_reference_model",
    "save_reference_model",
    "weights_available",
]

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
TEXT_TOKENS = 8
PACK = 2  # 2x2 pixels per token


@dataclass(frozen=True)
class ReferenceConfig:
    # transformer
    num_layers: int = 2  # double-stream (MMDiT) blocks
    num_single_layers: int = 4  # single-stream blocks
    attention_head_dim: int = 64
    num_attention_heads: int = 4  # inner dim 256
    joint_attention_dim: int = 256
    pooled_projection_dim: int = 256
    axes_dims_rope: tuple[int, int, int] = (16, 24, 24)
    # conditioning
    num_classes: int = NUM_CLASSES  # id num_classes is the "null" label (classifier-free guidance)
    text_tokens: int = TEXT_TOKENS
    # data / scheduler
    image_size: int = IMAGE_SIZE
    shift: float = 1.0  # FlowMatchEulerDiscreteScheduler shift; training samples sigma with the same shift

    @property
    def in_channels(self) -> int:
        return 3 * PACK * PACK

    @property
    def grid(self) -> int:
        return self.image_size // PACK

    def transformer_kwargs(self) -> dict:
        return dict(
            patch_size=1,
            in_channels=self.in_channels,
            out_channels=self.in_channels,
            num_layers=self.num_layers,
            num_single_layers=self.num_single_layers,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            joint_attention_dim=self.joint_attention_dim,
            pooled_projection_dim=self.pooled_projection_dim,
            guidance_embeds=False,
            axes_dims_rope=tuple(self.axes_dims_rope),
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ReferenceConfig":
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in known}
        if "axes_dims_rope" in d:
            d["axes_dims_rope"] = tuple(d["axes_dims_rope"])
        return cls(**d)


DEFAULT_CONFIG = ReferenceConfig()


def build_transformer(config: ReferenceConfig = DEFAULT_CONFIG):
    """A randomly initialised ``FluxTransformer2DModel`` with the reference configuration."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**config.transformer_kwargs())


class ClassConditioner(nn.Module):
    """Class label -> (encoder_hidden_states [B, T, joint_dim], pooled_projections [B, pooled_dim]).

    Label ``num_classes`` is the null label used for label dropout / classifier-free guidance.
    """

    def __init__(self, config: ReferenceConfig = DEFAULT_CONFIG):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.text_tokens = config.text_tokens
        self.joint_dim = config.joint_attention_dim
        self.tokens = nn.Embedding(config.num_classes + 1, config.text_tokens * config.joint_attention_dim)
        self.pooled = nn.Embedding(config.num_classes + 1, config.pooled_projection_dim)
        nn.init.normal_(self.tokens.weight, std=1.0)
        nn.init.normal_(self.pooled.weight, std=1.0)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        class_ids = class_ids.to(self.tokens.weight.device, torch.long)
        ehs = self.tokens(class_ids).view(class_ids.shape[0], self.text_tokens, self.joint_dim)
        return ehs, self.pooled(class_ids)


def pack(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)*(W/2), C*4] tokens (row-major over the 2x2-cell grid; channel order c, dy, dx)."""
    B, C, H, W = images.shape
    x = images.view(B, C, H // PACK, PACK, W // PACK, PACK)
    x = x.permute(0, 2, 4, 1, 3, 5)  # B, h, w, C, dy, dx
    return x.reshape(B, (H // PACK) * (W // PACK), C * PACK * PACK)


def unpack(tokens: torch.Tensor, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> torch.Tensor:
    """Inverse of ``pack``: [B, N, C*4] -> [B, C, H, W]."""
    B, N, D = tokens.shape
    h, w = height // PACK, width // PACK
    if N != h * w:
        raise ValueError(f"{N} tokens do not form a {h}x{w} grid")
    C = D // (PACK * PACK)
    x = tokens.view(B, h, w, C, PACK, PACK).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, height, width)


def image_ids(grid: int = IMAGE_SIZE // PACK, device=None, dtype=torch.float32) -> torch.Tensor:
    """RoPE ids of the image tokens: [grid*grid, 3] rows (0, row, col)."""
    r = torch.arange(grid, device=device, dtype=dtype)
    ids = torch.zeros(grid, grid, 3, device=device, dtype=dtype)
    ids[..., 1] = r[:, None]
    ids[..., 2] = r[None, :]
    return ids.view(grid * grid, 3)


def text_ids(n: int = TEXT_TOKENS, device=None, dtype=torch.float32) -> torch.Tensor:
    """RoPE ids of the text tokens: [n, 3] zeros."""
    return torch.zeros(n, 3, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# Saving / loading
# --------------------------------------------------------------------------------------------------------------


def weights_available(weights_dir: Optional[str] = None) -> bool:
    d = weights_dir or WEIGHTS_DIR
    return all(
        os.path.exists(os.path.join(d, p))
        for p in ("config.json", "diffusion_pytorch_model.safetensors", "conditioner.safetensors", "reference.json")
    )


def save_reference_model(
    transformer,
    conditioner: ClassConditioner,
    weights_dir: str,
    config: ReferenceConfig = DEFAULT_CONFIG,
    dtype: torch.dtype = torch.float16,
    extra: Optional[dict] = None,
) -> None:
    """Write the layout ``load_reference_model`` reads (weights cast to ``dtype``; the modules are untouched)."""
    from safetensors.torch import save_file

    os.makedirs(weights_dir, exist_ok=True)
    transformer.save_config(weights_dir)  # config.json, as save_pretrained writes it
    files = {
        "diffusion_pytorch_model.safetensors": transformer.state_dict(),
        "conditioner.safetensors": conditioner.state_dict(),
    }
    for name, state in files.items():
        sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
        save_file(sd, os.path.join(weights_dir, name), metadata={"format": "pt"})
    meta = {"config": config.to_json(), "stored_dtype": str(dtype).replace("torch.", "")}
    if extra:
        meta.update(extra)
    with open(os.path.join(weights_dir, "reference.json"), "w") as f:
        json.dump(meta, f, indent=2)
    for name in ("config.json", "reference.json", *files):
        os.chmod(os.path.join(weights_dir, name), 0o644)


def load_reference_config(weights_dir: Optional[str] = None) -> ReferenceConfig:
    d = weights_dir or WEIGHTS_DIR
    with open(os.path.join(d, "reference.json")) as f:
        return ReferenceConfig.from_json(json.load(f)["config"])


def load_reference_model(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    weights_dir: Optional[str] = None,
):
    """Load the trained reference model.

    Returns ``(transformer, conditioner, config)``, both modules in eval mode on ``device`` / ``dtype``.
    Raises ``FileNotFoundError`` with instructions if the weights are missing.
    """
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    d = weights_dir or WEIGHTS_DIR
    if not os.path.isdir(d) or not weights_available(d):
        raise FileNotFoundError(
            f"reference model weights not found in {d!r} (expected config.json, "
            "diffusion_pytorch_model.safetensors, conditioner.safetensors, reference.json). Train them with "
            "`python training/train_reference.py --device cuda --out DIR` and copy DIR/weights there."
        )
    config = load_reference_config(d)
    transformer = FluxTransformer2DModel.from_pretrained(d, torch_dtype=dtype)
    transformer = transformer.to(device).eval()
    conditioner = ClassConditioner(config)
    sd = load_file(os.path.join(d, "conditioner.safetensors"))
    conditioner.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()})
    conditioner = conditioner.to(device, dtype).eval()
    return transformer, conditioner, config
