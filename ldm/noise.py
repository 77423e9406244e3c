"""Seeded initial noise as AUTOMATIC1111 draws it with its CPU generator, variation seeds included.

Image i of a run has its own CPU generator seeded `seeds[i]`; its x_T is that generator's first draw, and
the sampler's later noise for that image continues from the same generator (pass the returned generators
to the sampler). A variation seed (`--subseed N --subseed_strength S`) slerps x_T towards the first draw of
a generator seeded `subseeds[i]` by S.
"""

import torch


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's spherical interpolation of two noises [C, H, W] (val 0: low, 1: high).

    As there, the norms and angles are taken along dim 1 (one angle per channel and column), and nearly
    parallel inputs (mean cosine > 0.9995) fall back to `low * val + high * (1 - val)`."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(
        1
    ) * high


def variation_noise(
    seeds: list[int],
    shape: tuple[int, ...],
    subseeds: list[int] | None = None,
    subseed_strength: float = 0.0,
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """(x_T [len(seeds), *shape] on the CPU, the per-image generators to continue from).

    x_T[i] is the first draw of a CPU generator seeded seeds[i], slerped by `subseed_strength` towards the
    first draw of one seeded subseeds[i] when given (AUTOMATIC1111 seeds image i with seed + i and
    subseed + i)."""
    if subseeds is not None and len(subseeds) != len(seeds):
        raise ValueError(f"{len(subseeds)} subseeds for {len(seeds)} seeds: pass one per image")
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    noises = []
    for i, generator in enumerate(generators):
        noise = torch.randn(shape, generator=generator)
        if subseeds is not None and subseed_strength != 0:
            subnoise = torch.randn(shape, generator=torch.Generator().manual_seed(subseeds[i]))
            noise = slerp(subseed_strength, noise, subnoise)
        noises.append(noise)
    return torch.stack(noises), generators
