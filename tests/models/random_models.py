"""Test helper: tiny random-weight decoders saved by transformers itself, for comparisons against it."""

from __future__ import annotations

from pathlib import Path

import torch


def save_random_model(folder: Path, config: object) -> Path:
    """A seeded random model for `config` (a transformers config), saved as float32 safetensors in `folder`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    # Random norms, so that a wrong norm convention cannot hide behind zeros or ones.
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    return folder
