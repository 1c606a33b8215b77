"""Text generation with a megatron-core GPTModel built from a hybrid YAML file: prefill every
prompt (packed, one forward, chunk kernels), then one token per sequence per step (recurrent
steps with conv and SSM state for GDN and Mamba2, KV cache for attention / SWA).

    from megatron_gdn.generation import generate
    result = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=16, temperature=0.8, top_p=0.9)

The walk over the model mirrors TransformerLayer (input norm -> mixer -> residual -> pre-FFN
norm -> FFN -> residual), GPTModel (embedding, final norm, output layer) and uses the layers'
own submodules and parameters; only the mixers go through megatron_gdn.generation.mixers.
Tensor / pipeline / sequence parallel are not supported here (TP = PP = 1, one process).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from megatron_gdn.generation import mixers

__all__ = ["Session", "GenerationResult", "generate", "sample", "mixer_kind"]


def mixer_kind(layer) -> Optional[str]:
    """'gdn', 'mamba2', 'attention', 'swa' or None (identity) for a TransformerLayer's self_attention."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_gdn.layer import GatedDeltaNet
    from megatron_gdn.mamba2 import Mamba2Mixer

    mixer = layer.self_attention
    if isinstance(mixer, GatedDeltaNet):
        return "gdn"
    if isinstance(mixer, Mamba2Mixer):
        return "mamba2"
    if isinstance(mixer, SelfAttention):
        return "swa" if getattr(mixer.core_attention, "window", None) is not None else "attention"
    if isinstance(mixer, IdentityOp):
        return None
    raise ValueError(f"layer {layer.layer_number}: mixer {type(mixer).__name__} has no decoding path")


def _check_model(model) -> None:
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() != 1 or \
            parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("generation runs at tensor_model_parallel_size = pipeline_model_parallel_size = 1; "
                         "convert or load the checkpoint at TP = PP = 1")
    if not (model.pre_process and model.post_process):
        raise ValueError("generation needs the whole model (pre_process and post_process)")


class Session:
    """Caches of one batch of sequences: per layer a GDNState, a Mamba2State, a KVCache or None.

    prefill(prompts) -> logits [N, T_n, vocab] of every prompt token (list per prompt);
    step(tokens [N]) -> logits [N, vocab] of the next position."""

    def __init__(self, model, capacity: int):
        _check_model(model)
        self.model = model
        self.capacity = capacity
        self.layers = list(model.decoder.layers)
        self.kinds = [mixer_kind(layer) for layer in self.layers]
        self.states: List[object] = [None] * len(self.layers)
        self.lengths: Optional[torch.Tensor] = None

    @property
    def device(self):
        return self.model.embedding.word_embeddings.weight.device

    def _embed(self, tokens_1t, positions_1t):
        return self.model.embedding(input_ids=tokens_1t, position_ids=positions_1t)     # [t, 1|B, h]

    def _ffn(self, layer, hidden):
        x = layer.pre_mlp_layernorm(hidden)
        out = layer.mlp(x)
        if isinstance(out, tuple):
            out, bias = out
            if bias is not None:
                out = out + bias
        return hidden + out

    def _head(self, hidden):
        m = self.model
        hidden = m.decoder.final_layernorm(hidden)
        weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
        logits, _ = m.output_layer(hidden, weight=weight)
        return logits.float()

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> List[torch.Tensor]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token lists")
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        if int(lengths.max()) > self.capacity:
            raise ValueError(f"a prompt has {int(lengths.max())} tokens, more than capacity={self.capacity}")
        cu = torch.zeros(len(prompts) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        dev = self.device
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=dev)[None]
        positions = torch.cat([torch.arange(n) for n in lengths.tolist()]).to(dev)
        cu = cu.to(dev)
        hidden = self._embed(tokens, positions[None])
        for i, (layer, kind) in enumerate(zip(self.layers, self.kinds)):
            if kind is not None:
                x = layer.input_layernorm(hidden)
                if kind == "gdn":
                    out, self.states[i] = mixers.gdn_prefill(layer.self_attention, x, cu)
                elif kind == "mamba2":
                    out, self.states[i] = mixers.mamba2_prefill(layer.self_attention, x, cu)
                else:
                    out, self.states[i] = mixers.attention_prefill(self.model, layer.self_attention, x, cu,
                                                                   positions, self.capacity)
                hidden = hidden + out
            hidden = self._ffn(layer, hidden)
        logits = self._head(hidden)[:, 0]                                          # [T, vocab]
        self.lengths = lengths.to(dev)
        return list(logits.split(lengths.tolist()))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.lengths is None:
            raise ValueError("call prefill() before step()")
        tokens = torch.as_tensor(tokens, device=self.device).reshape(-1, 1)
        if tokens.shape[0] != self.lengths.numel():
            raise ValueError(f"tokens has {tokens.shape[0]} entries for {self.lengths.numel()} sequences")
        positions = self.lengths
        hidden = self._embed(tokens, positions[:, None])                           # [1, B, h]
        for i, (layer, kind) in enumerate(zip(self.layers, self.kinds)):
            if kind is not None:
                x = layer.input_layernorm(hidden)
                if kind == "gdn":
                    out = mixers.gdn_decode(layer.self_attention, x, self.states[i])
                elif kind == "mamba2":
                    out = mixers.mamba2_decode(layer.self_attention, x, self.states[i])
                else:
                    out = mixers.attention_decode(self.model, layer.self_attention, x, positions, self.states[i])
                hidden = hidden + out
            hidden = self._ffn(layer, hidden)
        self.lengths = self.lengths + 1
        return self._head(hidden)[0]

    def state_bytes(self) -> int:
        """Bytes of cached state (all layers, all sequences)."""
        return sum(s.nbytes() for s in self.states if s is not None)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next tokens [B] from logits [B, vocab]: greedy when temperature == 0, else softmax at the
    temperature over the top_k tokens (0: all) within the top_p probability mass."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@dataclass
class GenerationResult:
    """tokens: the new tokens of each prompt (stopping after eos_token_id, which is kept);
    logits: when requested, per prompt [prompt length + new tokens - 1, vocab], the logits
    the model gave at every position (prefill rows, then one per decoding step)."""

    tokens: List[List[int]]
    logits: Optional[List[torch.Tensor]] = None
    state_bytes: int = 0
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, return_logits: bool = False) -> GenerationResult:
    """Generates up to max_new_tokens for each prompt (a batch of different lengths)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    capacity = max(len(p) for p in prompts) + max_new_tokens
    session = Session(model, capacity)
    prefill_logits = session.prefill(prompts)
    rows = [[lg] for lg in prefill_logits] if return_logits else None
    last = torch.stack([lg[-1] for lg in prefill_logits])
    new = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for step in range(max_new_tokens):
        nxt = sample(last, temperature, top_k, top_p, generator)
        for n, t in enumerate(nxt.tolist()):
            if not done[n]:
                new[n].append(t)
                if eos_token_id is not None and t == eos_token_id:
                    done[n] = True
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        last = session.step(nxt)
        if rows is not None:
            for n in range(len(prompts)):
                rows[n].append(last[n][None])
    logits = None
    if rows is not None:
        logits = [torch.cat(r)[:len(prompts[n]) + len(new[n]) - 1] for n, r in enumerate(rows)]
    return GenerationResult(new, logits, session.state_bytes())
