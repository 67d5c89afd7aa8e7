"""GPT-2 with Dynamic Context Pruning, on top of Hugging Face transformers' GPT2LMHeadModel.

The weights and module names are those of `GPT2LMHeadModel`, so a `gpt2` checkpoint loads as is.
Each attention layer adds two interaction projections W_qi, W_ki (d -> r, no bias) and a scalar
beta. They score every earlier token, and the keep mask (see keep_mask.py) is added to the attention
logits as log I. With `dcp_enabled=False` the same class is the dense baseline.

The forward pass is written out here (embeddings, blocks, head) instead of calling GPT2Model, so that
the padding mask, the positions and the keep statistics are explicit. Hugging Face's own KV cache is
not used: incremental decoding with dropped tokens removed lives in the pruned KV cache.
"""

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Model, GPT2PreTrainedModel

from .keep_mask import LOG_KEEP_FLOOR, KeepStats, attention_bias, interaction_scores, keep_stats, log_keep_mask

logger = logging.getLogger(__name__)


class DCPGPT2Config(GPT2Config):
    """GPT2Config plus the DCP settings.

    dcp_enabled: score and drop tokens (False gives the dense model with the same code).
    dcp_rank: r, the width of the interaction projections (64 for GPT-2 in the reference recipe).
    dcp_beta_init: initial beta of every layer; positive so that nothing is dropped at the start.
    dcp_add_previous_mask: add the previous layer's log I to this layer's (off by default, as in the
        reference training recipe).
    """

    model_type = "dcp_gpt2"

    def __init__(
        self,
        dcp_enabled: bool = True,
        dcp_rank: int = 64,
        dcp_beta_init: float = 2.0,
        dcp_add_previous_mask: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if dcp_rank < 1:
            raise ValueError(f"dcp_rank must be a positive integer, got {dcp_rank}")
        self.dcp_enabled = dcp_enabled
        self.dcp_rank = dcp_rank
        self.dcp_beta_init = dcp_beta_init
        self.dcp_add_previous_mask = dcp_add_previous_mask


@dataclass
class DCPCausalLMOutput(CausalLMOutputWithCrossAttentions):
    """Causal LM output plus the per-layer keep statistics.

    layer_keep_sum, layer_pair_count: (L,) sums of I over valid pairs and their count, per layer.
    layer_hard_keep_sum: (L,) the sum for the hard mask of the same scores (equal in hard mode).
    log_keep: per layer (B, T, T) float32 log I, only when `return_log_keep=True`.
    """

    layer_keep_sum: torch.Tensor | None = None
    layer_pair_count: torch.Tensor | None = None
    layer_hard_keep_sum: torch.Tensor | None = None
    log_keep: tuple[torch.Tensor, ...] | None = None

    @property
    def layer_keep_fraction(self) -> torch.Tensor:
        """(L,) fraction of valid pairs kept, per layer."""
        return self.layer_keep_sum / self.layer_pair_count.clamp_min(1)

    @property
    def keep_fraction(self) -> torch.Tensor:
        """Mean over layers of the kept fraction: the sparsity loss term (1 - sparsity)."""
        return self.layer_keep_fraction.mean()


class DCPAttention(GPT2Attention):
    """GPT-2 self-attention with interaction projections and a learned keep mask."""

    def __init__(self, config: DCPGPT2Config, layer_idx: int):
        super().__init__(config, is_cross_attention=False, layer_idx=layer_idx)
        self.dcp_enabled = config.dcp_enabled
        if self.dcp_enabled:
            self.q_int = nn.Linear(config.hidden_size, config.dcp_rank, bias=False)
            self.k_int = nn.Linear(config.hidden_size, config.dcp_rank, bias=False)
            self.beta = nn.Parameter(torch.full((), float(config.dcp_beta_init)))

        # Entmax alpha of the sparse sigmoid; set by the training schedule, inf (hard drops) otherwise.
        self.alpha = math.inf

        # A fixed keep policy (a baseline such as a sliding window) replaces the learned mask when set:
        # policy(layer_idx=, query=, key=, key_valid=) -> log I (B, T, T) float32, with query and key
        # of shape (B, H, T, d_head). It works on dense models too.
        self.keep_policy: Callable[..., torch.Tensor] | None = None

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, H, T, d_head)."""
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def compute_log_keep(self, hidden_states: torch.Tensor, key_valid: torch.Tensor) -> tuple[torch.Tensor, KeepStats]:
        """Return log I (B, T, T) in float32 for layer-normed input (B, T, d), and its KeepStats.

        At finite alpha the stats also count the hard mask of the same scores (no gradient).
        """
        scores = interaction_scores(self.q_int(hidden_states), self.k_int(hidden_states), self.beta)
        log_keep = log_keep_mask(scores, self.alpha, key_valid)

        hard_log_keep = None
        if not math.isinf(self.alpha):
            hard_log_keep = log_keep_mask(scores.detach(), math.inf, key_valid)
        return log_keep, keep_stats(log_keep, key_valid, hard_log_keep)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_valid: torch.Tensor,
        previous_log_keep: torch.Tensor | None = None,
        has_padding: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, KeepStats | None]:
        """Attend over the whole sequence.

        hidden_states: (B, T, d), the layer-normed block input; key_valid: (B, T) bool, False at padding;
        has_padding=False promises that key_valid is all True, which allows the fused causal kernel.
        Returns the attention output (B, T, d), log I (B, T, T) or None when DCP is off, and KeepStats.
        """
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        query, key, value = self.split_heads(query), self.split_heads(key), self.split_heads(value)

        log_keep = None
        stats = None
        if self.keep_policy is not None:
            log_keep = self.keep_policy(layer_idx=self.layer_idx, query=query, key=key, key_valid=key_valid)
            stats = keep_stats(log_keep, key_valid)
        elif self.dcp_enabled:
            log_keep, stats = self.compute_log_keep(hidden_states, key_valid)
            if previous_log_keep is not None:
                # NOTE: at finite alpha this option's hard keep statistic falls back to the soft mask,
                # because the previous layer's hard mask is not kept.
                log_keep = (log_keep + previous_log_keep).clamp_min(LOG_KEEP_FLOOR)
                stats = keep_stats(log_keep, key_valid)

        dropout = self.attn_dropout.p if self.training else 0.0
        if log_keep is None and not has_padding:
            # Dense and unpadded: the fused causal kernel, exactly as Hugging Face's GPT-2 runs it.
            output = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=self.scaling)
        else:
            if log_keep is None:
                log_keep = torch.zeros(key_valid.shape[0], key_valid.shape[1], key_valid.shape[1], device=key_valid.device)
            bias = attention_bias(log_keep, key_valid, query.dtype)
            output = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=self.scaling)

        output = output.transpose(1, 2).reshape(hidden_states.shape)  # (B, T, d)
        output = self.resid_dropout(self.c_proj(output))
        return output, log_keep, stats


def _init_dcp_parameters(module: nn.Module, config: DCPGPT2Config) -> None:
    """Initialise the interaction projections (small) and beta (dcp_beta_init) of a DCPAttention."""
    if isinstance(module, DCPAttention) and module.dcp_enabled:
        init.normal_(module.q_int.weight, mean=0.0, std=config.initializer_range)
        init.normal_(module.k_int.weight, mean=0.0, std=config.initializer_range)
        init.constant_(module.beta, float(config.dcp_beta_init))


class DCPGPT2Model(GPT2Model):
    """GPT2Model whose blocks use DCPAttention.

    from_pretrained initialises missing weights module by module through the owning PreTrainedModel,
    so this class must know how to initialise the DCP parameters too.
    """

    config_class = DCPGPT2Config

    def __init__(self, config: DCPGPT2Config):
        super().__init__(config)
        for layer_idx, block in enumerate(self.h):
            block.attn = DCPAttention(config, layer_idx)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        _init_dcp_parameters(module, self.config)


class DCPGPT2LMHeadModel(GPT2LMHeadModel):
    """GPT-2 language model whose attention layers prune their context (see module docstring)."""

    config_class = DCPGPT2Config

    def __init__(self, config: DCPGPT2Config):
        # Same layout as GPT2LMHeadModel.__init__, with the DCP transformer.
        GPT2PreTrainedModel.__init__(self, config)
        self.transformer = DCPGPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        _init_dcp_parameters(module, self.config)

    @property
    def dcp_layers(self) -> list[DCPAttention]:
        return [block.attn for block in self.transformer.h]

    def set_alpha(self, alpha: float) -> None:
        """Set the sparse sigmoid's alpha in every layer (float('inf') for hard drops)."""
        if not alpha >= 1.0:
            raise ValueError(f"alpha must be >= 1 (inf for hard drops), got {alpha}")
        for layer in self.dcp_layers:
            layer.alpha = float(alpha)

    @classmethod
    def from_dense(
        cls,
        dense: GPT2LMHeadModel,
        dcp_enabled: bool = True,
        dcp_rank: int = 64,
        dcp_beta_init: float = 2.0,
        dcp_add_previous_mask: bool = False,
    ) -> "DCPGPT2LMHeadModel":
        """Build a DCP model from a dense GPT-2: same weights, new interaction parameters initialised."""
        config_dict = dense.config.to_dict()
        for key in ("model_type", "architectures", "transformers_version"):
            config_dict.pop(key, None)
        config = DCPGPT2Config(
            dcp_enabled=dcp_enabled,
            dcp_rank=dcp_rank,
            dcp_beta_init=dcp_beta_init,
            dcp_add_previous_mask=dcp_add_previous_mask,
            **config_dict,
        )
        model = cls(config)

        state = {name: tensor for name, tensor in dense.state_dict().items() if not name.endswith(".attn.bias")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        new_parameters = ("q_int.weight", "k_int.weight", "beta")
        missing = [name for name in missing if not name.endswith(new_parameters)]
        if missing or unexpected:
            raise ValueError(f"dense checkpoint does not match GPT-2: missing {missing}, unexpected {unexpected}")
        return model.to(dtype=next(dense.parameters()).dtype)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        return_log_keep: bool = False,
        **kwargs,
    ) -> DCPCausalLMOutput:
        """Run the full sequence and return logits, the LM loss when labels are given, and keep stats.

        input_ids: (B, T). attention_mask: (B, T), 1 for real tokens and 0 for padding (left or right).
        Positions default to each token's index among the real tokens of its row, so a left-padded
        row gets the same positions as the row alone.
        """
        unsupported = {name for name, value in kwargs.items() if value is not None and value is not False}
        unsupported -= {"use_cache", "return_dict", "output_attentions", "output_hidden_states"}
        if unsupported:
            raise TypeError(f"DCPGPT2LMHeadModel.forward got unsupported arguments: {sorted(unsupported)}")

        if attention_mask is None:
            key_valid = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            key_valid = attention_mask.bool()
        has_padding = attention_mask is not None and not bool(key_valid.all())
        if position_ids is None:
            position_ids = (key_valid.long().cumsum(-1) - 1).clamp_min(0)

        hidden = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)
        hidden = self.transformer.drop(hidden)

        keep_sums, pair_counts, hard_keep_sums, log_keeps = [], [], [], []
        previous_log_keep = None
        for block in self.transformer.h:
            attn_output, log_keep, stats = block.attn(block.ln_1(hidden), key_valid, previous_log_keep, has_padding)
            hidden = hidden + attn_output
            hidden = hidden + block.mlp(block.ln_2(hidden))

            if self.config.dcp_add_previous_mask:
                previous_log_keep = log_keep
            if stats is None:
                stats = _all_kept(key_valid)
            keep_sums.append(stats.keep_sum)
            pair_counts.append(stats.pair_count)
            hard_keep_sums.append(stats.hard_keep_sum)
            if return_log_keep:
                log_keeps.append(log_keep)

        logits = self.lm_head(self.transformer.ln_f(hidden))  # (B, T, V)

        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)

        return DCPCausalLMOutput(
            loss=loss,
            logits=logits,
            layer_keep_sum=torch.stack(keep_sums),
            layer_pair_count=torch.stack(pair_counts),
            layer_hard_keep_sum=torch.stack(hard_keep_sums),
            log_keep=tuple(log_keeps) if return_log_keep else None,
        )


def _all_kept(key_valid: torch.Tensor) -> KeepStats:
    """KeepStats of a dense layer: every valid pair is kept."""
    zeros = torch.zeros(key_valid.shape[0], key_valid.shape[1], key_valid.shape[1], device=key_valid.device)
    return keep_stats(zeros, key_valid)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; labels (B, T) are shifted here, -100 is ignored."""
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    return F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1), ignore_index=-100)


AutoConfig.register(DCPGPT2Config.model_type, DCPGPT2Config, exist_ok=True)
AutoModelForCausalLM.register(DCPGPT2Config, DCPGPT2LMHeadModel, exist_ok=True)
