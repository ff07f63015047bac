"""PSNR / SSIM (chipmunk_compile.image_metrics) against known properties and an independent loop formula."""
import math

import pytest
import torch

from chipmunk_compile.image_metrics import gaussian_window, mean_finite, psnr, ssim


def _images(seed=0, shape=(3, 3, 24, 20)):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images in [0, 1]
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)


def test_identical_images():
    x = _images()
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert mean_finite(psnr(x, x)) == 100.0


def test_noise_lowers_both_monotonically():
    x = _images()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    p_prev, s_prev = math.inf, 1.0
    for sigma in (0.01, 0.03, 0.1):
        y = (x + sigma * noise).clamp(0, 1)
        p, s = psnr(x, y), ssim(x, y)
        assert (p < p_prev).all() and (s < s_prev).all()
        p_prev, s_prev = p, s
    # PSNR of a known MSE: a constant offset of 0.1 -> MSE 0.01 -> 20 dB
    assert torch.allclose(psnr(x * 0.5, x * 0.5 + 0.1), torch.full((3,), 20.0, dtype=torch.float64))


def test_psnr_data_range():
    x = _images()
    y = x + 0.05
    assert torch.allclose(psnr(255 * x, 255 * y, data_range=255.0), psnr(x, y))


def test_ssim_constant_images_closed_form():
    # Two constant images: variances and covariance vanish, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    a = torch.full((1, 1, 16, 16), 0.3, dtype=torch.float64)
    b = torch.full((1, 1, 16, 16), 0.6, dtype=torch.float64)
    c1 = 0.01 ** 2
    expected = (2 * 0.3 * 0.6 + c1) / (0.3 ** 2 + 0.6 ** 2 + c1)
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-9)


def test_ssim_matches_an_explicit_window_loop():
    # Independent implementation: weighted statistics of each valid 11x11 window, written out per position.
    a, b = _images(2, (1, 2, 13, 14)), _images(3, (1, 2, 13, 14))
    w = gaussian_window(11, 1.5)
    assert w.sum().item() == pytest.approx(1.0) and w[5, 5] == w.max()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for c in range(2):
        for i in range(13 - 10):
            for j in range(14 - 10):
                pa, pb = a[0, c, i:i + 11, j:j + 11], b[0, c, i:i + 11, j:j + 11]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    expected = torch.stack(vals).mean()
    assert ssim(a, b).item() == pytest.approx(expected.item(), rel=1e-10)


def test_shapes_and_errors():
    x = _images()
    assert psnr(x[0], x[0] + 0.1).shape == (1,)
    with pytest.raises(ValueError):
        ssim(x[:, :, :8, :8], x[:, :, :8, :8])
    with pytest.raises(ValueError):
        psnr(x, x[:2])
