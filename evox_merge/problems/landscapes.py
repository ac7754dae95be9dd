"""Cheap synthetic coefficient landscapes as EvoX problems, for testing and benchmarking the search algorithms.

A candidate is a coefficient vector c in R^N, as `MergeProblem` receives it; fitness is higher-is-better (the
maximum is 0 at a known optimum c*), so run them in `StdWorkflow(..., opt_direction="max")`. A (P, N) population
costs microseconds, so an algorithm's behaviour can be tested over many seeds in seconds.

Every landscape is built from its own seeded `torch.Generator` (never torch's global RNG). The default optimum lies
in [-0.5, 0.5]^N, the range of useful merge coefficients, but off the probability simplex (its first coordinate is
negative). Where the optimum sits matters: EvoGM moves candidates towards the centroid of its winners, so it finds
optima near its initial population (the average, the one-hots) well and, measured here, does no better than random
search when the optimum is near the box's corners (`default_optimum(N, rng, radius=0.9)`), where PSO still does.
"""

from __future__ import annotations

import math

import torch
from evox.core import Problem

__all__ = ["NoisyLandscape", "RuggedLandscape", "SmoothLandscape", "TaskVectorLandscape", "default_optimum"]


def default_optimum(num_experts: int, rng: torch.Generator, radius: float = 0.5) -> torch.Tensor:
    """(N,) optimum uniform in [-radius, radius]^N with a negative first coordinate (so never a convex combination)."""
    optimum = radius * (2 * torch.rand(num_experts, generator=rng, device="cpu") - 1)
    optimum[0] = -optimum[0].abs()
    return optimum


class SmoothLandscape(Problem):
    """f(c) = -(c - c*)^T H (c - c*): a rotated ellipsoid, maximum 0 at c*.

    H = Q diag(e) Q^T with Q a random rotation and eigenvalues e spaced geometrically from 1 to `condition_number`,
    rescaled to mean 1 (so f is on the scale of -||c - c*||^2).
    """

    def __init__(
        self,
        num_experts: int,
        seed: int = 0,
        condition_number: float = 10.0,
        optimum: torch.Tensor | None = None,
        device: torch.device | None = None,
    ):
        """
        Args:
            num_experts: N.
            seed: seed of the landscape's own generator (optimum and rotation).
            condition_number: ratio of H's largest to smallest eigenvalue; 1 gives the sphere -||c - c*||^2.
            optimum: (N,) c*. Default `default_optimum` (inside [-0.5, 0.5]^N, off the simplex).
            device: device of the landscape's tensors.
        """
        super().__init__()
        rng = torch.Generator().manual_seed(seed)
        if optimum is None:
            optimum = default_optimum(num_experts, rng)
        eigenvalues = torch.logspace(0, math.log10(condition_number), num_experts, device="cpu")
        eigenvalues = eigenvalues / eigenvalues.mean()
        rotation, _ = torch.linalg.qr(torch.randn(num_experts, num_experts, generator=rng, device="cpu"))
        self.register_buffer("optimum", optimum.to(device=device, dtype=torch.float32))
        self.register_buffer("hessian", ((rotation * eigenvalues) @ rotation.T).to(device))

    def evaluate(self, pop: torch.Tensor) -> torch.Tensor:
        """(P, N) coefficients -> (P,) fitness, at most 0."""
        z = pop - self.optimum
        return -((z @ self.hessian) * z).sum(dim=-1)


class RuggedLandscape(Problem):
    """A shifted Rastrigin: f(c) = -sum_i [z_i^2 + A (1 - cos(2 pi k z_i))], z = c - c*; maximum 0 at c*.

    With the defaults (A = 0.1, k = 2) each coordinate has about four local maxima across [-1, 1], so the landscape
    has on the order of 4^N of them, each a cosine dip of depth up to 2A around a smooth bowl.
    """

    def __init__(
        self,
        num_experts: int,
        seed: int = 0,
        amplitude: float = 0.1,
        frequency: float = 2.0,
        optimum: torch.Tensor | None = None,
        device: torch.device | None = None,
    ):
        """
        Args:
            num_experts: N.
            seed: seed of the landscape's own generator (optimum).
            amplitude: A, the depth scale of the local optima.
            frequency: k, local optima per unit length along each coordinate.
            optimum: (N,) c*. Default `default_optimum`.
            device: device of the landscape's tensors.
        """
        super().__init__()
        if optimum is None:
            optimum = default_optimum(num_experts, torch.Generator().manual_seed(seed))
        self.amplitude = amplitude
        self.frequency = frequency
        self.register_buffer("optimum", optimum.to(device=device, dtype=torch.float32))

    def evaluate(self, pop: torch.Tensor) -> torch.Tensor:
        """(P, N) coefficients -> (P,) fitness, at most 0."""
        z = pop - self.optimum
        ripple = self.amplitude * (1 - torch.cos(2 * math.pi * self.frequency * z))
        return -(z**2 + ripple).sum(dim=-1)


class NoisyLandscape(Problem):
    """Another landscape's fitness plus Gaussian noise, like a score measured on a small validation set.

    The noise comes from the landscape's own seeded generator, so a run is reproducible and the noise does not
    consume (or depend on) torch's global RNG. `base.evaluate` stays available as the noise-free truth.
    """

    def __init__(self, base: Problem, noise_std: float = 0.05, seed: int = 0):
        """
        Args:
            base: the noise-free landscape.
            noise_std: standard deviation of the additive noise, per evaluation.
            seed: seed of the noise generator.
        """
        super().__init__()
        self.base = base
        self.noise_std = noise_std
        self._rng = torch.Generator().manual_seed(seed)

    def evaluate(self, pop: torch.Tensor) -> torch.Tensor:
        """(P, N) coefficients -> (P,) noisy fitness."""
        noise = torch.randn(pop.shape[0], generator=self._rng, device="cpu").to(pop.device)
        return self.base.evaluate(pop) + self.noise_std * noise


class TaskVectorLandscape(Problem):
    """Linear merging in a toy space: theta(c) = theta_pre + sum_i c_i tau_i, f(c) = -mean((theta(c) - theta*)^2).

    theta_pre and the task vectors tau (N, D) are random; the target theta* = theta(c*) plus a residual orthogonal to
    every tau, so c* is the unique optimum and f(c*) = -mean(residual^2), not 0. `merge` exposes theta(c), so tests
    can materialise experts, e.g. to check that EvoGM's basis shift is a change of coordinates.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int = 256,
        seed: int = 0,
        residual_scale: float = 0.1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ):
        """
        Args:
            num_experts: N.
            dim: D, the size of the toy parameter vector.
            seed: seed of the landscape's own generator.
            residual_scale: size of the part of the target no merge can reach.
            dtype: dtype of theta_pre, tau and theta* (float64 for exact-arithmetic tests).
            device: device of the landscape's tensors.
        """
        super().__init__()
        rng = torch.Generator().manual_seed(seed)
        base = torch.randn(dim, generator=rng, dtype=torch.float64, device="cpu")
        task_vectors = torch.randn(num_experts, dim, generator=rng, dtype=torch.float64, device="cpu") / math.sqrt(dim)
        optimum = default_optimum(num_experts, rng).double()
        residual = torch.randn(dim, generator=rng, dtype=torch.float64, device="cpu")
        q, _ = torch.linalg.qr(task_vectors.T)  # (D, N) orthonormal basis of span(tau)
        residual = residual_scale * (residual - q @ (q.T @ residual))
        self.register_buffer("base_params", base.to(device=device, dtype=dtype))
        self.register_buffer("task_vectors", task_vectors.to(device=device, dtype=dtype))
        self.register_buffer("target", (base + optimum @ task_vectors + residual).to(device=device, dtype=dtype))
        self.register_buffer("optimum", optimum.to(device=device, dtype=torch.float32))

    def merge(self, pop: torch.Tensor) -> torch.Tensor:
        """(P, N) coefficients -> (P, D) merged parameters theta_pre + c tau."""
        return self.base_params + pop.to(self.task_vectors.dtype) @ self.task_vectors

    def evaluate(self, pop: torch.Tensor) -> torch.Tensor:
        """(P, N) coefficients -> (P,) fitness (float32)."""
        return -((self.merge(pop) - self.target) ** 2).mean(dim=-1).float()
