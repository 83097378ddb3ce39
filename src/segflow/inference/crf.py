"""Fully connected CRF post-processing (DeepLab v1/v2), in torch so it runs on CPU and CUDA.

Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials", NIPS 2011.

Mean-field inference with a Potts compatibility, following the reference ``densecrf`` code that DeepLab uses
(symmetric kernel normalisation, the message includes the pixel itself). The appearance (bilateral) kernel is
filtered on a permutohedral lattice (Adams et al. 2010), the same approximation as the reference code, so memory
is O(N) in pixels (the exact N×N kernel needs ~120 GB at 360×480); the smoothness kernel is an exact blur.

pydensecrf2 is not used because it ships only a source distribution (a C++ compiler at install time, which
the slim worker image lacks) and runs on the CPU only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segflow.config import CrfParams
from segflow.errors import SegflowError

# Probabilities are floored before taking the log so that a confidently wrong pixel can still be flipped by
# its neighbours (the same clip as pydensecrf's ``unary_from_softmax``).
_PROBABILITY_FLOOR = 1e-5

_Filter = Callable[[torch.Tensor], torch.Tensor]


def _csr(counts: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from per-row entry counts and row-major, column-sorted entries.

    CSR products are several times faster than gather/scatter for the splat, blur and slice steps.
    """
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    with warnings.catch_warnings():
        # Only the CSR layout is "beta"; sparse × dense products on it are long-standing.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


@dataclass(frozen=True)
class _Lattice:
    """A permutohedral lattice built once per image and reused by every mean-field iteration."""

    splat: torch.Tensor  # M×N: pixels onto lattice points, with barycentric weights
    blur: list[torch.Tensor]  # d+1 times M×M: the [1/2, 1, 1/2] blur along each lattice axis
    slice: torch.Tensor  # N×M: lattice points back onto pixels (the transpose of splat)

    @classmethod
    def build(cls, features: torch.Tensor) -> _Lattice:
        """Embed N points with d features (already divided by their standard deviations)."""
        n, d = features.shape
        device = features.device
        axes = torch.arange(d + 1, device=device)

        # Elevate onto the hyperplane sum(x) = 0 of R^(d+1), scaled so the [1/2, 1, 1/2] blur per axis
        # approximates a Gaussian of standard deviation 1 in feature space.
        scale = math.sqrt(2.0 / 3.0) * (d + 1) / torch.sqrt((axes[:d] + 2.0) * (axes[:d] + 1.0))
        scaled = features * scale
        suffix = torch.cat([scaled.flip(1).cumsum(1).flip(1), scaled.new_zeros(n, 1)], dim=1)
        elevated = suffix - axes * torch.cat([scaled.new_zeros(n, 1), scaled], dim=1)

        # Nearest remainder-0 lattice point, then the permutation that sorts the residual (its "rank").
        down = torch.floor(elevated / (d + 1)) * (d + 1)
        up = down + (d + 1)
        rem0 = torch.where(up - elevated < elevated - down, up, down)
        residual = elevated - rem0
        other, this = residual[:, None, :], residual[:, :, None]
        later = torch.triu(torch.ones(d + 1, d + 1, dtype=torch.bool, device=device), diagonal=1)
        rank = ((other > this) & later).sum(2) + ((other >= this) & later.T).sum(2)
        rem0 = rem0.long()

        # Move rem0 so the point lies in the canonical simplex around it (coordinates must sum to zero).
        excess = rem0.sum(1, keepdim=True) // (d + 1)
        too_high = (excess > 0) & (rank >= d + 1 - excess)
        too_low = (excess < 0) & (rank < -excess)
        shift = (d + 1) * (too_low.long() - too_high.long())
        rem0 = rem0 + shift
        rank = rank + excess + shift

        residual = (elevated - rem0) / (d + 1)
        barycentric = elevated.new_zeros(n, d + 2)
        barycentric.scatter_add_(1, d - rank, residual)
        barycentric.scatter_add_(1, d + 1 - rank, -residual)
        barycentric[:, 0] += 1.0 + barycentric[:, d + 1]
        weights = barycentric[:, : d + 1]

        # Simplex vertex r of a point is rem0 + canonical[r][rank]; only the first d coordinates are stored
        # because the last one is minus their sum.
        canonical = torch.where(axes[None, :] <= d - axes[:, None], axes[:, None], axes[:, None] - (d + 1))
        keys = rem0[:, None, :d] + canonical[axes[None, :, None], rank[:, None, :d]]

        # Pack keys into one int64 each; the packing is linear, so a lattice neighbour is a constant offset.
        low = keys.amin(dim=(0, 1)) - (d + 1)
        radix = (keys.amax(dim=(0, 1)) + (d + 1) - low + 1).tolist()
        if math.prod(radix) >= 2**62:
            raise SegflowError(
                "Dense CRF: the bilateral kernel's standard deviations are too small for this image "
                f"(lattice extent {radix} does not fit a 64-bit key); raise bilateral_xy_std or bilateral_rgb_std."
            )
        strides = torch.tensor([math.prod(radix[i + 1 :]) for i in range(d)], device=device)
        codes, offsets = torch.unique(((keys - low) * strides).sum(2), return_inverse=True)
        m = codes.numel()

        # slice: each pixel reads its d+1 simplex vertices; splat: each lattice point gathers its pixels.
        order = offsets.argsort(dim=1)
        slice_ = _csr(
            torch.full((n,), d + 1, device=device), offsets.gather(1, order).reshape(-1),
            weights.gather(1, order).reshape(-1), (n, m),
        )
        flat = offsets.reshape(-1)
        order = flat.argsort(stable=True)
        pixels = torch.arange(n, device=device).repeat_interleave(d + 1)
        splat = _csr(torch.bincount(flat, minlength=m), pixels[order], weights.reshape(-1)[order], (m, n))

        # Blur along axis j: neighbours are the keys ± (-1, ..., d at j, ..., -1); off-lattice ones hold zero.
        points = torch.arange(m, device=device)
        taps = torch.tensor([0.5, 1.0, 0.5], device=device).expand(m, 3)
        blur = []
        for axis in range(d + 1):
            step = torch.full((d,), -1, device=device)
            if axis < d:
                step[axis] = d
            delta = abs(int((step * strides).sum()))
            upper = torch.searchsorted(codes, codes + delta).clamp_(max=m - 1)
            upper = torch.where(codes[upper] == codes + delta, upper, m)
            # The lower neighbour relation is the upper one reversed, which saves a second search.
            has_upper = upper < m
            lower = torch.full((m,), m, device=device).index_put_((upper[has_upper],), points[has_upper])
            cols = torch.stack([lower, points, upper], dim=1)
            present = cols < m
            blur.append(_csr(present.sum(1), cols[present], taps[present], (m, m)))
        return cls(splat=splat, blur=blur, slice=slice_)

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Gaussian-filter N×C values: splat onto the lattice, blur along each axis, slice back."""
        grid = self.splat @ values
        for axis in self.blur:
            grid = axis @ grid
        # The reference code's constant output scale is left out: the symmetric normalisation cancels it.
        return self.slice @ grid


def _gaussian_blur(values: torch.Tensor, std: float) -> torch.Tensor:
    """Exact (truncated at 4 std) separable Gaussian blur of C×H×W values, zero outside the image."""
    channels = values.shape[0]
    radius = min(math.ceil(4 * std), max(values.shape[1:]))
    taps = torch.arange(-radius, radius + 1, dtype=values.dtype, device=values.device)
    kernel = torch.exp(-0.5 * (taps / std) ** 2).repeat(channels, 1)
    # Depthwise (groups=C) convolutions: several times faster on CPU than folding C into the batch.
    out = F.conv2d(values[None], kernel[:, None, :, None], padding=(radius, 0), groups=channels)
    return F.conv2d(out, kernel[:, None, None, :], padding=(0, radius), groups=channels)[0]


def _check_inputs(image: np.ndarray, probabilities: torch.Tensor) -> None:
    if (
        not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3
        or image.dtype != np.uint8 or image.size == 0
    ):
        shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", type(image).__name__)
        raise SegflowError(
            f"Dense CRF: the image must be a non-empty H×W×3 uint8 array, got shape {shape} and dtype {dtype}."
        )
    if probabilities.ndim != 3 or not probabilities.is_floating_point():
        raise SegflowError(
            f"Dense CRF: probabilities must be a K×H×W float tensor, got shape {tuple(probabilities.shape)} "
            f"and dtype {probabilities.dtype}."
        )
    if tuple(probabilities.shape[1:]) != image.shape[:2]:
        raise SegflowError(
            f"Dense CRF: the image is {image.shape[0]}×{image.shape[1]} pixels but the probabilities are "
            f"{probabilities.shape[1]}×{probabilities.shape[2]}; they must cover the same pixels."
        )


def _symmetric(kernel: _Filter, like: torch.Tensor) -> _Filter:
    """D^-1/2 K D^-1/2 (D = K·1), the reference code's NORMALIZE_SYMMETRIC, for C×H×W tensors like ``like``."""
    norm = kernel(torch.ones_like(like[:1])).clamp_min(1e-20).rsqrt()
    return lambda q: kernel(q * norm) * norm


def dense_crf(image: np.ndarray, probabilities: torch.Tensor, params: CrfParams) -> torch.Tensor:
    """Refine K×H×W softmax ``probabilities`` of ``image`` (H×W×3 uint8) with a fully connected CRF.

    Returns refined K×H×W probabilities on the input's device and in its dtype. ``params.enabled`` is the
    caller's switch; this function always runs ``params.iterations`` mean-field steps.
    """
    _check_inputs(image, probabilities)
    _, h, w = probabilities.shape
    device = probabilities.device
    log_unary = probabilities.float().clamp_min(_PROBABILITY_FLOOR).log()

    messages = []
    if params.bilateral_weight > 0:
        ys, xs = torch.meshgrid(
            torch.arange(h, device=device, dtype=torch.float32),
            torch.arange(w, device=device, dtype=torch.float32),
            indexing="ij",
        )
        rgb = torch.from_numpy(image).to(device=device, dtype=torch.float32)
        features = torch.cat(
            [
                torch.stack([xs, ys], dim=-1) / params.bilateral_xy_std,
                rgb / params.bilateral_rgb_std,
            ],
            dim=-1,
        ).reshape(-1, 5)
        lattice = _Lattice.build(features)
        # The lattice works on N×C rows; Q is C×H×W.
        appearance = _symmetric(lambda q: lattice.filter(q.reshape(-1, h * w).T).T.reshape(-1, h, w), log_unary)
        messages.append((params.bilateral_weight, appearance))
    if params.gaussian_weight > 0:
        smoothness = _symmetric(lambda q: _gaussian_blur(q, params.gaussian_xy_std), log_unary)
        messages.append((params.gaussian_weight, smoothness))

    # Potts: a label gains weight × (kernel-weighted mass of the same label around the pixel).
    q = torch.softmax(log_unary, dim=0)
    for _ in range(params.iterations):
        logits = log_unary.clone()
        for weight, message in messages:
            logits += weight * message(q)
        q = torch.softmax(logits, dim=0)
    return q.to(probabilities.dtype)
