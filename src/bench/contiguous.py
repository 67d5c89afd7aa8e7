"""A contiguous dense KV cache with scaled_dot_product_attention: the usual dense baseline.

The paged cache pays for its ragged rows with many small matrix products and a segmented softmax.
This baseline stores each layer's keys and values in one (B, H, S, d_head) tensor, sized for the
prompt plus the new tokens, and attends with one SDPA call, as a plain dense KV cache does. The
benchmark reports the dense model with both caches, so a DCP speed-up is not just the paged code
being compared against itself.
"""

import torch
import torch.nn.functional as F

from src.dcp import DCPGPT2LMHeadModel


class ContiguousLayerCache:
    """One layer's dense keys and values; a padded slot is masked out, nothing is ever dropped."""

    def __init__(self, batch_size: int, num_heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device):
        shape = (batch_size, num_heads, capacity, head_dim)
        self.key = torch.zeros(shape, dtype=dtype, device=device)
        self.value = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.length = 0  # columns in use; equal for every row

    def fill(self, key, value, k_int, keep, position) -> None:
        """Store the prompt's keys and values (B, H, T, d_head); `keep` (B, T) marks real tokens."""
        length = key.shape[2]
        self.key[:, :, :length] = key
        self.value[:, :, :length] = value
        self.valid[:, :length] = keep
        self.length = length

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store one new token per row (B, H, d_head) in the next column."""
        self.key[:, :, self.length] = key
        self.value[:, :, self.length] = value
        self.valid[:, self.length] = True
        self.length += 1

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attend with query (B, H, d_head) over the stored columns; returns (B, H, d_head)."""
        length = self.length
        mask = self.valid[:, None, None, :length]  # (B, 1, 1, S)
        output = F.scaled_dot_product_attention(
            query[:, :, None], self.key[:, :, :length], self.value[:, :, :length], attn_mask=mask, scale=scaling
        )
        return output[:, :, 0]

    def allocated_bytes(self) -> int:
        return sum(tensor.untyped_storage().nbytes() for tensor in (self.key, self.value, self.valid))


class ContiguousKVCache:
    """Contiguous caches of all layers, sized for `capacity` columns, and each row's next position."""

    def __init__(self, model: DCPGPT2LMHeadModel, batch_size: int, capacity: int, dtype: torch.dtype, device):
        config = model.config
        head_dim = config.n_embd // config.n_head
        self.layers = [ContiguousLayerCache(batch_size, config.n_head, head_dim, capacity, dtype, device) for _ in range(config.n_layer)]
        self.next_position = torch.zeros(batch_size, dtype=torch.int64, device=device)

    def allocated_bytes(self) -> int:
        return sum(layer.allocated_bytes() for layer in self.layers)

    def layer_allocated_bytes(self) -> list[int]:
        return [layer.allocated_bytes() for layer in self.layers]

    def live_counts(self) -> torch.Tensor:
        """(L, B) real tokens per layer and row."""
        return torch.stack([layer.valid[:, : layer.length].sum(dim=1) for layer in self.layers])


@torch.no_grad()
def contiguous_decode_step(model: DCPGPT2LMHeadModel, cache: ContiguousKVCache, token_ids: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (B,) through a dense model with the contiguous cache; return logits (B, V)."""
    if model.config.dcp_enabled:
        raise ValueError("the contiguous cache is a dense baseline; the model must have dcp_enabled=False")
    transformer = model.transformer
    positions = cache.next_position
    hidden = transformer.wte(token_ids) + transformer.wpe(positions)  # (B, d)

    for block, layer_cache in zip(transformer.h, cache.layers):
        attn = block.attn
        query, key, value = attn.c_attn(block.ln_1(hidden)).split(attn.split_size, dim=1)
        shape = (hidden.shape[0], attn.num_heads, attn.head_dim)
        layer_cache.append(key.view(shape), value.view(shape))
        output = layer_cache.attend(query.view(shape), attn.scaling)
        hidden = hidden + attn.c_proj(output.reshape(hidden.shape))
        hidden = hidden + block.mlp(block.ln_2(hidden))

    cache.next_position = positions + 1
    return model.lm_head(transformer.ln_f(hidden))
