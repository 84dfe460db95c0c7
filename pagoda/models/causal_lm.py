"""Models layer: what every decoder model shares — the (possibly tied) LM head and the worker-facing methods."""

from __future__ import annotations

from torch import Tensor, nn

from pagoda.models.interfaces import AttentionContext, AttentionLayerSpec
from pagoda.models.layers import PACKED_MODULES_MAPPING, CheckpointLinear, compute_logits, pack_lm_head_for_cpu
from pagoda.models.quantization import Int8Weight


class CausalLM(nn.Module):
    """A decoder stack (`model`, with `embed_tokens`) plus the LM head; subclasses build the stack."""

    packed_modules_mapping = PACKED_MODULES_MAPPING

    def __init__(self, config: dict, model: nn.Module, specs: list[AttentionLayerSpec], tie_by_default: bool,
                 final_logit_softcap: float | None = None) -> None:
        super().__init__()
        self.specs = specs
        self.model = model
        self.final_logit_softcap = final_logit_softcap
        self.vocab_size: int = config["vocab_size"]
        tied = bool(config.get("tie_word_embeddings", tie_by_default))
        self.lm_head = None if tied else CheckpointLinear(config["hidden_size"], config["vocab_size"], bias=False)
        # A tied checkpoint may still carry a copy of the embedding as lm_head.
        self.ignored_weights = frozenset({"lm_head.weight"} if tied else ())
        self.lm_head_int8: Int8Weight | None = None
        self.lm_head_packed: list[Tensor] | None = None

    def forward(self, input_ids: Tensor, positions: Tensor, attention: AttentionContext) -> Tensor:
        """input_ids and positions [T] -> hidden states [T, hidden_size]."""
        return self.model(input_ids, positions, attention)

    def compute_logits(self, hidden: Tensor, out: Tensor | None = None) -> Tensor:
        """hidden [N, hidden_size] -> float32 logits [N, vocab_size] (into `out` when given), soft-capped when
        the config says so."""
        return compute_logits(hidden, self._lm_head_weight(), self.final_logit_softcap, self.lm_head_int8,
                              self.lm_head_packed, out)

    def quantize_int8(self) -> None:
        """An int8 copy of the LM head for few-row calls; the embedding (tied) or lm_head weight stays."""
        self.lm_head_int8 = Int8Weight.quantize(self._lm_head_weight())

    def pack_weight(self) -> None:
        """The LM head in CPU-packed form: beside the embedding when tied, instead of lm_head's weight if not."""
        self.lm_head_packed = pack_lm_head_for_cpu(self._lm_head_weight())
        if self.lm_head_packed is not None and self.lm_head is not None:
            self.lm_head.weight = None

    def _lm_head_weight(self) -> Tensor | None:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def attention_layer_specs(self) -> list[AttentionLayerSpec]:
        return list(self.specs)
