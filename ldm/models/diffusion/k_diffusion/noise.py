"""Where the fresh noise of ancestral and SDE steps comes from: `noise(sigma, sigma_next)` -> [B, C, H, W] of
unit variance, for the step from sigma down to sigma_next.

Both keep each image's noise its own, as AUTOMATIC1111 does with its CPU generator: the ancestral noise of
image i is the next draw from image i's generator; the SDE samplers' Brownian motion is one tree per image,
seeded with the image's seed. So image i does not depend on the batch it is in.
"""

import warnings

import torch

from ldm.models.diffusion.sampling import Generators, randn


class GeneratorNoise:
    """Independent normal draws: one latent's shape per image from `generator[i]` (or the whole batch from
    one generator, or torch's global RNG for None), in call order."""

    def __init__(self, shape: tuple, device: torch.device, generator: Generators = None) -> None:
        self.shape, self.device, self.generator = shape, device, generator

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return randn(self.shape, self.device, self.generator)


def generator_seeds(generator: Generators, batch_size: int) -> list[int] | int | None:
    """The seeds of the Brownian trees: each image's generator's seed, one generator's seed (one tree for the
    batch), or None (drawn from torch's global RNG)."""
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        return generator.initial_seed()
    if len(generator) != batch_size:
        raise ValueError(f"{len(generator)} generators for a batch of {batch_size}: pass one per batch entry")
    return [g.initial_seed() for g in generator]


class BrownianNoise:
    """Increments of a Brownian motion W(sigma) over [sigma_min, sigma_max], normalized:
    (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma| (k-diffusion's BrownianTreeNoiseSampler).

    One torchsde.BrownianTree per image when `seeds` is a list (trees over one latent [C, H, W]), or one tree
    over the whole batch for a single seed. The same motion is queried at every step, so the SDE samplers
    converge as the steps get finer instead of drawing unrelated noise.
    """

    def __init__(
        self,
        x: torch.Tensor,
        sigma_min: torch.Tensor,
        sigma_max: torch.Tensor,
        seeds: list[int] | int | None = None,
    ) -> None:
        import torchsde  # only the SDE samplers need it

        if seeds is None:
            seeds = torch.randint(0, 2**63 - 1, []).item()
        self.batched = isinstance(seeds, list)
        w0 = torch.zeros_like(x[0] if self.batched else x)
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self.trees = [
            torchsde.BrownianTree(t0, w0, t1, entropy=seed) for seed in (seeds if self.batched else [seeds])
        ]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        low, high = torch.minimum(sigma, sigma_next), torch.maximum(sigma, sigma_next)
        # W(sigma_next) - W(sigma): minus the tree's forward increment when stepping down in sigma
        sign = 1.0 if sigma_next > sigma else -1.0
        with warnings.catch_warnings():
            # torchsde warns when a query rounds a hair outside [sigma_min, sigma_max] (the end points are
            # themselves queried); the tree clamps it, as in k-diffusion
            warnings.filterwarnings("ignore", message="Should have t")
            w = torch.stack([tree(low, high) for tree in self.trees]) * sign
        w = w if self.batched else w[0]
        return w / (high - low).sqrt()
