"""Worker layer: runs one scheduler step on the model — inputs, forward, logits, sampling.

Per step: apply the scheduler's diffs to the persistent `InputBatch`, build
one flat batch of every scheduled token (ids, positions, per-group slot
mappings and attention metadata), make one model call, compute logits only
for rows that finished their known tokens (partial prefill chunks sample
nothing), sample them together, and append the new tokens to the batch.

With a KV store, the KV connector's worker side (built by
`pagoda.kv_connector.factory`, called through the core protocol
`KVConnectorWorkerSide`) loads and saves around the forward pass: attention
of each layer first waits for that layer's load and then hands the freshly
written KV to the saver. A request whose in-step load the connector reports
incomplete samples nothing: the scheduler rewinds it.

For image models, `EncoderRunner` runs the vision encoder on the items the
scheduler names before the forward pass, and supplies the step's image rows
(merged into the token embeddings) and soft-token runs (bidirectional blocks
in the attention metadata).

A pipeline stage (`pp`) runs its layers only: a later stage takes the
previous stage's hidden states instead of embedding tokens, every stage but
the last passes its output on and answers nothing, and the last samples.
The stages that do not sample learn each request's new tokens from the
scheduler (`CachedRequestData.new_token_ids`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pagoda.config import PagodaConfig
from pagoda.core.connector.kv import KVConnectorWorkerSide
from pagoda.core.connector.kv_metadata import KVConnectorOutput
from pagoda.core.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheSpec, SlidingWindowSpec
from pagoda.core.model_runner_output import LogprobsLists, ModelRunnerOutput
from pagoda.core.scheduler_output import SchedulerOutput
from pagoda.distributed.parallel_state import SINGLE_RANK, SINGLE_STAGE, PipelineStage, TensorParallelGroup
from pagoda.ec_connector.factory import make_ec_worker_connector
from pagoda.kv_connector.factory import make_worker_connector
from pagoda.models.interfaces import AttentionLayerSpec
from pagoda.models.loader import load_model
from pagoda.models.pipeline_stages import stage_layers
from pagoda.worker.attention.metadata import build_group_metadata
from pagoda.worker.attention.paged_attention import PagedAttention
from pagoda.worker.encoder_runner import EncoderRunner
from pagoda.worker.input_batch import CachedRequestState, InputBatch
from pagoda.worker.kv_cache_memory import allocate_kv_tensor
from pagoda.worker.kv_connector_attention import ConnectorAttention
from pagoda.worker.sampler import Sampler, gather_logprobs
from pagoda.worker.sampling_metadata import build_sampling_metadata, grammar_rows

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attention: PagedAttention
    sample_rows: np.ndarray  # batch rows that produce a token this step
    logits_indices: torch.Tensor  # flat index of each sample row's last token
    query_start: np.ndarray  # [R + 1]
    # Image rows for multimodal models: mm_embeds and mm_token_indices.
    model_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, config: PagodaConfig, device: torch.device, tp: TensorParallelGroup = SINGLE_RANK,
                 pp: PipelineStage = SINGLE_STAGE) -> None:
        self.config = config
        self.device = device
        # This rank's tensor-parallel group: the model holds its shard of every split layer.
        self.tp = tp
        self.pp = pp
        self.dtype = getattr(torch, config.model_config.dtype)
        self.requests: dict[str, CachedRequestState] = {}
        self.sampler = Sampler()
        self.kv_connector: KVConnectorWorkerSide | None = None
        self._logits_buffer: torch.Tensor | None = None
        self.encoder_runner: EncoderRunner | None = None

    def load_model(self) -> None:
        self.model = load_model(Path(self.config.model_config.path), self.dtype, self.device,
                                self.config.model_config.quantization, tp=self.tp, pp=self.pp)
        self.layer_specs: list[AttentionLayerSpec] = self.model.attention_layer_specs()
        if hasattr(self.model, "embed_multimodal"):
            self.encoder_runner = EncoderRunner(self.model, self.device,
                                                make_ec_worker_connector(self.config, self.device, self.tp))

    def get_kv_cache_spec(self) -> list[KVCacheSpec]:
        block_size = self.config.cache_config.block_size
        dtype_size = torch.empty((), dtype=self.dtype).element_size()
        specs: list[KVCacheSpec] = []
        for layer in self.layer_specs:
            common = dict(block_size=block_size, num_kv_heads=layer.num_kv_heads, head_size=layer.head_dim,
                          dtype_size=dtype_size)
            if layer.sliding_window is None:
                specs.append(FullAttentionSpec(**common))
            else:
                specs.append(SlidingWindowSpec(**common, sliding_window=layer.sliding_window))
        return specs

    def initialize_kv_cache(self, kv_cache_config: KVCacheConfig) -> None:
        self.kv_cache_config = kv_cache_config
        spec = kv_cache_config.groups[0].spec
        shape = (2, kv_cache_config.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size)
        # A pipeline stage allocates only the tensors its own layers use; the others' layers get an empty one.
        local = self._local_layers()
        shared = {position: allocate_kv_tensor(shape, self.dtype, self.device)
                  for position in sorted(kv_cache_config.positions_used_by(local))}
        num_layers = len(self.layer_specs)
        absent = torch.empty(0, dtype=self.dtype, device=self.device)
        self.layer_kv_caches: list[torch.Tensor] = [absent] * num_layers
        self.layer_groups = [0] * num_layers
        for group_index, group in enumerate(kv_cache_config.groups):
            for position, layer_index in enumerate(group.layer_indices):
                if layer_index in local:
                    self.layer_kv_caches[layer_index] = shared[position]
                self.layer_groups[layer_index] = group_index
        self.kv_connector = make_worker_connector(self.config, kv_cache_config, self.layer_kv_caches, self.tp)
        max_model_len = self.config.scheduler_config.max_model_len
        self.input_batch = InputBatch(
            max_num_reqs=self.config.scheduler_config.max_num_seqs,
            max_model_len=max_model_len,
            max_num_blocks_per_req=-(-max_model_len // spec.block_size),
            num_groups=len(kv_cache_config.groups),
        )

    def _local_layers(self) -> range:
        return stage_layers(len(self.layer_specs), self.pp.stage, self.pp.num_stages)

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(scheduler_output)
        connector = self.kv_connector
        if connector is not None and scheduler_output.kv_connector_metadata is not None:
            connector.start_load_kv(scheduler_output.kv_connector_metadata)
        if self.encoder_runner is not None:
            self.encoder_runner.run(scheduler_output, self.requests.values())
        if scheduler_output.total_num_scheduled_tokens == 0:
            kv_output = connector.finish_step(idle=True) if connector is not None else None
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[], kv_connector_output=kv_output)
        inputs = self._prepare_inputs(scheduler_output)
        if self.pp.num_stages > 1:
            return self._execute_stage(scheduler_output, inputs)
        if connector is None:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.attention, **inputs.model_kwargs)
        else:
            try:
                hidden = self.model(inputs.input_ids, inputs.positions, ConnectorAttention(inputs.attention, connector),
                                    **inputs.model_kwargs)
            except BaseException:
                connector.abort_step()  # no transfer may keep writing blocks the engine is about to free
                raise
        kv_output = None
        if connector is not None:
            connector.wait_for_save()
            kv_output = connector.finish_step(idle=False)
            self._drop_rewound_rows(inputs, kv_output)
        return self._sample(scheduler_output, inputs, hidden, kv_output)

    def _execute_stage(self, scheduler_output: SchedulerOutput, inputs: StepInputs) -> ModelRunnerOutput:
        """One pipeline stage's part of the step: its layers, then the hidden states on, or sampling."""
        previous = None
        if not self.pp.is_first:
            previous = self.pp.recv_prev((inputs.input_ids.shape[0], self.model.hidden_size), self.dtype,
                                         self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.attention, inputs_embeds=previous)
        if not self.pp.is_last:
            self.pp.send_next(hidden)
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])  # nobody reads it: the last stage answers
        return self._sample(scheduler_output, inputs, hidden, None)

    def _sample(self, scheduler_output: SchedulerOutput, inputs: StepInputs, hidden: torch.Tensor,
                kv_output: KVConnectorOutput | None) -> ModelRunnerOutput:
        batch = self.input_batch
        prompt_logprobs = self._compute_prompt_logprobs(hidden, inputs)
        sampled: list[list[int]] = [[] for _ in range(batch.num_reqs)]
        logprobs: list[LogprobsLists | None] = [None] * batch.num_reqs
        if inputs.sample_rows.size:
            logits = self.model.compute_logits(hidden[inputs.logits_indices],
                                               out=self._sampling_logits_buffer(len(inputs.sample_rows)))
            metadata = build_sampling_metadata(batch, inputs.sample_rows, self.device)
            if scheduler_output.grammar_bitmask is not None:
                metadata.grammar_bitmask = grammar_rows(scheduler_output.grammar_bitmask,
                                                        [batch.req_ids[row] for row in inputs.sample_rows.tolist()],
                                                        self.device)
            output = self.sampler(logits, metadata)
            token_ids = output.token_ids.tolist()
            for i, row in enumerate(inputs.sample_rows.tolist()):
                batch.append_token(row, token_ids[i])
                sampled[row] = [token_ids[i]]
                if output.logprobs is not None and batch.states[row].sampling_params.logprobs is not None:
                    logprobs[row] = LogprobsLists(token_ids=[output.logprobs.token_ids[i]],
                                                  logprobs=[output.logprobs.logprobs[i]],
                                                  ranks=[output.logprobs.ranks[i]])
        return ModelRunnerOutput(
            req_ids=list(batch.req_ids),
            sampled_token_ids=sampled,
            logprobs=logprobs if any(entry is not None for entry in logprobs) else None,
            prompt_logprobs=prompt_logprobs,
            kv_connector_output=kv_output,
        )

    def _sampling_logits_buffer(self, num_rows: int) -> torch.Tensor:
        """Float32 scratch for the sampled rows' logits, reused across steps.

        A fresh [64, 262k] float32 tensor per step costs ~16 ms on CPU, mostly
        faulting in the 67 MB that glibc maps for it and unmaps again; copying
        into memory already mapped costs ~3. Grows geometrically up to
        max_num_seqs rows (nothing reads it after the step that wrote it).
        """
        buffer = self._logits_buffer
        if buffer is None or buffer.shape[0] < num_rows:
            rows = min(max(num_rows, 2 * (0 if buffer is None else buffer.shape[0])),
                       self.config.scheduler_config.max_num_seqs)
            buffer = self._logits_buffer = torch.empty(rows, self.model.vocab_size, device=self.device)
        return buffer[:num_rows]

    def _drop_rewound_rows(self, inputs: StepInputs, kv_output: KVConnectorOutput) -> None:
        """Stop requests whose in-step load fell short from sampling: their step computed on missing KV.

        An asynchronous load that ended short belongs to a parked request, which has no row this step.
        """
        rewound = {req_id for req_id, result in kv_output.finished_loads.items() if not result.complete}
        if not rewound:
            return
        req_ids = self.input_batch.req_ids
        inputs.sample_rows = np.array([row for row in inputs.sample_rows.tolist() if req_ids[row] not in rewound],
                                      dtype=np.int64)
        inputs.logits_indices = torch.from_numpy(inputs.query_start[inputs.sample_rows + 1] - 1).to(self.device)

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        batch = self.input_batch
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
            if req_id in batch.req_id_to_index:
                batch.remove_request(req_id)
        # Requests not scheduled this step (e.g. preempted) leave the batch but keep their state.
        for req_id in [r for r in batch.req_ids if r not in scheduler_output.num_scheduled_tokens]:
            batch.remove_request(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            params = new.sampling_params
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(params.seed)
            self.requests[new.req_id] = CachedRequestState(
                req_id=new.req_id, prompt_token_ids=new.prompt_token_ids, sampling_params=params,
                generator=generator, block_ids=tuple(list(ids) for ids in new.block_ids),
                num_computed_tokens=new.num_computed_tokens, mm_features=list(new.mm_features),
            )
            batch.add_request(self.requests[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if cached.new_token_ids:
                self._take_new_tokens(req_id, cached.resumed_from_preemption[i], cached.num_computed_tokens[i],
                                      cached.new_token_ids[i])
            self._update_cached_request(req_id, cached.resumed_from_preemption[i], cached.new_block_ids[i],
                                        cached.num_computed_tokens[i])

    def _take_new_tokens(self, req_id: str, resumed: bool, num_computed_tokens: int, token_ids: list[int]) -> None:
        """Pipeline stages: what the scheduler says of a request's tokens, which this stage did not sample.

        A resumed request's `token_ids` are all its output tokens (every stage takes them: the last one may
        have sampled a token for it in a batch the scheduler dropped when it preempted the request); a
        running one's are the tokens this step computes, of which the stages but the last lack the newest.
        """
        state = self.requests[req_id]
        if resumed:  # its row, if it has one, is rebuilt from the state (`_update_cached_request`)
            state.output_token_ids = list(token_ids)
            return
        missing = num_computed_tokens + len(token_ids) - state.num_tokens
        if self.pp.is_last or missing <= 0:
            return
        row = self.input_batch.req_id_to_index.get(req_id)
        for token_id in token_ids[-missing:]:
            if row is None:
                state.output_token_ids.append(token_id)
            else:
                self.input_batch.append_token(row, token_id)

    def _update_cached_request(self, req_id: str, resumed: bool, new_block_ids: tuple[list[int], ...] | None,
                               num_computed_tokens: int) -> None:
        state = self.requests[req_id]
        state.num_computed_tokens = num_computed_tokens
        if resumed:
            state.block_ids = tuple(list(ids) for ids in (new_block_ids or ()))
        elif new_block_ids is not None:
            for ids, new_ids in zip(state.block_ids, new_block_ids):
                ids.extend(new_ids)
        batch = self.input_batch
        row = batch.req_id_to_index.get(req_id)
        if resumed and row is not None:
            # Restarted right after the step it ran in (a KV store load came back short): start the row afresh.
            batch.remove_request(req_id)
            row = None
        if row is None:
            batch.add_request(state)
            return
        batch.num_computed_tokens[row] = num_computed_tokens
        if new_block_ids is not None:
            batch.block_table.append_row(row, new_block_ids)

    def _prepare_inputs(self, scheduler_output: SchedulerOutput) -> StepInputs:
        batch = self.input_batch
        num_reqs = batch.num_reqs
        num_scheduled = np.array([scheduler_output.num_scheduled_tokens[r] for r in batch.req_ids], dtype=np.int64)
        num_computed = batch.num_computed_tokens[:num_reqs]
        query_start = np.concatenate(([0], np.cumsum(num_scheduled)))
        row_of_token = np.repeat(np.arange(num_reqs), num_scheduled)
        positions = num_computed[row_of_token] + np.arange(query_start[-1]) - query_start[row_of_token]
        input_ids = batch.token_ids[row_of_token, positions]
        model_kwargs: dict[str, torch.Tensor] = {}
        runs_kwargs = {}
        if self.encoder_runner is not None:
            image_rows = self.encoder_runner.gather(batch.states[:num_reqs], num_computed, num_scheduled, query_start)
            if image_rows.embeds is not None:
                model_kwargs = {"mm_embeds": image_rows.embeds, "mm_token_indices": image_rows.token_indices}
            if image_rows.has_runs:
                runs_kwargs = {"bidirectional_runs": image_rows.runs}
        group_metadata = [
            build_group_metadata(
                batch.block_table[g].block_ids[:num_reqs], batch.block_table[g].num_blocks[:num_reqs],
                num_computed, num_scheduled, positions, row_of_token, group.spec.block_size,
                getattr(group.spec, "sliding_window", None), self.device, **runs_kwargs,
            )
            for g, group in enumerate(self.kv_cache_config.groups)
        ]
        sample_rows = np.flatnonzero(num_computed + num_scheduled >= batch.num_tokens[:num_reqs])
        return StepInputs(
            input_ids=torch.from_numpy(input_ids).to(self.device),
            positions=torch.from_numpy(positions).to(self.device),
            attention=PagedAttention(self.layer_specs, self.layer_kv_caches, self.layer_groups, group_metadata),
            sample_rows=sample_rows,
            logits_indices=torch.from_numpy(query_start[sample_rows + 1] - 1).to(self.device),
            query_start=query_start,
            model_kwargs=model_kwargs,
        )

    def _compute_prompt_logprobs(self, hidden: torch.Tensor, inputs: StepInputs) -> dict[str, LogprobsLists]:
        """Logprobs of the prompt tokens this step's chunk predicts (token p+1 from position p).

        A request recomputed after preemption runs its prompt again; positions
        already reported are skipped, so each prompt token is reported once.
        """
        batch = self.input_batch
        result: dict[str, LogprobsLists] = {}
        for row, state in enumerate(batch.states):
            num_top = state.sampling_params.prompt_logprobs
            computed, num_prompt = int(batch.num_computed_tokens[row]), int(batch.num_prompt_tokens[row])
            chunk_end = min(computed + int(inputs.query_start[row + 1] - inputs.query_start[row]), num_prompt - 1)
            first = max(computed, state.num_prompt_logprobs_done)
            if num_top is None or first >= chunk_end:
                continue
            start = int(inputs.query_start[row]) + first - computed
            logits = self.model.compute_logits(hidden[start : start + chunk_end - first])
            targets = torch.from_numpy(batch.token_ids[row, first + 1 : chunk_end + 1]).to(self.device)
            result[state.req_id] = gather_logprobs(torch.log_softmax(logits, dim=-1), targets, num_top)
            state.num_prompt_logprobs_done = chunk_end
        return result
