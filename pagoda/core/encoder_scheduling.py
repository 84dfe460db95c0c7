"""Core layer: which image items a step must encode (or load), and how far a request's chunk may reach.

For a request about to compute prompt tokens [c, c + n), each image item
overlapping that window needs its encoder output on the worker. In order:

- a soft-token run (one crop: a block of bidirectional attention) may not
  be split: if the window would end inside one, it ends where that run
  starts; when that leaves nothing (the run started at or before c, after a
  prefix-cache hit inside it), the request computes nothing this step;
- an item already encoded this step for another request, or in the encoder
  cache, costs nothing more (a hit: the request now references the entry);
- an item the encoder-cache connector's store holds costs cache space but no
  encoder compute: it is loaded on the worker;
- otherwise the item costs cache space and encoder budget (the first item a
  step encodes always fits the budget: items are never split); when either
  is short, the window ends where the item starts.

Nothing is taken from the cache manager until the scheduler commits the
request (its KV blocks were allocated too). A request preempted later in
the same pass drops its references, but what it was to encode or load this
step still is: the entry stays cached, unreferenced, for whoever comes next.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.core.connector.ec import ECConnectorSchedulerSide
from pagoda.core.connector.ec_metadata import ECLoadSpec
from pagoda.core.encoder_cache_manager import EncoderCacheManager
from pagoda.core.multimodal import MultiModalFeature
from pagoda.core.request import Request


@dataclass
class EncoderInputs:
    """The items one request takes this step: to encode, and to load from the connector's store."""

    encode: list[MultiModalFeature] = field(default_factory=list)
    load: list[MultiModalFeature] = field(default_factory=list)


@dataclass
class EncoderStepPlan:
    """This step's encoder work across requests (identifier -> the request that took it)."""

    compute_budget: int
    to_encode: dict[str, str] = field(default_factory=dict)
    to_load: dict[str, str] = field(default_factory=dict)
    num_embeds: dict[str, int] = field(default_factory=dict)

    def scheduled_encoder_inputs(self) -> list[str]:
        return list(self.to_encode)

    def ec_loads(self) -> list[ECLoadSpec]:
        return [ECLoadSpec(identifier, self.num_embeds[identifier]) for identifier in self.to_load]


def limit_to_encoder_inputs(
    request: Request,
    num_computed: int,
    num_new_tokens: int,
    manager: EncoderCacheManager,
    step: EncoderStepPlan,
    ec_connector: ECConnectorSchedulerSide | None,
) -> tuple[int, EncoderInputs]:
    """How many of `num_new_tokens` the request may compute this step, and the items it must take for them."""
    window_end = num_computed + num_new_tokens
    taken = EncoderInputs()
    pending_embeds = 0
    pending_ids: set[str] = set()
    for feature in request.mm_features:
        position = feature.position
        if position.offset >= window_end:
            break
        for run_start, run_end in position.absolute_embed_runs():
            if run_start < window_end < run_end:
                window_end = run_start
                break
        runs_in_window = [(start, end) for start, end in position.absolute_embed_runs()
                          if end > num_computed and start < window_end]
        if not runs_in_window:
            continue  # the window holds only break tokens of this item, or none of it
        identifier = feature.identifier
        if identifier in pending_ids or identifier in step.to_encode or identifier in step.to_load:
            manager.check_and_update_cache(request.request_id, identifier)
            continue
        if manager.check_and_update_cache(request.request_id, identifier):
            continue
        num_embeds = feature.num_embeds
        external = ec_connector is not None and ec_connector.has_cache_item(identifier)
        # An item is never split, so the first one a step encodes may exceed the budget on its own.
        pending_compute = _pending_compute(taken)
        fits_compute = (external or num_embeds <= step.compute_budget - pending_compute
                        or (not step.to_encode and pending_compute == 0))
        if not fits_compute or not manager.can_allocate(pending_embeds + num_embeds):
            window_end = position.offset
            break
        pending_embeds += num_embeds
        pending_ids.add(identifier)
        (taken.load if external else taken.encode).append(feature)
    return max(window_end - num_computed, 0), taken


def _pending_compute(taken: EncoderInputs) -> int:
    return sum(feature.num_embeds for feature in taken.encode)


def commit_encoder_inputs(request: Request, taken: EncoderInputs, manager: EncoderCacheManager,
                          step: EncoderStepPlan, ec_connector: ECConnectorSchedulerSide | None) -> None:
    """The request is scheduled: allocate its items' entries and record this step's encodes and loads."""
    for feature in taken.encode:
        manager.allocate(request.request_id, feature.identifier, feature.num_embeds)
        step.to_encode[feature.identifier] = request.request_id
        step.num_embeds[feature.identifier] = feature.num_embeds
        step.compute_budget -= feature.num_embeds
    for feature in taken.load:
        manager.allocate(request.request_id, feature.identifier, feature.num_embeds)
        step.to_load[feature.identifier] = request.request_id
        step.num_embeds[feature.identifier] = feature.num_embeds
        assert ec_connector is not None
        ec_connector.update_state_after_alloc(request, feature.identifier, feature.num_embeds)


def release_computed_items(request: Request, manager: EncoderCacheManager) -> None:
    """Drop the request's references to items whose every token it has computed."""
    for feature in request.mm_features:
        if feature.position.end > request.num_computed_tokens:
            break
        manager.free_encoder_input(request.request_id, feature.identifier)
