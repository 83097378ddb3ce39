import resource

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segflow.config import CrfParams
from segflow.errors import SegflowError
from segflow.inference.crf import dense_crf


def _two_regions(height: int = 48, width: int = 64) -> tuple[np.ndarray, torch.Tensor]:
    """A flat red disc on a flat blue-grey background, and its true label map."""
    ys, xs = np.mgrid[:height, :width]
    truth = (ys - height / 2) ** 2 + (xs - width * 0.4) ** 2 < (height / 3) ** 2
    image = np.where(truth[..., None], [200, 40, 30], [60, 90, 120]).astype(np.uint8)
    return image, torch.from_numpy(truth.astype(np.int64))


def _noisy_probabilities(truth: torch.Tensor, classes: int, noise: float, seed: int = 0) -> torch.Tensor:
    """Blurred one-hot logits plus pixel noise: the argmax is right on average but has speckle errors."""
    generator = torch.Generator().manual_seed(seed)
    logits = F.one_hot(truth, classes).permute(2, 0, 1).float() * 2.0
    logits = F.avg_pool2d(logits[None], 5, stride=1, padding=2, count_include_pad=False)[0]
    logits += noise * torch.randn(logits.shape, generator=generator)
    return torch.softmax(logits, dim=0)


def test_crf_removes_speckle_errors_along_colour_regions():
    image, truth = _two_regions()
    probabilities = _noisy_probabilities(truth, classes=3, noise=1.5)
    raw_accuracy = (probabilities.argmax(0) == truth).float().mean().item()
    refined = dense_crf(image, probabilities, CrfParams())
    crf_accuracy = (refined.argmax(0) == truth).float().mean().item()
    assert raw_accuracy < 0.85  # the fixture really is noisy
    assert crf_accuracy > 0.98
    assert crf_accuracy > raw_accuracy + 0.1


def test_output_is_a_distribution_with_the_input_shape_and_device():
    image = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    probabilities = torch.softmax(torch.randn(5, 20, 30, generator=torch.Generator().manual_seed(1)), dim=0)
    refined = dense_crf(image, probabilities, CrfParams())
    assert refined.shape == probabilities.shape
    assert refined.device == probabilities.device and refined.dtype == probabilities.dtype
    assert torch.isfinite(refined).all() and (refined >= 0).all()
    torch.testing.assert_close(refined.sum(0), torch.ones(20, 30))


def _exact_dense_crf(image: np.ndarray, probabilities: torch.Tensor, params: CrfParams) -> torch.Tensor:
    """The textbook mean field with explicit N×N kernels (symmetrically normalised, as in the reference code)."""
    classes, height, width = probabilities.shape
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    position = torch.stack([xs, ys], dim=-1).reshape(-1, 2)
    colour = torch.from_numpy(image).float().reshape(-1, 3)

    def kernel(features: torch.Tensor) -> torch.Tensor:
        matrix = torch.exp(-0.5 * torch.cdist(features, features) ** 2)
        norm = matrix.sum(1).rsqrt()
        return norm[:, None] * matrix * norm[None, :]

    appearance = kernel(torch.cat([position / params.bilateral_xy_std, colour / params.bilateral_rgb_std], 1))
    smoothness = kernel(position / params.gaussian_xy_std)
    unary = probabilities.reshape(classes, -1).clamp_min(1e-5).log()
    q = unary.softmax(0)
    for _ in range(params.iterations):
        q = (unary + params.bilateral_weight * q @ appearance + params.gaussian_weight * q @ smoothness).softmax(0)
    return q.reshape(classes, height, width)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lattice_approximation_stays_close_to_the_exact_dense_crf(seed):
    # Small enough for explicit N×N kernels; smooth colours plus noise so both kernels matter.
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.integers(0, 256, (3, 3, 4)).astype(np.float32))
    smooth = F.interpolate(coarse[None], size=(24, 32), mode="bilinear", align_corners=False)[0]
    image = (smooth.permute(1, 2, 0).numpy() + rng.normal(0, 4, (24, 32, 3))).clip(0, 255).astype(np.uint8)
    generator = torch.Generator().manual_seed(seed)
    logits = F.interpolate(2 * torch.randn(1, 4, 4, 5, generator=generator), size=(24, 32), mode="bilinear")[0]
    probabilities = torch.softmax(logits + torch.randn(4, 24, 32, generator=generator), dim=0)
    refined = dense_crf(image, probabilities, CrfParams())
    exact = _exact_dense_crf(image, probabilities, CrfParams())
    assert (exact.argmax(0) != probabilities.argmax(0)).float().mean() > 0.1  # the CRF has work to do
    # Measured ~0.01; dropping the lattice blur or the kernel normalisation gives > 0.02.
    assert (refined - exact).abs().mean() < 0.016
    assert (refined.argmax(0) == exact.argmax(0)).float().mean() > 0.95


def test_zero_kernel_weights_leave_the_argmax_unchanged():
    image, truth = _two_regions()
    probabilities = _noisy_probabilities(truth, classes=3, noise=1.5)
    refined = dense_crf(image, probabilities, CrfParams(bilateral_weight=0.0, gaussian_weight=0.0))
    assert torch.equal(refined.argmax(0), probabilities.argmax(0))


def test_each_kernel_alone_changes_the_labelling():
    image, truth = _two_regions()
    probabilities = _noisy_probabilities(truth, classes=3, noise=1.5)
    for params in (CrfParams(gaussian_weight=0.0), CrfParams(bilateral_weight=0.0)):
        refined = dense_crf(image, probabilities, params)
        assert (refined.argmax(0) != probabilities.argmax(0)).any()


def test_full_size_image_runs_in_linear_memory():
    # A CamVid-sized frame: the exact N×N kernel would need ~120 GB; the lattice needs well under 1 GiB.
    rng = np.random.default_rng(2)
    coarse = torch.from_numpy(rng.integers(0, 256, (3, 9, 12)).astype(np.float32))
    smooth = F.interpolate(coarse[None], size=(360, 480), mode="bilinear", align_corners=False)[0]
    image = (smooth.permute(1, 2, 0).numpy() + rng.normal(0, 3, (360, 480, 3))).clip(0, 255).astype(np.uint8)
    probabilities = torch.softmax(torch.randn(12, 360, 480, generator=torch.Generator().manual_seed(2)), dim=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    refined = dense_crf(image, probabilities, CrfParams(iterations=2))  # memory does not grow per iteration
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert refined.shape == (12, 360, 480)
    torch.testing.assert_close(refined.sum(0), torch.ones(360, 480))
    assert grown_kib < 1024 * 1024


def test_image_and_probabilities_of_different_sizes_are_rejected():
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    probabilities = torch.full((4, 20, 31), 0.25)
    with pytest.raises(SegflowError, match=r"20×30 pixels but the probabilities are 20×31"):
        dense_crf(image, probabilities, CrfParams())


def test_image_that_is_not_rgb_uint8_is_rejected():
    probabilities = torch.full((4, 20, 30), 0.25)
    with pytest.raises(SegflowError, match="H×W×3 uint8"):
        dense_crf(np.zeros((20, 30), dtype=np.uint8), probabilities, CrfParams())
    with pytest.raises(SegflowError, match="H×W×3 uint8"):
        dense_crf(np.zeros((20, 30, 3), dtype=np.float32), probabilities, CrfParams())
