"""Generation: packed prefill with the chunk kernel, then recurrent decoding with per-layer
GDN / Mamba2 state (conv + recurrent) and KV caches for attention (window-sized for SWA)."""
from megatron_gdn.generation.engine import GenerationResult, Session, generate, mixer_kind, sample
from megatron_gdn.generation.mixers import GDNState, KVCache, Mamba2State

__all__ = ["GenerationResult", "Session", "generate", "mixer_kind", "sample", "GDNState", "KVCache",
           "Mamba2State"]
