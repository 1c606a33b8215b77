"""Model FLOPs per token, and a per-iteration meter: loss, tokens/s, tokens/s/GPU, MFU.

FLOPs are counted for matmuls and the recurrence (2 per multiply-add), forward only; a
training step costs 3x (backward = 2x forward), without recomputation. Per token:

    GDN layer     in_proj + out_proj weights, short conv (K taps on the q/k/v channels), and
                  the chunked recurrence per value head: 4 dk*dv products with the state
                  (q S, w S, the k^T u update, the state read of the next chunk) plus the
                  intra-chunk causal products (q k^T, k k^T, A v: on average C/2 keys for a
                  chunk of C = 64) -> 2 * (4 dk dv + C (dk + dv)) FLOPs
    attention     qkv and output projections + 2 * 2 * heads * head_dim * L_eff, with L_eff =
                  s/2 (causal) or min(window, s)
    MLP / MoE     2 (SwiGLU: 3) weight matrices per active expert, router, shared expert
    logits        hidden x padded vocabulary

`IterationMeter` wraps megatron.training's `training_log` (called once per iteration on every
rank, with the loss already averaged over the data-parallel group) and times the interval
between calls, minus the time spent in evaluation and checkpoint saving inside it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

__all__ = ["flops_per_token", "peak_tflops", "IterationMeter", "CHUNK_SIZE"]

# the chunk kernel's chunk length (kernels/gated_delta_rule)
CHUNK_SIZE = 64
# dense bf16 tensor-core peaks (NVIDIA data sheets, SXM parts, no sparsity)
_PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "B200": 2250.0}


def _gdn_flops(args) -> float:
    h = args.hidden_size
    hk = args.linear_num_key_heads or args.num_attention_heads
    hv = args.linear_num_value_heads or hk
    dk = args.linear_key_head_dim or args.kv_channels
    dv = args.linear_value_head_dim or dk
    conv = args.linear_conv_kernel_dim or 4
    qk, v = hk * dk, hv * dv
    proj = h * (2 * qk + 2 * v + 2 * hv) + v * h
    return 2 * proj + 2 * conv * (2 * qk + v) + hv * 2 * (4 * dk * dv + CHUNK_SIZE * (dk + dv))


def _attention_flops(args, window: Optional[int]) -> float:
    h, heads = args.hidden_size, args.num_attention_heads
    d = args.kv_channels or h // heads
    groups = args.num_query_groups if args.group_query_attention else heads
    span = args.seq_length / 2 if window is None else min(window, args.seq_length)
    proj = h * (heads + 2 * groups) * d + heads * d * h
    return 2 * proj + 2 * 2 * heads * d * span


def _ffn_flops(args, kind: str) -> float:
    h = args.hidden_size
    mats = 3 if args.swiglu else 2
    if kind == "mlp":
        return 2 * mats * h * args.ffn_hidden_size
    ffn = args.moe_ffn_hidden_size or args.ffn_hidden_size
    shared = args.moe_shared_expert_intermediate_size or 0
    return 2 * (args.moe_router_topk * mats * h * ffn + mats * h * shared + h * args.num_experts)


def flops_per_token(args, hybrid=None) -> float:
    """Training FLOPs per token (forward + backward) of the model described by `args` (and the
    YAML model `hybrid`, if given)."""
    if hybrid is None:
        ffn = "moe" if args.num_experts else "mlp"
        layers = [("gdn", ffn, None)] * args.num_layers
    else:
        window = hybrid.sections.get("swa", {}).get("window") if hybrid.uses("swa") else None
        layers = [(p.mixer, p.ffn, p.option("window", window)) for p in hybrid.layers]
    total = 2 * args.hidden_size * args.padded_vocab_size
    for mixer, ffn, window in layers:
        if mixer == "gdn":
            total += _gdn_flops(args)
        elif mixer == "attention":
            total += _attention_flops(args, None)
        elif mixer == "swa":
            total += _attention_flops(args, window)
        if ffn is not None:
            total += _ffn_flops(args, ffn)
    return 3.0 * total


def peak_tflops(args, override: Optional[float]) -> Optional[float]:
    """Peak dense TFLOP/s of one device for the run's precision, or None when unknown (CPU,
    fp32 runs, unlisted GPUs): then MFU is not reported unless --peak-tflops is given."""
    if override is not None:
        return override
    if not torch.cuda.is_available() or not (args.bf16 or args.fp16):
        return None
    name = torch.cuda.get_device_name()
    for key, value in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


class IterationMeter:
    """Per-iteration loss, time, tokens/s (total and per GPU) and MFU; printed every
    `log_interval` iterations by the last rank and appended to OUT/metrics.jsonl (started afresh
    unless the run resumes with --load)."""

    def __init__(self, args, flops_token: float, peak: Optional[float], out_dir: Optional[str],
                 warmup: int):
        self.args = args
        self.flops_token = flops_token
        self.peak = peak
        self.warmup = warmup
        self.tokens_per_iter = args.global_batch_size * args.seq_length
        self.records: List[Dict] = []
        self._last: Optional[float] = None
        self._excluded = 0.0
        self._start_iter: Optional[int] = None
        self._metrics = Path(out_dir) / "metrics.jsonl" if out_dir else None
        last_rank = int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1
        if self._metrics is not None and args.load is None and last_rank:
            # a fresh run in an old run directory starts a fresh file; a resumed run appends
            self._metrics.unlink(missing_ok=True)

    # ------------------------------------------------------------------ hooks into training.py
    def install(self) -> None:
        from megatron.training import training

        orig_log = training.training_log
        orig_eval = training.evaluate_and_print_results
        orig_save = training.save_checkpoint_and_time

        def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *a, **k):
            result = orig_log(loss_dict, total_loss_dict, learning_rate, iteration, *a, **k)
            self._on_iteration(loss_dict, learning_rate, iteration)
            return result

        def excluded(fn):
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    self._excluded += time.perf_counter() - t0
            return wrapper

        training.training_log = training_log
        training.evaluate_and_print_results = excluded(orig_eval)
        training.save_checkpoint_and_time = excluded(orig_save)

    @property
    def world(self) -> int:
        return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

    def _is_logger(self) -> bool:
        return (not torch.distributed.is_initialized()
                or torch.distributed.get_rank() == self.world - 1)

    def _on_iteration(self, loss_dict, learning_rate, iteration: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._last is None:
            # first iteration of this run: its start is not observed (it includes start-up)
            self._last, self._excluded, self._start_iter = now, 0.0, iteration
            self._record(iteration, loss_dict, learning_rate, None)
            return
        seconds = now - self._last - self._excluded
        self._last, self._excluded = now, 0.0
        self._record(iteration, loss_dict, learning_rate, seconds)

    def _record(self, iteration, loss_dict, learning_rate, seconds) -> None:
        if not self._is_logger():
            return
        loss = loss_dict.get("lm loss") if loss_dict else None
        rec = {"iteration": int(iteration),
               "lm_loss": None if loss is None else float(loss),
               "lr": None if learning_rate is None else float(learning_rate),
               "iter_time_s": seconds}
        if torch.cuda.is_available():
            # this (logging) rank's peak since the start: parameters, optimizer state, activations
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if seconds:
            tps = self.tokens_per_iter / seconds
            rec["tokens_per_s"] = tps
            rec["tokens_per_s_per_gpu"] = tps / self.world
            if self.peak:
                rec["mfu"] = tps / self.world * self.flops_token / (self.peak * 1e12)
        self.records.append(rec)
        if self._metrics is not None:
            self._metrics.parent.mkdir(parents=True, exist_ok=True)
            with self._metrics.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        if iteration % self.args.log_interval == 0 or iteration == self.args.train_iters:
            self._print(rec)

    def _print(self, rec) -> None:
        total = self.args.train_iters
        parts = [f"[gdn] iter {rec['iteration']}/{total} ({100.0 * rec['iteration'] / total:.0f}%)"]
        if rec["lm_loss"] is not None:
            parts.append(f"loss {rec['lm_loss']:.4f}")
        if rec.get("tokens_per_s"):
            parts.append(f"{rec['tokens_per_s']:.0f} tokens/s "
                         f"({rec['tokens_per_s_per_gpu']:.0f}/device)")
            eta = (total - rec["iteration"]) * rec["iter_time_s"]
            parts.append(f"eta {eta:.0f}s")
        if rec.get("mfu") is not None:
            parts.append(f"MFU {100 * rec['mfu']:.1f}%")
        if rec.get("peak_mem_gib") is not None:
            parts.append(f"peak {rec['peak_mem_gib']:.2f} GiB")
        print(" | ".join(parts), flush=True)

    def summary(self) -> Optional[Dict]:
        """Mean over the timed iterations after `warmup` (last rank only; None elsewhere)."""
        if not self._is_logger() or self._start_iter is None:
            return None
        timed = [r for r in self.records
                 if r.get("tokens_per_s") and r["iteration"] > self._start_iter + self.warmup]
        losses = [r["lm_loss"] for r in self.records if r["lm_loss"] is not None]
        out = {"iterations": len(self.records), "timed_iterations": len(timed),
               "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None,
               "flops_per_token": self.flops_token, "world_size": self.world}
        if timed:
            seconds = sum(r["iter_time_s"] for r in timed)
            tps = self.tokens_per_iter * len(timed) / seconds
            out.update(tokens_per_s=tps, tokens_per_s_per_gpu=tps / self.world)
            if self.peak:
                out["mfu"] = tps / self.world * self.flops_token / (self.peak * 1e12)
        return out
