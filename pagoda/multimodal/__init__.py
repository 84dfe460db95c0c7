"""Multimodal (front end, beside the engine layer): images in, token ids and `MultiModalFeature`s out.

Loading and checking images (`image_io`), Gemma 3's preprocessing
(`gemma3_image_processor`), the items' key (`hasher.mm_hash`), prompt
expansion and placeholder ranges (`gemma3_prompt`), the entry point the
input processor calls (`processor.MultiModalProcessor`) and the processor
caches (`processor_cache`). numpy and PIL only: never torch, never
transformers, so the front end starts fast and `pagoda/core` could import
the caches.
"""
