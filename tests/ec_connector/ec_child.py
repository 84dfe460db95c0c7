"""Test helper run as a script: a second engine's EC worker side in a process of its own.

    python ec_child.py CONFIG_JSON SEED [SEED ...]

Builds the worker side `CONFIG_JSON` describes (root, ec_store, ec_role,
lookup_address, dtype), saves the encoder output of each seed under
`identifier(f"image-{seed}")`, flushes, prints "ready", and keeps its store
and lookup server up until its stdin closes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from ec_helpers import encoder_output, identifier, make_config, save, worker_side


def main() -> None:
    options = json.loads(sys.argv[1])
    dtype = options.pop("dtype")
    config = make_config(Path(options.pop("root")), dtype=dtype, **options)
    connector = worker_side(config)
    seeds = [int(seed) for seed in sys.argv[2:]]
    save(connector, {identifier(f"image-{seed}"): encoder_output(seed, getattr(torch, dtype)) for seed in seeds})
    print("ready", flush=True)
    sys.stdin.read()
    connector.close()


if __name__ == "__main__":
    main()
