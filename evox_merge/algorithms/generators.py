"""EvoGM's dual generators: two MLPs on coefficient vectors and the training step that fits them
(arXiv 2605.29295, sec. 2.2).

G_f (forward, loser -> winner) and G_b (backward, winner -> loser) are trained jointly on

    L = alpha_c * L_cyc + alpha_o * L_opt
    L_cyc = E||G_b(G_f(l)) - l||^2 + E||G_f(G_b(w)) - w||^2      l ~ H-, w ~ H+
    L_opt = E||G_f(l) - mu+||^2                                   mu+ = mean of H+

with ||.||^2 averaged over coordinates, as the authors' code does (`nn.MSELoss`); under Adam only the ratio
alpha_c / alpha_o matters, so this equals the paper's summed form up to Adam's epsilon.

Everything here runs on CPU, single-threaded (`single_threaded`), and draws its randomness from a caller-supplied
`torch.Generator`, so the same generator state gives bit-identical weights on every run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["GeneratorPair", "build_generator", "single_threaded"]


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch's CPU kernels on one intra-op thread inside the block; restore the previous count on exit.

    Tiny-MLP training oversubscribes threads badly (docs/evox.md: measured 0.93 s vs 29 s per generation on two
    shared cores), while model evaluation outside the block keeps every thread. One thread also makes the training
    bit-reproducible regardless of the machine's core count.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_generator(dim: int, hidden_sizes: Sequence[int], rng: torch.Generator | None) -> nn.Sequential:
    """A generator MLP on CPU: `Linear + ReLU` per hidden width, then `Linear + Tanh`, so outputs lie in (-1, 1)^dim.

    Args:
        dim: length N of the coefficient vectors it maps, (B, N) -> (B, N).
        hidden_sizes: hidden widths; the paper's five-layer MLP is (128, 256, 256, 256, 128).
        rng: weights get `nn.Linear`'s default initialisation drawn from this generator, so building a generator
            never touches torch's global RNG. None leaves the weights uninitialised (to be loaded from a state dict).
    """
    widths = [dim, *hidden_sizes, dim]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        linear = nn.utils.skip_init(nn.Linear, fan_in, fan_out, device="cpu")
        if rng is not None:
            _init_linear(linear, rng)
        layers += [linear, nn.ReLU()]
    layers[-1] = nn.Tanh()
    return nn.Sequential(*layers)


def _init_linear(linear: nn.Linear, rng: torch.Generator) -> None:
    # nn.Linear.reset_parameters with an explicit generator: Kaiming-uniform weights, U(+-1/sqrt(fan_in)) bias.
    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=rng)
    bound = 1.0 / math.sqrt(linear.in_features)
    nn.init.uniform_(linear.bias, -bound, bound, generator=rng)


class GeneratorPair:
    """G_f (and, unless single, G_b) with one Adam optimiser over both; `reset` starts a fresh pair.

    Kept outside EvoX's module tree on purpose: the workflow's `.to(device)` must not move the generators off the
    CPU, and their parameters are not hyperparameters. `state_dict`/`load_state_dict` checkpoint them.
    """

    def __init__(self, dim: int, hidden_sizes: Sequence[int], dual: bool = True) -> None:
        """
        Args:
            dim: coefficient-vector length N.
            hidden_sizes: hidden widths of both MLPs.
            dual: False builds only G_f (the paper's single-generator ablation, Table 11).
        """
        self.dim = dim
        self.hidden_sizes = tuple(hidden_sizes)
        self.dual = dual
        self.forward_net: nn.Sequential | None = None
        self.backward_net: nn.Sequential | None = None
        self.optimizer: torch.optim.Adam | None = None

    def reset(self, lr: float, rng: torch.Generator) -> None:
        """Fresh random generators and a fresh Adam(lr) optimiser (EvoGM resets them at the start of every round)."""
        self._build(lr, rng)

    def _build(self, lr: float, rng: torch.Generator | None) -> None:
        self.forward_net = build_generator(self.dim, self.hidden_sizes, rng)
        self.backward_net = build_generator(self.dim, self.hidden_sizes, rng) if self.dual else None
        params = [p for net in (self.forward_net, self.backward_net) if net is not None for p in net.parameters()]
        # fused: one kernel per step instead of a Python loop over tensors; deterministic on CPU.
        self.optimizer = torch.optim.Adam(params, lr=lr, fused=True)

    @torch.no_grad()
    def generate(self, coefficients: torch.Tensor) -> torch.Tensor:
        """G_f applied to a batch: (B, N) -> (B, N), values in (-1, 1). Runs single-threaded on CPU."""
        with single_threaded():
            return self.forward_net(coefficients.cpu())

    def train(
        self,
        winners: torch.Tensor,
        losers: torch.Tensor,
        steps: int,
        cycle_weight: float,
        opt_weight: float,
        rng: torch.Generator,
    ) -> torch.Tensor:
        """Fit the generators for `steps` full-batch Adam steps.

        Each step draws m = min(|H+|, |H-|) winners and m losers without replacement (the authors' batching, an
        unbiased sample of H- x H+), so it needs both sets non-empty.

        Args:
            winners: (W, N) H+ in generator coordinates ([-1, 1] box).
            losers: (L, N) H- in generator coordinates.
            steps: number of optimiser steps.
            cycle_weight: alpha_c; 0 drops the cycle loss (the paper's "w/o cycle loss" ablation), which leaves
                G_b without a gradient, so the result then trains G_f exactly as the single-generator variant does.
            opt_weight: alpha_o.
            rng: source of the mini-batch draws.

        Returns:
            (steps, 3) float tensor of per-step losses: total, cycle, optimisation-guided (before weighting).
        """
        winners, losers = winners.cpu(), losers.cpu()
        batch = min(len(winners), len(losers))
        winner_mean = winners.mean(dim=0)
        losses = torch.empty(steps, 3, device="cpu")
        with single_threaded():
            for step in range(steps):
                w = _subset(winners, batch, rng)
                l = _subset(losers, batch, rng)
                cycle, opt = self._losses(w, l, winner_mean, with_cycle=cycle_weight != 0.0)
                total = cycle_weight * cycle + opt_weight * opt
                self.optimizer.zero_grad(set_to_none=True)
                total.backward()
                self.optimizer.step()
                losses[step] = torch.stack([total, cycle, opt]).detach()
        return losses

    def _losses(
        self, w: torch.Tensor, l: torch.Tensor, winner_mean: torch.Tensor, with_cycle: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fake_winners = self.forward_net(l)  # G_f(l)
        opt = nn.functional.mse_loss(fake_winners, winner_mean.expand_as(fake_winners))
        if self.backward_net is None or not with_cycle:
            return torch.zeros((), device="cpu"), opt
        # One G_b call on [G_f(l); w] gives both the loser reconstruction and the fake losers.
        back = self.backward_net(torch.cat([fake_winners, w]))
        reconstructed_losers, fake_losers = back[: len(l)], back[len(l) :]
        reconstructed_winners = self.forward_net(fake_losers)  # G_f(G_b(w))
        cycle = nn.functional.mse_loss(reconstructed_losers, l) + nn.functional.mse_loss(reconstructed_winners, w)
        return cycle, opt

    def state_dict(self) -> dict[str, Any] | None:
        """Weights of both nets and the optimiser state, or None before the first `reset`."""
        if self.forward_net is None:
            return None
        return {
            "forward": self.forward_net.state_dict(),
            "backward": None if self.backward_net is None else self.backward_net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore what `state_dict` returned (rebuilds the nets without drawing random numbers)."""
        if state is None:
            self.forward_net = self.backward_net = self.optimizer = None
            return
        self._build(lr=state["optimizer"]["param_groups"][0]["lr"], rng=None)
        self.forward_net.load_state_dict(state["forward"])
        if self.backward_net is not None:
            self.backward_net.load_state_dict(state["backward"])
        self.optimizer.load_state_dict(state["optimizer"])


def _subset(rows: torch.Tensor, size: int, rng: torch.Generator) -> torch.Tensor:
    # `size` rows drawn without replacement; the whole set when it is exactly that big (order is irrelevant).
    if len(rows) == size:
        return rows
    return rows[torch.randperm(len(rows), generator=rng, device="cpu")[:size]]
