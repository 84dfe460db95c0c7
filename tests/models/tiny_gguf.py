"""Tests for the models layer: writes tiny random GGUF files the way llama.cpp stores models.

Each writer takes Hugging Face-layout weights, applies llama.cpp's storage
conventions (Llama q/k rows permuted for its rotary layout, Gemma norms stored
as 1 + w, one tensor quantized to Q8_0) and returns the weights a correct
converter must give back. The vocabularies are tiny but real, so transformers'
GGUF tokenizer conversion runs on them as on a full model.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 64, 4, 2, 16, 128
SLIDING_WINDOW = 4


def _byte_level_alphabet() -> list[str]:
    # GPT-2's byte -> printable character table, which byte-level BPE vocabularies start from.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _gpt2_vocab(writer: gguf.GGUFWriter) -> int:
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_level_alphabet(), "Ġt", "he", "Ġthe"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    return len(tokens)


def _sentencepiece_vocab(writer: gguf.GGUFWriter) -> int:
    pieces = ["▁", "▁the", "t", "h", "e", "c", "a", "▁c"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 260 + [-float(i) for i in range(len(pieces))])
    writer.add_token_types([3, 3, 3, 2] + [6] * 256 + [1] * len(pieces))
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    return len(tokens)


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # What llama.cpp's convert_hf_to_gguf does to q/k rows: pairs (i, i + half) become (2i, 2i + 1).
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _q8_0_round_trip(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    packed = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
    return packed, gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0)


def write_tiny_gguf(path: Path, architecture: str, num_layers: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a random `architecture` ("llama" or "gemma3") model to `path`; return the expected HF tensors."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, architecture)
    vocab = _gpt2_vocab(writer) if architecture == "llama" else _sentencepiece_vocab(writer)
    writer.add_block_count(num_layers)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10_000.0 if architecture == "llama" else 1_000_000.0)
    if architecture == "gemma3":
        writer.add_sliding_window(SLIDING_WINDOW)

    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, weight: np.ndarray, stored: np.ndarray | None = None) -> None:
        expected[hf_name] = weight
        writer.add_tensor(gguf_name, weight if stored is None else stored)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)

    def norm(size: int, gguf_name: str, hf_name: str) -> None:
        weight = (rng.standard_normal(size) * 0.1).astype(np.float32)
        add(gguf_name, hf_name, weight, weight + 1.0 if architecture == "gemma3" else None)

    add("token_embd.weight", "model.embed_tokens.weight", matrix(vocab, HIDDEN))
    norm(HIDDEN, "output_norm.weight", "model.norm.weight")
    if architecture == "llama":
        add("output.weight", "lm_head.weight", matrix(vocab, HIDDEN))
    for i in range(num_layers):
        blk, hf = f"blk.{i}", f"model.layers.{i}"
        q, k = matrix(HEADS * HEAD_DIM, HIDDEN), matrix(KV_HEADS * HEAD_DIM, HIDDEN)
        if architecture == "llama":
            add(f"{blk}.attn_q.weight", f"{hf}.self_attn.q_proj.weight", q, _llama_cpp_permute(q, HEADS))
            add(f"{blk}.attn_k.weight", f"{hf}.self_attn.k_proj.weight", k, _llama_cpp_permute(k, KV_HEADS))
            norm(HIDDEN, f"{blk}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight")
        else:
            add(f"{blk}.attn_q.weight", f"{hf}.self_attn.q_proj.weight", q)
            add(f"{blk}.attn_k.weight", f"{hf}.self_attn.k_proj.weight", k)
            norm(HEAD_DIM, f"{blk}.attn_q_norm.weight", f"{hf}.self_attn.q_norm.weight")
            norm(HEAD_DIM, f"{blk}.attn_k_norm.weight", f"{hf}.self_attn.k_norm.weight")
            norm(HIDDEN, f"{blk}.post_attention_norm.weight", f"{hf}.post_attention_layernorm.weight")
            norm(HIDDEN, f"{blk}.ffn_norm.weight", f"{hf}.pre_feedforward_layernorm.weight")
            norm(HIDDEN, f"{blk}.post_ffw_norm.weight", f"{hf}.post_feedforward_layernorm.weight")
        add(f"{blk}.attn_v.weight", f"{hf}.self_attn.v_proj.weight", matrix(KV_HEADS * HEAD_DIM, HIDDEN))
        add(f"{blk}.attn_output.weight", f"{hf}.self_attn.o_proj.weight", matrix(HIDDEN, HEADS * HEAD_DIM))
        norm(HIDDEN, f"{blk}.attn_norm.weight", f"{hf}.input_layernorm.weight")
        add(f"{blk}.ffn_gate.weight", f"{hf}.mlp.gate_proj.weight", matrix(INTERMEDIATE, HIDDEN))
        packed, dequantized = _q8_0_round_trip(matrix(INTERMEDIATE, HIDDEN))
        expected[f"{hf}.mlp.up_proj.weight"] = dequantized
        writer.add_tensor(f"{blk}.ffn_up.weight", packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        add(f"{blk}.ffn_down.weight", f"{hf}.mlp.down_proj.weight", matrix(HIDDEN, INTERMEDIATE))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected
