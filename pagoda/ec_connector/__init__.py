"""EC connector layer: the engine's door to a store of image encoder outputs kept in the kvstore tiers.

Implements the encoder-cache connector contract that core owns
(`pagoda.core.connector.ec`, with its per-step structs in
`pagoda.core.connector.ec_metadata`). The scheduler side (`scheduler_side`,
no torch) answers whether the store holds an item's encoder output and
plans its load; the worker side (`worker_side`) loads stored outputs into the
worker's encoder cache and saves what the encoder produced. Entries live in
a `pagoda.kvstore` StorageManager (CPU, disk, Redis tiers: checked entries,
capacity bounds, eviction, atomic writes, fault handling) under keys of their
own kind (`keys`). `factory` builds both sides and, for the worker side, the
store and the lookup server the scheduler side asks; the engine and the
worker call only the factory.
"""
