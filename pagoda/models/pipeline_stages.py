"""Models layer: which decoder layers each pipeline stage holds, and which settings pipeline parallelism refuses.

Pure Python (no torch), so the front end can check a configuration before
any worker starts. The split is contiguous and as even as it can be; the
earlier stages take the remainder (the last stage also runs the final norm,
the LM head and sampling).
"""

from __future__ import annotations


def stage_layers(num_layers: int, stage: int, num_stages: int) -> range:
    """The decoder layers stage `stage` of `num_stages` runs, e.g. 18 layers over 2 stages: 0-8, then 9-17."""
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is not one of {num_stages} pipeline stages")
    if num_layers < num_stages:
        raise ValueError(f"pipeline_parallel_size {num_stages} exceeds the model's {num_layers} layers")
    base, extra = divmod(num_layers, num_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def check_pipeline_parallel(decoder_config: dict, num_stages: int, takes_images: bool, kv_store: str | None,
                            ec_store: str | None) -> None:
    """A ValueError naming the problem when `num_stages` pipeline stages cannot run this configuration."""
    num_layers = int(decoder_config.get("num_hidden_layers", 0))
    if num_layers < num_stages:
        raise ValueError(f"pipeline_parallel_size {num_stages} exceeds the model's {num_layers} layers")
    # Each of these keeps per-layer state in one worker (stored KV chunks of every layer, the vision
    # tower's outputs merged before layer 0); split over stages they are not built yet.
    if takes_images:
        raise ValueError("pipeline_parallel_size > 1 is not supported for image models yet; use "
                         "tensor_parallel_size instead")
    if kv_store is not None:
        raise ValueError("pipeline_parallel_size > 1 does not work with --kv-store yet")
    if ec_store is not None:
        raise ValueError("pipeline_parallel_size > 1 does not work with --ec-store yet")
