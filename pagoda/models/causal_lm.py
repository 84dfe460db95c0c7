"""Models layer: what every decoder model shares — the (possibly tied) LM head and the worker-facing methods.

Under tensor parallelism each rank's LM head (the tied embedding's rows, or
an untied head's) covers its vocabulary slice; `compute_logits` gathers the
slices, so every rank gets the same full logits and samples identically.

Under pipeline parallelism each stage keeps only what it runs
(`keep_stage`): its layers (the others pass hidden states through), the
embedding on the first stage, the final norm and LM head on the last.
"""

from __future__ import annotations

from torch import Tensor, nn

from pagoda.distributed.parallel_state import SINGLE_RANK, TensorParallelGroup
from pagoda.models.interfaces import AttentionContext, AttentionLayerSpec
from pagoda.models.layers import PACKED_MODULES_MAPPING, compute_logits, pack_lm_head_for_cpu
from pagoda.models.parallel_linear import lm_head, local_attention_spec
from pagoda.models.quantization import Int8Weight


class CausalLM(nn.Module):
    """A decoder stack (`model`, with `embed_tokens`) plus the LM head; subclasses build the stack.

    `specs` describe the whole model's layers; `attention_layer_specs()` returns this rank's heads.
    """

    packed_modules_mapping = PACKED_MODULES_MAPPING

    def __init__(self, config: dict, model: nn.Module, specs: list[AttentionLayerSpec], tie_by_default: bool,
                 final_logit_softcap: float | None = None, tp: TensorParallelGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.tp = tp
        self.specs = [local_attention_spec(spec, tp) for spec in specs]
        self.model = model
        self.final_logit_softcap = final_logit_softcap
        self.vocab_size: int = config["vocab_size"]
        self.hidden_size: int = config["hidden_size"]
        # Checkpoint-name prefixes of what this pipeline stage dropped (the loader skips their weights).
        self.dropped_prefixes: tuple[str, ...] = ()
        self.computes_logits = True
        tied = bool(config.get("tie_word_embeddings", tie_by_default))
        self.lm_head = None if tied else lm_head(config["hidden_size"], config["vocab_size"], tp)
        # A tied checkpoint may still carry a copy of the embedding as lm_head.
        self.ignored_weights = frozenset({"lm_head.weight"} if tied else ())
        self.lm_head_int8: Int8Weight | None = None
        self.lm_head_packed: list[Tensor] | None = None

    def forward(self, input_ids: Tensor, positions: Tensor, attention: AttentionContext,
                inputs_embeds: Tensor | None = None) -> Tensor:
        """input_ids and positions [T] -> hidden states [T, hidden_size]; `inputs_embeds` [T, hidden_size]
        replaces the embedding (a later pipeline stage's input: the previous stage's hidden states)."""
        return self.model(input_ids, positions, attention, inputs_embeds=inputs_embeds)

    def keep_stage(self, layers: range, is_first: bool, is_last: bool) -> None:
        """Drop what this pipeline stage does not run, on the meta device before the weights load."""
        stack = self.model
        dropped = [f"model.layers.{index}." for index in range(len(stack.layers)) if index not in layers]
        for index in range(len(stack.layers)):
            if index not in layers:
                stack.layers[index] = PassThroughLayer()
        tied = self.lm_head is None
        if not is_first and not (is_last and tied):
            del stack.embed_tokens
            stack.embed_tokens = None
            dropped.append("model.embed_tokens.")
        if not is_last:
            stack.norm = nn.Identity()
            dropped.append("model.norm.")
            if not tied:
                self.lm_head = None
                dropped.append("lm_head.")
            self.computes_logits = False
        self.dropped_prefixes = tuple(dropped)

    def compute_logits(self, hidden: Tensor, out: Tensor | None = None) -> Tensor:
        """hidden [N, hidden_size] -> float32 logits [N, vocab_size] (into `out` when given), soft-capped when
        the config says so; the same on every tensor-parallel rank."""
        if self.tp.world_size == 1:
            return compute_logits(hidden, self._lm_head_weight(), self.final_logit_softcap, self.lm_head_int8,
                                  self.lm_head_packed, out)
        # The softcap is elementwise: applied to each rank's slice before the gather, it costs 1/world_size.
        local = compute_logits(hidden, self._lm_head_weight(), self.final_logit_softcap, self.lm_head_int8,
                               self.lm_head_packed)
        logits = self.tp.all_gather(local, dim=-1)[:, : self.vocab_size]
        return logits if out is None else out.copy_(logits)

    def quantize_int8(self) -> None:
        """An int8 copy of the LM head for few-row calls; the embedding (tied) or lm_head weight stays."""
        if not self.computes_logits:
            return
        self.lm_head_int8 = Int8Weight.quantize(self._lm_head_weight())

    def pack_weight(self) -> None:
        """The LM head in CPU-packed form: beside the embedding when tied, instead of lm_head's weight if not."""
        if not self.computes_logits:
            return
        self.lm_head_packed = pack_lm_head_for_cpu(self._lm_head_weight())
        if self.lm_head_packed is not None and self.lm_head is not None:
            self.lm_head.weight = None

    def _lm_head_weight(self) -> Tensor | None:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def attention_layer_specs(self) -> list[AttentionLayerSpec]:
        """This rank's attention layers (local head counts): what its KV cache is sized by."""
        return list(self.specs)


class PassThroughLayer(nn.Module):
    """Stands in for a decoder layer another pipeline stage runs: hidden states pass unchanged."""

    def forward(self, hidden: Tensor, *_args: object) -> Tensor:
        return hidden
