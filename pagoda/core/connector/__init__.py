"""Core layer: the connector contract — what the scheduler and the worker may ask of a connector.

A connector moves state the engine could recompute (KV today, encoder
outputs next) between the engine and an external store. It has a scheduler
side, asked while a step is planned, and a worker side, driven around the
forward pass. Core owns the contract and implements none of it:

- `base`: what every connector's sides answer, whatever they move
  (a finished request, shutdown);
- `kv`: the KV connector's two sides (`pagoda.kv_connector` implements them);
- `kv_metadata`: the per-step structs between them, carried in
  `SchedulerOutput.kv_connector_metadata` and
  `ModelRunnerOutput.kv_connector_output`;
- `kv_loads`: the scheduler's one record of KV loads in flight.

A second connector adds its own protocol and metadata module here and its
own field beside the KV one in those two structs; the scheduler holds it
beside the KV connector behind these protocols. Nothing here imports torch,
a store or a connector implementation.
"""
