"""Core layer: what the encoder-cache connector's scheduler side tells its worker side each step, and back.

Part of the contract core owns (`pagoda.core.connector`): `pagoda.ec_connector`
fills and reads these; the scheduler and the model runner read them too.
msgspec Structs without tensors, so they cross a process boundary without pickle.
"""

from __future__ import annotations

import msgspec


class ECLoadSpec(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Load the stored encoder output of item `identifier` ([num_embeds, hidden]) before this step's merge."""

    identifier: str
    num_embeds: int


class ECConnectorMetadata(msgspec.Struct, kw_only=True, gc=False):
    loads: list[ECLoadSpec] = msgspec.field(default_factory=list)


class ECConnectorOutput(msgspec.Struct, kw_only=True, gc=False):
    """Items of this step's loads that the store could not supply whole (missing, corrupt, wrong shape):
    the worker encoded them instead, so the output is unchanged."""

    failed_loads: list[str] = msgspec.field(default_factory=list)
