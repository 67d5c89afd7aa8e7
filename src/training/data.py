"""Training batches drawn from prepared token files, in an order fixed by the seed and the step.

Sample i of a run is the block at a random offset drawn from a generator seeded with (seed, i).
A run resumed at global step t starts at sample t * samples_per_step, so it sees exactly the data it
would have seen without the interruption, whatever Lightning does with the epoch.
"""

import numpy as np
import torch
from torch.utils.data import Dataset


class RandomBlocks(Dataset):
    """`num_samples` blocks of `block_size` tokens at seeded random offsets, from sample `start` on."""

    def __init__(self, tokens: np.ndarray, block_size: int, num_samples: int, seed: int, start: int = 0):
        if len(tokens) < block_size:
            raise ValueError(
                f"the training split has {len(tokens)} tokens, fewer than one block of {block_size}; "
                "lower block_size or prepare more data"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.num_samples = num_samples
        self.seed = seed
        self.start = start

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> torch.Tensor:
        generator = np.random.default_rng([self.seed, self.start + index])
        offset = int(generator.integers(0, len(self.tokens) - self.block_size + 1))
        block = self.tokens[offset : offset + self.block_size]
        return torch.from_numpy(block.astype(np.int64))  # (block_size,)


class ContiguousBlocks(Dataset):
    """Non-overlapping blocks of `block_size` tokens from the start of a split (at most `max_blocks`)."""

    def __init__(self, tokens: np.ndarray, block_size: int, max_blocks: int | None = None):
        count = len(tokens) // block_size
        if count == 0:
            raise ValueError(
                f"the split has {len(tokens)} tokens, fewer than one block of {block_size}; "
                "lower block_size or prepare more data"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.count = count if max_blocks is None else min(count, max_blocks)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.count:
            raise IndexError(f"block {index} is out of range for {self.count} blocks")
        start = index * self.block_size
        return torch.from_numpy(self.tokens[start : start + self.block_size].astype(np.int64))
