"""Random streams of a training run: every draw (a batch order, a micro-batch's noise, a class image) comes from its
own CPU generator, seeded from the run's seed and the draw's index, so a resumed run draws what the uninterrupted
one would have, on any device."""

from __future__ import annotations

import torch

# (seed, index) -> seed * SEED_STRIDE + index gives different runs' streams different generator seeds as long as the
# index stays below the stride: micro-batch indices (steps x grad_accum x processes), epochs and class images all
# do by far. A prime, so that no common stride of seeds and indices lines two streams up.
SEED_STRIDE = 1_000_003


def stream(seed: int, index: int) -> torch.Generator:
    """The CPU generator of draw `index` (>= 0, < SEED_STRIDE) of the run seeded `seed`."""
    return torch.Generator().manual_seed(seed * SEED_STRIDE + index)
