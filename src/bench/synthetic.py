"""Randomly initialised GPT-2 models whose hard keep mask keeps a chosen fraction of the context.

Used where no trained model exists at the wanted size (GPT-2 small shapes, context 1024). The drop
decision of every layer is wired to the token id:

- Each token id t has a durability u_t = (t + 0.5) / V * u_max. Layer l keeps token t iff u_t < k_l,
  where the layer keep fractions k_l spread around the chosen keep fraction (`layer_spread`).
- Residual dimension l (l < L) carries +A when layer l keeps the token and -A otherwise (set in wte),
  and dimension L carries 0. Attention and MLP outputs write nothing into dimensions 0..L, and wpe
  is zero there, so every layer sees the token's flags unchanged.
- ln_1 of layer l maps dimension L to exactly 1 (weight 0, bias 1). W_ki reads dimension l into
  interaction coordinate 0 and W_qi reads dimension L into it; beta is 0. The score of a new token
  against token j is then positive iff layer l keeps j, whatever the new token is.
- Row b draws its tokens with u uniform on [0, 1 / rho_b], so it keeps min(1, rho_b * k_l) of its
  tokens in layer l. The row factors rho_b are log-normal with mean 1 (`row_spread`), which gives the
  per-row spread of live counts that trained models show.

A token is thus either kept for good or dropped by the next query. Trained models drop tokens at
every age, but the cost of a decode step depends only on how many tokens each row keeps.
"""

from dataclasses import dataclass

import torch

from src.dcp import DCPGPT2Config, DCPGPT2LMHeadModel

_FLAG = 1.0  # |A|, the flag value in the residual stream


@dataclass
class SyntheticModel:
    """A model wired as in the module docstring, and the durability u_t of each token id (V,)."""

    model: DCPGPT2LMHeadModel
    durability: torch.Tensor
    layer_keep: list[float]
    u_max: float


def layer_keep_fractions(keep_fraction: float, n_layer: int, layer_spread: float) -> list[float]:
    """Spread the keep fraction linearly over layers: keep * (1 - spread/2) .. keep * (1 + spread/2), clipped to [0, 1]."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if n_layer == 1:
        return [keep_fraction]
    factors = torch.linspace(1.0 - layer_spread / 2, 1.0 + layer_spread / 2, n_layer)
    return [min(1.0, max(0.0, keep_fraction * float(factor))) for factor in factors]


def row_keep_factors(batch_size: int, row_spread: float, generator: torch.Generator) -> torch.Tensor:
    """Return log-normal factors rho_b (B,) with mean 1 and log standard deviation row_spread."""
    normal = torch.randn(batch_size, generator=generator)
    factors = torch.exp(row_spread * normal - row_spread**2 / 2)
    return factors


def build_synthetic_model(
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_positions: int,
    vocab_size: int,
    dcp_rank: int,
    keep_fraction: float | None,
    layer_spread: float = 0.5,
    u_max: float = 4.0,
    seed: int = 0,
) -> SyntheticModel:
    """Build a random model; keep_fraction None gives the dense model (dcp_enabled=False) of the same shape."""
    if n_embd < n_layer + 1:
        raise ValueError(f"n_embd={n_embd} must exceed n_layer={n_layer}: each layer needs its own residual flag dimension")
    torch.manual_seed(seed)
    dense = keep_fraction is None
    config = DCPGPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        vocab_size=vocab_size,
        dcp_enabled=not dense,
        dcp_rank=dcp_rank,
        dcp_beta_init=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = DCPGPT2LMHeadModel(config).eval()
    durability = (torch.arange(vocab_size, dtype=torch.float32) + 0.5) / vocab_size * u_max
    layer_keep = [1.0] * n_layer if dense else layer_keep_fractions(keep_fraction, n_layer, layer_spread)
    if not dense:
        _wire_flags(model, durability, layer_keep)
    return SyntheticModel(model=model, durability=durability, layer_keep=layer_keep, u_max=u_max)


@torch.no_grad()
def _wire_flags(model: DCPGPT2LMHeadModel, durability: torch.Tensor, layer_keep: list[float]) -> None:
    """Set the weights described in the module docstring."""
    n_layer = len(layer_keep)
    flags = slice(0, n_layer + 1)  # dimensions 0..L-1 are flags, L is the constant
    transformer = model.transformer

    transformer.wpe.weight[:, flags] = 0.0
    for layer, keep in enumerate(layer_keep):
        transformer.wte.weight[:, layer] = torch.where(durability < keep, _FLAG, -_FLAG)
    transformer.wte.weight[:, n_layer] = 0.0

    for layer, block in enumerate(transformer.h):
        for projection in (block.attn.c_proj, block.mlp.c_proj):
            projection.weight[:, flags] = 0.0
            projection.bias[flags] = 0.0
        block.ln_1.weight[n_layer] = 0.0
        block.ln_1.bias[n_layer] = 1.0

        attn = block.attn
        attn.k_int.weight.zero_()
        attn.q_int.weight.zero_()
        attn.k_int.weight[0, layer] = 1.0
        attn.q_int.weight[0, n_layer] = 1.0
        attn.beta.zero_()


def sample_tokens(synthetic: SyntheticModel, row_factors: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """Draw (B, length) token ids, row b with durability uniform on [0, 1 / rho_b] (clipped to u_max)."""
    batch = row_factors.shape[0]
    vocab = synthetic.durability.shape[0]
    upper = torch.clamp(1.0 / row_factors, max=synthetic.u_max)  # (B,)
    durability = torch.rand(batch, length, generator=generator) * upper[:, None]
    ids = torch.floor(durability / synthetic.u_max * vocab).long()
    return ids.clamp(0, vocab - 1)


def expected_keep(synthetic: SyntheticModel, token_ids: torch.Tensor) -> torch.Tensor:
    """Return (L, B, T) bool: whether layer l keeps each token once a later token has scored it."""
    durability = synthetic.durability[token_ids]  # (B, T)
    return torch.stack([durability < keep for keep in synthetic.layer_keep])


def expected_keep_fraction(synthetic: SyntheticModel, row_factors: torch.Tensor) -> float:
    """Mean over layers and rows of min(1, rho_b * k_l): the keep fraction of long sequences."""
    fractions = [torch.clamp(row_factors * keep, max=1.0).mean() for keep in synthetic.layer_keep]
    return float(torch.stack(fractions).mean())


def describe(synthetic: SyntheticModel) -> dict:
    config = synthetic.model.config
    return {
        "n_layer": config.n_layer,
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "n_positions": config.n_positions,
        "vocab_size": config.vocab_size,
        "dcp_enabled": config.dcp_enabled,
        "layer_keep": [round(keep, 4) for keep in synthetic.layer_keep],
        "parameters": sum(parameter.numel() for parameter in synthetic.model.parameters()),
    }


def synthetic_cache_inputs(synthetic: SyntheticModel, token_ids: torch.Tensor, dtype: torch.dtype, generator: torch.Generator):
    """Yield per layer (key, value, k_int, keep) for filling a cache without running the prompt.

    Keys and values are random (a decode step's cost does not depend on their values); k_int is what
    the wired model computes up to a positive scale, and keep is what its prefill keeps (the last
    prompt token always stays). Shapes: key, value (B, H, T, d_head), k_int (B, T, r), keep (B, T).
    """
    config = synthetic.model.config
    batch, length = token_ids.shape
    head_dim = config.n_embd // config.n_head
    keep_all = expected_keep(synthetic, token_ids)
    key = torch.randn(batch, config.n_head, length, head_dim, generator=generator).to(dtype)
    value = torch.randn(batch, config.n_head, length, head_dim, generator=generator).to(dtype)
    for layer in range(config.n_layer):
        keep = keep_all[layer].clone() if config.dcp_enabled else torch.ones_like(keep_all[layer])
        keep[:, -1] = True
        k_int = None
        if config.dcp_enabled:
            k_int = torch.zeros(batch, length, config.dcp_rank, dtype=dtype)
            k_int[:, :, 0] = torch.where(keep_all[layer], 1.0, -1.0).to(dtype)
        yield key, value, k_int, keep

