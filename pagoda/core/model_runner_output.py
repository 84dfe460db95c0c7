"""Core layer: what the workers send back after a step (pure Python lists, no tensors).

Each connector's worker side reports in its own field (its struct defined in
`pagoda.core.connector`).
"""

from __future__ import annotations

import msgspec

from pagoda.core.connector.kv_metadata import KVConnectorOutput


class LogprobsLists(msgspec.Struct, kw_only=True, array_like=True):
    """Per position: the chosen token first, then the top-k, with logprobs and ranks.

    `token_ids[i][0]` is the sampled (or prompt) token at position i and
    `ranks[i]` its rank in the distribution (1 = most likely).
    """

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


class ModelRunnerOutput(msgspec.Struct, kw_only=True):
    req_ids: list[str]
    # Tokens sampled per request; empty while a prompt is still being prefilled.
    sampled_token_ids: list[list[int]]
    # Logprobs of the sampled tokens, per request (None where not asked for).
    logprobs: list[LogprobsLists | None] | None = None
    # Prompt logprobs computed this step, per request that asked for them.
    prompt_logprobs: dict[str, LogprobsLists] = msgspec.field(default_factory=dict)
    # Loads the KV connector finished this step (None without a connector).
    kv_connector_output: KVConnectorOutput | None = None
