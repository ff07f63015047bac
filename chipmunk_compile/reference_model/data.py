"""Procedural 64x64 RGB scenes for the reference DiT, and a small classifier for them.

Every image is a function of ``(seed, index, class_id)`` only: the random parameters come from a counter-based
integer hash evaluated with plain torch integer ops, so a batch can be generated on any device (CPU for tests,
the GPU during training) without a stateful generator, and sample ``i`` of a batch never depends on the other
samples.  Float results may differ in the last bits between devices; on one device they are bit-identical.

A scene is a background (two-colour linear gradient at a random angle, plus low-frequency ripples) and a
foreground pattern of one of ``NUM_CLASSES`` kinds (shapes, stripes, checkerboards, ...) with a random colour
of opposite brightness, random position/size/rotation, a sinusoidal texture, soft anti-aliased edges of random
width, and a little per-pixel noise.  The class decides the global layout; colours and textures are local
detail.

``classify(images)`` is a tiny CNN (weights shipped next to this file, ``classifier.safetensors``) trained on
this generator by ``train_classifier``; it checks that generated samples are recognisable.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CLASS_NAMES",
    "NUM_CLASSES",
    "IMAGE_SIZE",
    "make_batch",
    "make_balanced_batch",
    "random_class_ids",
    "SceneClassifier",
    "load_classifier",
    "classify",
    "classifier_accuracy",
    "train_classifier",
    "CLASSIFIER_PATH",
]

CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "ring",
    "cross",
    "stripes_horizontal",
    "stripes_vertical",
    "checkerboard",
    "two_blobs",
    "star",
    "dot_grid",
    "frame",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 64

CLASSIFIER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "classifier.safetensors")

# --------------------------------------------------------------------------------------------------------------
# Counter-based hashing (no stateful RNG; works identically on every device with int64 tensor ops)
# --------------------------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 held in int64, without int64 overflow."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash (C. Wellons) on uint32 values held in int64."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def _key(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Per-sample 32-bit key from (seed, index). ``index``: int64 tensor [B]."""
    s_lo = _hash32(torch.tensor(seed & _MASK32, dtype=torch.int64) ^ 0x9E3779B9)
    s_hi = _hash32(torch.tensor((seed >> 32) & _MASK32, dtype=torch.int64) ^ 0x85EBCA6B)
    s = _hash32(s_lo ^ _mul32(s_hi, 0xC2B2AE35)).to(index.device)
    return _hash32(s ^ _hash32(index & _MASK32) ^ _mul32(index >> 32, 0x27D4EB2F))


def _uniform(key: torch.Tensor, stream: int | torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 with the shape of broadcast(key, stream)."""
    h = _hash32(key ^ _hash32(_mul32(torch.as_tensor(stream, device=key.device) & _MASK32, 0x632BE5AB) + 0x1B873593))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------


def _rot(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c, s = torch.cos(a), torch.sin(a)
    return c * x + s * y, -s * x + c * y


def _box(u: torch.Tensor, v: torch.Tensor, hu, hv) -> torch.Tensor:
    """Signed distance of an axis-aligned box with half sizes (hu, hv)."""
    du = u.abs() - hu
    dv = v.abs() - hv
    outside = torch.sqrt(du.clamp(min=0) ** 2 + dv.clamp(min=0) ** 2)
    inside = torch.maximum(du, dv).clamp(max=0)
    return outside + inside


def _lerp_u(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


def _render(class_ids: torch.Tensor, key: torch.Tensor, size: int) -> torch.Tensor:
    dev = class_ids.device
    B = class_ids.shape[0]
    P = lambda k: _uniform(key, k)[:, None, None]  # noqa: E731  per-sample parameter, [B,1,1]

    coords = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) * (2.0 / size) - 1.0
    y = coords[None, :, None].expand(B, size, size)
    x = coords[None, None, :].expand(B, size, size)
    px = 2.0 / size  # one pixel in these coordinates

    # ---- colours: background from one brightness band, foreground from the other --------------------------
    dark_bg = (P(0) < 0.5).float()  # [B,1,1]

    def colour(base: int, dark: torch.Tensor) -> torch.Tensor:
        c = torch.stack([_uniform(key, base + i) for i in range(3)], dim=1)[:, :, None, None]  # [B,3,1,1]
        d = dark[:, None]
        return d * (0.05 + 0.35 * c) + (1 - d) * (0.6 + 0.38 * c)

    bg1 = colour(10, dark_bg)
    bg2 = colour(13, dark_bg)
    fg1 = colour(16, 1 - dark_bg)
    fg2 = colour(19, 1 - dark_bg)

    # background gradient + low-frequency ripples
    ga = P(22) * 2 * math.pi
    t = ((torch.cos(ga) * x + torch.sin(ga) * y) * 0.5 + 0.5).clamp(0, 1)[:, None]
    bg = bg1 + (bg2 - bg1) * t
    rip_a = P(23) * 2 * math.pi
    rip_f = _lerp_u(P(24), 1.0, 3.0) * math.pi
    ripple = torch.sin(rip_f * (torch.cos(rip_a) * x + torch.sin(rip_a) * y) + P(25) * 2 * math.pi)
    bg = bg + (_lerp_u(P(26), 0.0, 0.06) * ripple)[:, None]

    # foreground texture: second colour mixed in by a higher-frequency sinusoid
    tex_a = P(27) * 2 * math.pi
    tex_f = _lerp_u(P(28), 3.0, 9.0) * math.pi
    tex = 0.5 + 0.5 * torch.sin(tex_f * (torch.cos(tex_a) * x + torch.sin(tex_a) * y) + P(29) * 2 * math.pi)
    fg = fg1 + (fg2 - fg1) * (tex * _lerp_u(P(30), 0.2, 0.8))[:, None]

    # ---- geometry --------------------------------------------------------------------------------------------
    cx = _lerp_u(P(31), -0.4, 0.4)
    cy = _lerp_u(P(32), -0.4, 0.4)
    r = _lerp_u(P(33), 0.28, 0.5)
    small_rot = _lerp_u(P(34), -0.26, 0.26)  # +-15 degrees
    any_rot = P(35) * 2 * math.pi
    dx, dy = x - cx, y - cy
    rho = torch.sqrt(dx * dx + dy * dy)

    sd = torch.empty_like(x)  # signed distance (negative inside) in image coordinates

    def put(cls: int, value: torch.Tensor) -> None:
        m = (class_ids == cls)[:, None, None]
        sd.copy_(torch.where(m, value, sd))

    # circle
    put(0, rho - r)
    # square (axis-aligned +-15 deg)
    u, v = _rot(dx, dy, small_rot)
    put(1, _box(u, v, 0.8 * r, 0.8 * r))
    # triangle (any rotation): intersection of three half-planes
    tri = None
    for k in range(3):
        a = any_rot + 2 * math.pi * k / 3
        d = torch.cos(a) * dx + torch.sin(a) * dy - 0.5 * r
        tri = d if tri is None else torch.maximum(tri, d)
    put(2, tri)
    # ring
    put(3, (rho - r).abs() - _lerp_u(P(36), 0.18, 0.3) * r)
    # cross / plus (+-15 deg)
    arm = _lerp_u(P(37), 0.22, 0.34) * r
    put(4, torch.minimum(_box(u, v, r, arm), _box(u, v, arm, r)))
    # stripes: whole image, 2..5 periods, +-10 degrees
    freq = _lerp_u(P(38), 2.0, 5.0) * math.pi
    phase = P(39) * 2 * math.pi
    srot = small_rot * 0.66
    su, sv = _rot(x, y, srot)
    # sin > 0 on half of every period; convert to an approximate signed distance
    put(5, -torch.sin(freq * sv + phase) / freq)
    put(6, -torch.sin(freq * su + phase) / freq)
    # checkerboard: 3..6 cells across, +-10 degrees
    cfreq = torch.floor(_lerp_u(P(40), 3.0, 7.0)) * math.pi / 2
    chk = torch.sin(cfreq * su + phase) * torch.sin(cfreq * sv + P(41) * 2 * math.pi)
    put(7, -chk / cfreq)
    # two blobs: two discs at distinct positions with soft gaussian-ish falloff
    b_ang = any_rot
    b_sep = _lerp_u(P(42), 0.45, 0.75)
    bx1 = (cx * 0.5 + torch.cos(b_ang) * b_sep * 0.5 * 1.2).clamp(-0.7, 0.7)
    by1 = (cy * 0.5 + torch.sin(b_ang) * b_sep * 0.5 * 1.2).clamp(-0.7, 0.7)
    bx2 = (cx * 0.5 - torch.cos(b_ang) * b_sep * 0.5 * 1.2).clamp(-0.7, 0.7)
    by2 = (cy * 0.5 - torch.sin(b_ang) * b_sep * 0.5 * 1.2).clamp(-0.7, 0.7)
    br1 = _lerp_u(P(43), 0.16, 0.3)
    br2 = _lerp_u(P(44), 0.16, 0.3)
    d1 = torch.sqrt((x - bx1) ** 2 + (y - by1) ** 2) - br1
    d2 = torch.sqrt((x - bx2) ** 2 + (y - by2) ** 2) - br2
    put(8, torch.minimum(d1, d2))
    # star: 5 points, any rotation
    theta = torch.atan2(dy, dx)
    depth = _lerp_u(P(45), 0.35, 0.5)
    rstar = r * (1.0 - depth * 0.5 * (1 - torch.cos(5 * (theta - any_rot))))
    put(9, (rho - rstar) * 0.7)
    # dot grid: 3x3 dots (+-15 deg)
    sp = 0.75 * r
    gu = u - sp * torch.round(u / sp).clamp(-1, 1)
    gv = v - sp * torch.round(v / sp).clamp(-1, 1)
    put(10, torch.sqrt(gu * gu + gv * gv) - 0.3 * sp * _lerp_u(P(46), 1.0, 1.4))
    # frame (hollow square, +-15 deg)
    put(11, _box(u, v, 0.85 * r, 0.85 * r).abs() - _lerp_u(P(47), 0.13, 0.22) * r)

    # soft anti-aliased mask with edge width 0.4..1.5 px
    edge = _lerp_u(P(48), 0.4, 1.5) * px
    mask = torch.sigmoid(-sd / edge)[:, None]  # [B,1,H,W]
    img = bg * (1 - mask) + fg * mask

    # per-pixel noise (local detail that is not structure)
    # one hash per pixel, split into two 16-bit uniforms: triangular noise on [-1, 1], std 1/sqrt(6)
    pix = torch.arange(3 * size * size, device=dev, dtype=torch.int64).view(1, 3, size, size)
    h = _hash32(key[:, None, None, None] ^ _hash32(_mul32(pix + 1000, 0x632BE5AB) + 0x1B873593))
    noise = ((h & 0xFFFF) + (h >> 16)).to(torch.float32) * (1.0 / 65536.0) - 1.0
    sigma = _lerp_u(P(49), 0.0, 0.03 * math.sqrt(6.0))[:, None]
    img = img + sigma * noise
    return img.clamp(0, 1) * 2 - 1


@torch.no_grad()
def make_batch(
    class_ids: torch.Tensor | Sequence[int],
    seed: int,
    *,
    start_index: int = 0,
    device: Optional[torch.device | str] = None,
    size: int = IMAGE_SIZE,
) -> torch.Tensor:
    """Render procedural scenes.

    Image ``i`` is a deterministic function of ``(seed, start_index + i, class_ids[i])``.
    Runs on ``device`` (default: the device of ``class_ids``, CPU for lists).

    Returns a float32 tensor ``[B, 3, size, size]`` in ``[-1, 1]``.
    """
    cls = torch.as_tensor(class_ids, dtype=torch.int64)
    if device is not None:
        cls = cls.to(device)
    if cls.ndim != 1:
        raise ValueError(f"class_ids must be 1-D, got shape {tuple(cls.shape)}")
    if cls.numel() and (int(cls.min()) < 0 or int(cls.max()) >= NUM_CLASSES):
        raise ValueError(f"class ids must be in [0, {NUM_CLASSES})")
    index = torch.arange(cls.shape[0], device=cls.device, dtype=torch.int64) + int(start_index)
    return _render(cls, _key(int(seed), index), size)


def make_balanced_batch(per_class: int, seed: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` images of each class, class-major. Returns (images, class_ids)."""
    device = kwargs.get("device")
    cls = torch.arange(NUM_CLASSES, device=device).repeat_interleave(per_class)
    return make_batch(cls, seed, **kwargs), cls


def random_class_ids(batch: int, seed: int, start_index: int = 0, device=None) -> torch.Tensor:
    """Deterministic uniformly random class ids for a batch (for training data)."""
    index = torch.arange(batch, device=device, dtype=torch.int64) + int(start_index)
    u = _uniform(_key(int(seed) ^ 0x5EED, index), 7)
    return (u * NUM_CLASSES).long().clamp(max=NUM_CLASSES - 1)


# --------------------------------------------------------------------------------------------------------------
# Classifier
# --------------------------------------------------------------------------------------------------------------


class SceneClassifier(nn.Module):
    """Tiny CNN: 64x64 RGB in [-1,1] (average-pooled to 32x32) -> NUM_CLASSES logits (0.47 M parameters)."""

    def __init__(self, width: int = 32, num_classes: int = NUM_CLASSES):
        super().__init__()
        w = width
        chans = [3, w, 2 * w, 3 * w, 4 * w]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1, stride=2),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # classes are defined by layout, not pixel-level detail: work at 32x32
        h = self.features(F.avg_pool2d(images, 2))
        return self.head(h.mean(dim=(2, 3)))


_CLASSIFIER_CACHE: dict[tuple[str, str], SceneClassifier] = {}


def load_classifier(device: torch.device | str = "cpu", path: str = CLASSIFIER_PATH) -> SceneClassifier:
    """Load the shipped classifier (cached per device)."""
    from safetensors.torch import load_file

    k = (str(device), path)
    if k not in _CLASSIFIER_CACHE:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"classifier weights not found at {path}; create them with "
                "`python -m chipmunk_compile.reference_model.data --train-classifier`"
            )
        model = SceneClassifier()
        model.load_state_dict(load_file(path))
        _CLASSIFIER_CACHE[k] = model.to(device).eval()
    return _CLASSIFIER_CACHE[k]


@torch.no_grad()
def classify(images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class ids ``[B]`` for images ``[B,3,64,64]`` in ``[-1,1]`` (any float dtype/device)."""
    model = load_classifier(images.device)
    out = []
    for chunk in images.split(batch_size):
        out.append(model(chunk.float().clamp(-1, 1)).argmax(-1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=images.device)


def classifier_accuracy(images: torch.Tensor, class_ids: torch.Tensor) -> dict:
    """Accuracy of ``classify`` against ``class_ids``: {'mean': float, 'per_class': {name: float}}."""
    pred = classify(images).cpu()
    cls = torch.as_tensor(class_ids).cpu()
    per = {}
    for c, name in enumerate(CLASS_NAMES):
        m = cls == c
        if m.any():
            per[name] = float((pred[m] == c).float().mean())
    return {"mean": float((pred == cls).float().mean()), "per_class": per}


def _augment(images: torch.Tensor, key_seed: int) -> torch.Tensor:
    """Make the classifier robust to imperfect generated samples: random blur, noise, contrast."""
    B = images.shape[0]
    g = torch.Generator(device="cpu").manual_seed(key_seed)
    blur = torch.rand(B, generator=g) < 0.3
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16
        w = k.to(images)[None, None].repeat(3, 1, 1, 1)
        blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), w, groups=3)
        images = torch.where(blur.to(images.device)[:, None, None, None], blurred, images)
    noise_sigma = (torch.rand(B, generator=g) * 0.08).to(images)[:, None, None, None]
    noise = torch.randn(images.shape, generator=g).to(images)
    scale = (0.8 + 0.4 * torch.rand(B, generator=g)).to(images)[:, None, None, None]
    return (images * scale + noise_sigma * noise).clamp(-1, 1)


def train_classifier(
    steps: int = 2000,
    batch: int = 128,
    pool_size: int = 24000,
    lr: float = 3e-3,
    device: torch.device | str = "cpu",
    seed: int = 1234,
    out: Optional[str] = CLASSIFIER_PATH,
    log_every: int = 100,
) -> SceneClassifier:
    """Train the scene classifier on the procedural generator (about 5 minutes on 2 CPU cores).

    A pool of ``pool_size`` images is rendered once (seed ``seed``; evaluation uses other seeds); minibatches
    are drawn from it with random flips (they preserve every class) and blur / noise / contrast augmentation.
    """
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    pool_cls = random_class_ids(pool_size, seed, device=device)
    pool = torch.cat([make_batch(c, seed, start_index=i * 1000) for i, c in enumerate(pool_cls.split(1000))])
    model = SceneClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, pool_size, (batch,), generator=g).to(device)
        x, cls = pool[idx], pool_cls[idx]
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-2)
        x = _augment(x, seed * 100003 + step)
        loss = F.cross_entropy(model(x), cls)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"classifier step {step:5d} loss {loss.item():.4f}", flush=True)
    model.eval()
    if out:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out)
        _CLASSIFIER_CACHE.clear()
    return model


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    import argparse

    p = argparse.ArgumentParser(description="Procedural scenes: train / evaluate the shipped classifier")
    p.add_argument("--train-classifier", action="store_true")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-per-class", type=int, default=200)
    p.add_argument("--grid", type=str, default=None, help="write a PNG grid of real images here")
    a = p.parse_args()
    if a.train_classifier:
        train_classifier(steps=a.steps)
    imgs, cls = make_balanced_batch(a.eval_per_class, seed=987654321)
    acc = classifier_accuracy(imgs, cls)
    print(f"classifier accuracy on real procedural images (seed 987654321): {acc['mean']:.4f}")
    for k, v in acc["per_class"].items():
        print(f"  {k:20s} {v:.4f}")
    if a.grid:
        from chipmunk_compile.reference_model.sampling import save_grid

        save_grid(make_balanced_batch(8, seed=1)[0], a.grid, nrow=8)
