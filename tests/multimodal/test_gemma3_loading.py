"""Loading Gemma 3 vision checkpoints: every naming layout, clear errors, and the config facts the engine reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_gemma3 import build_tiny_gemma3, vision_benchmark_config

from pagoda.engine.arg_utils import EngineArgs
from pagoda.models import load_model
from pagoda.models.gemma3_mm import Gemma3ForConditionalGeneration
from pagoda.models.hf_config import mm_info, text_config

# Google's gemma-3-4b-it config.json: everything equal to transformers' defaults is left out.
GEMMA3_4B_CONFIG = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "mm_tokens_per_image": 256, "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}

# transformers 5 saves Google's names except `vision_tower.*` (no `vision_model`); rename into each layout.
LAYOUTS = {
    "transformers_4_52": (("language_model.model.", "model.language_model."),
                          ("vision_tower.", "model.vision_tower.vision_model."),
                          ("multi_modal_projector.", "model.multi_modal_projector.")),
    "google": (("vision_tower.", "vision_tower.vision_model."),),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3_mm"))


def _rewrite(folder: Path, target: Path, edit) -> Path:
    target.mkdir()
    (target / "config.json").write_bytes((folder / "config.json").read_bytes())
    weights = load_file(folder / "model.safetensors")
    save_file(edit(weights), target / "model.safetensors")
    return target


def _renamed(weights: dict, renames: tuple[tuple[str, str], ...]) -> dict:
    out = {}
    for name, tensor in weights.items():
        for source, target in renames:
            if name.startswith(source):
                name = target + name[len(source):]
                break
        out[name] = tensor
    return out


def test_every_checkpoint_layout_loads_the_same_model(folder: Path, tmp_path: Path) -> None:
    saved = load_file(folder / "model.safetensors")
    assert "language_model.model.embed_tokens.weight" in saved and "lm_head.weight" not in saved  # tied
    expected = load_model(folder, torch.float32, torch.device("cpu")).state_dict()
    for layout, renames in LAYOUTS.items():
        def edit(weights: dict, renames=renames, layout=layout) -> dict:
            weights = _renamed(weights, renames)
            # A tied checkpoint may still carry the head, under either layout's name.
            head = "lm_head.weight" if layout == "transformers_4_52" else "language_model.lm_head.weight"
            weights[head] = saved["language_model.model.embed_tokens.weight"].clone()
            return weights

        loaded = load_model(_rewrite(folder, tmp_path / layout, edit), torch.float32, torch.device("cpu"))
        state = loaded.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[name], expected[name]) for name in expected), layout


def test_siglip_pooling_head_is_skipped(folder: Path, tmp_path: Path) -> None:
    def add_head(weights: dict) -> dict:
        return {**weights, "vision_tower.head.probe": torch.zeros(1, 1, 32)}

    load_model(_rewrite(folder, tmp_path / "head", add_head), torch.float32, torch.device("cpu"))


def test_missing_tensor_is_named(folder: Path, tmp_path: Path) -> None:
    def drop(weights: dict) -> dict:
        weights.pop("vision_tower.encoder.layers.1.self_attn.k_proj.bias")
        return weights

    with pytest.raises(ValueError, match=r"missing weights.*vision_tower\.encoder\.layers\.1\.self_attn\.qkv_proj"
                                         r"\.bias\[1\]"):
        load_model(_rewrite(folder, tmp_path / "missing", drop), torch.float32, torch.device("cpu"))


def test_unexpected_tensor_is_named_as_the_checkpoint_names_it(folder: Path, tmp_path: Path) -> None:
    def add(weights: dict) -> dict:
        return {**weights, "model.vision_tower.vision_model.extra.weight": torch.zeros(2)}

    with pytest.raises(ValueError, match=r"unexpected weight 'model\.vision_tower\.vision_model\.extra\.weight'"):
        load_model(_rewrite(folder, tmp_path / "extra", add), torch.float32, torch.device("cpu"))


def test_engine_reads_the_nested_text_config(folder: Path) -> None:
    config = EngineArgs(model=str(folder)).create_config().model_config
    assert (config.vocab_size, config.max_model_len, config.eos_token_ids) == (262208, 512, (1,))
    assert config.architecture == "Gemma3ForConditionalGeneration"
    assert config.identity.startswith("gemma3-")


def test_google_config_gets_transformers_defaults() -> None:
    info = mm_info(GEMMA3_4B_CONFIG)
    assert (info.image_token_id, info.boi_token_id, info.eoi_token_id) == (262144, 255999, 256000)
    assert (info.mm_tokens_per_image, info.num_embeds_per_crop, info.image_size, info.hidden_size) == (
        256, 256, 896, 2560)
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(GEMMA3_4B_CONFIG)
    specs = model.attention_layer_specs()
    assert len(specs) == 34 and [s.sliding_window for s in specs[:6]] == [1024] * 5 + [None]
    assert {(s.num_heads, s.num_kv_heads, s.head_dim, s.scale) for s in specs} == {(8, 4, 256, 256**-0.5)}
    assert model.vocab_size == 262208 and model.lm_head is None
    assert model.model.rotary_emb["full_attention"].rope_parameters == {
        "rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}
    assert model.multi_modal_projector.pool_size == 4  # 64 patches per side pooled to 16
    # The model's own end-of-turn id comes from the top level, not transformers' default of 1 alone.
    assert text_config(GEMMA3_4B_CONFIG)["eos_token_id"] == [1, 106]


def test_benchmark_config_has_the_real_vision_tower() -> None:
    config = json.loads(vision_benchmark_config().to_json_string())
    info = mm_info(config)
    assert (info.image_size, info.mm_tokens_per_image) == (896, 256)
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    assert len(model.vision_tower.encoder.layers) == 27
    assert model.vision_tower.embeddings.position_embedding.weight.shape == (4096, 1152)


def test_a_text_only_config_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a config with model_type 'gemma3' and a vision_config"):
        Gemma3ForConditionalGeneration({"model_type": "gemma3_text", "vocab_size": 10})


def test_mm_info_needs_no_torch() -> None:
    # The front end reads it, and the front end never imports torch.
    code = ("import json, sys; from pagoda.models import mm_info; "
            f"info = mm_info(json.loads({json.dumps(json.dumps(GEMMA3_4B_CONFIG))})); "
            "assert info.image_size == 896 and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_engine_runs_the_vision_model_on_text(gemma_path: Path, tmp_path: Path) -> None:
    # The whole engine on a vision folder with the 270M tokenizer plus the soft token; a text-only prompt
    # takes the decoder path, which must equal transformers' greedy tokens.
    from transformers import Gemma3ForConditionalGeneration as Reference

    from pagoda import LLM, SamplingParams
    from pagoda.engine.tokenizer import Tokenizer

    folder = build_tiny_gemma3(tmp_path / "with_tokenizer", tokenizer_source=gemma_path)
    tokenizer = Tokenizer.from_folder(folder)
    assert tokenizer.encode("<start_of_image><image_soft_token>", add_special_tokens=False) == [255999, 262144]
    prompt = tokenizer.encode("The capital of France is")
    llm = LLM(str(folder), dtype="float32", kv_cache_memory=16 << 20, max_model_len=128)
    output = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0),
                          use_tqdm=False)[0]
    reference = Reference.from_pretrained(folder, dtype=torch.float32).eval()
    expected = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    assert output.outputs[0].token_ids == expected


@pytest.mark.parametrize(("vision", "tokens", "message"), [
    ({"image_size": 60, "patch_size": 14}, 4, r"image_size \(60\) must be a multiple of patch_size \(14\)"),
    ({"image_size": 56, "patch_size": 14}, 3, r"mm_tokens_per_image \(3\) must be a square"),
    ({"image_size": 70, "patch_size": 14}, 4, r"side divides the 5 patches per side"),
])
def test_inconsistent_image_settings_are_named(vision: dict, tokens: int, message: str) -> None:
    config = {"model_type": "gemma3", "text_config": {}, "vision_config": vision, "mm_tokens_per_image": tokens}
    with pytest.raises(ValueError, match=message):
        mm_info(config)


def test_a_crop_longer_than_the_sliding_window_is_refused() -> None:
    from tiny_gemma3 import tiny_config

    config = tiny_config().to_dict()
    config["text_config"]["sliding_window"] = 3  # the tiny model's crops have 4 soft tokens
    with torch.device("meta"), pytest.raises(ValueError, match="shorter than the 4 soft tokens"):
        Gemma3ForConditionalGeneration(config)
