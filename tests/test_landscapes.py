"""Synthetic coefficient landscapes: known optimum, higher-is-better, cheap, reproducible."""

import time

import pytest
import torch

from evox_merge.problems.landscapes import (
    NoisyLandscape,
    RuggedLandscape,
    SmoothLandscape,
    TaskVectorLandscape,
    default_optimum,
)

N = 8


def _uniform(num: int, seed: int = 0) -> torch.Tensor:
    return 2 * torch.rand(num, N, generator=torch.Generator().manual_seed(seed)) - 1


@pytest.mark.parametrize("landscape_cls", [SmoothLandscape, RuggedLandscape])
def test_maximum_is_zero_at_an_optimum_inside_the_box_and_off_the_simplex(landscape_cls):
    landscape = landscape_cls(N, seed=3)
    optimum = landscape.optimum
    assert optimum.abs().max() < 1
    assert (optimum < 0).any(), "a negative coefficient: not a convex combination of experts"
    assert landscape.evaluate(optimum[None]).item() == pytest.approx(0.0, abs=1e-6)
    others = landscape.evaluate(_uniform(1000))
    assert others.shape == (1000,)
    assert (others < 0).all()


def test_smooth_landscape_is_a_quadratic_with_the_requested_conditioning():
    landscape = SmoothLandscape(N, seed=1, condition_number=10.0)
    eigenvalues = torch.linalg.eigvalsh(landscape.hessian)
    assert eigenvalues.max() / eigenvalues.min() == pytest.approx(10.0, rel=1e-3)
    assert eigenvalues.mean() == pytest.approx(1.0, rel=1e-4)
    direction = torch.randn(N)
    line = landscape.optimum + torch.linspace(-1, 1, 41)[:, None] * direction
    fitness = landscape.evaluate(line)
    assert torch.all(fitness[:20].diff() > 0) and torch.all(fitness[20:].diff() < 0), "unimodal along a line"


def test_sphere_is_the_unit_condition_number_case():
    landscape = SmoothLandscape(N, condition_number=1.0, optimum=torch.zeros(N))
    pop = _uniform(5)
    torch.testing.assert_close(landscape.evaluate(pop), -(pop**2).sum(-1))


def test_rugged_landscape_has_local_optima_along_a_coordinate():
    landscape = RuggedLandscape(N, seed=0)
    line = landscape.optimum.repeat(401, 1)
    line[:, 1] = torch.linspace(-1, 1, 401)
    fitness = landscape.evaluate(line)
    interior = fitness[1:-1]
    local_maxima = ((interior > fitness[:-2]) & (interior > fitness[2:])).sum()
    assert local_maxima >= 3


def test_noisy_landscape_is_reproducible_unbiased_and_leaves_the_global_rng_alone():
    base = SmoothLandscape(N, seed=0)
    pop = _uniform(4000)
    torch.manual_seed(123)
    expected_global = torch.rand(1)
    torch.manual_seed(123)
    first = NoisyLandscape(base, noise_std=0.05, seed=7).evaluate(pop)
    assert torch.rand(1) == expected_global
    second = NoisyLandscape(base, noise_std=0.05, seed=7).evaluate(pop)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    noise = first - base.evaluate(pop)
    assert noise.std().item() == pytest.approx(0.05, rel=0.1)
    assert abs(noise.mean().item()) < 0.005


def test_task_vector_landscape_is_linear_merging_with_its_optimum_at_c_star():
    landscape = TaskVectorLandscape(N, dim=64, seed=2, dtype=torch.float64)
    pop = _uniform(6).double()
    expected = landscape.base_params + pop @ landscape.task_vectors
    torch.testing.assert_close(landscape.merge(pop), expected)
    best = landscape.evaluate(landscape.optimum[None]).item()
    assert (landscape.evaluate(pop.float()) < best).all()
    # c* is the least-squares merge: the gradient of the fitness vanishes there.
    c = landscape.optimum.double().clone().requires_grad_()
    (-((landscape.merge(c[None]) - landscape.target) ** 2).mean()).backward()
    assert c.grad.abs().max() < 1e-6


def test_default_optimum_is_seeded_and_never_on_the_simplex():
    first = default_optimum(N, torch.Generator().manual_seed(5))
    torch.testing.assert_close(first, default_optimum(N, torch.Generator().manual_seed(5)))
    assert first[0] < 0
    assert first.abs().max() <= 0.5


@pytest.mark.parametrize(
    "landscape",
    [
        SmoothLandscape(N),
        RuggedLandscape(N),
        NoisyLandscape(SmoothLandscape(N)),
        TaskVectorLandscape(N),
    ],
    ids=["smooth", "rugged", "noisy", "task_vector"],
)
def test_a_population_costs_well_under_a_millisecond_per_candidate(landscape):
    pop = _uniform(20)
    landscape.evaluate(pop)
    start = time.perf_counter()
    for _ in range(100):
        landscape.evaluate(pop)
    per_candidate = (time.perf_counter() - start) / (100 * 20)
    assert per_candidate < 1e-3
