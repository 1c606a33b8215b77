"""Decoding step per layer and cached state per sequence: a 1.3B-size Gated DeltaNet model
(examples/configs/gdn_1.3b.yaml) against a same-width attention model with a KV cache.

    python benchmarks/bench_generate.py --out benchmarks/logs/generate          (GPU, bf16)
    python benchmarks/bench_generate.py --out /tmp/generate_smoke --smoke       (CPU, tiny)

One Megatron layer of each kind is built from the YAML (mixer + SwiGLU MLP, bf16) and timed for
one decoding step (input norm -> mixer -> residual -> norm -> MLP -> residual) through
megatron_gdn.generation.mixers at batch 1, 16, 64 and contexts 4K, 32K, 128K. The GDN step
reads and writes a constant state (recurrent [B, HV, K, V] fp32 + conv [B, D, W-1]): its time
does not depend on the context. The attention step appends to a KV cache holding `context`
tokens and attends over it with torch SDPA (a masked cache; not a flash-decoding kernel: say so
next to any figure). Whole-model figures are per-layer x number of layers.
A KV cache above --max-cache-gib is not allocated; its row says so.

Correctness of the timed path: tests/generation/test_generation.py (prefill + decode equals
a full forward) and tests/kernels/test_recurrent.py.
"""
import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

GDN_YAML = "examples/configs/gdn_1.3b.yaml"


def attention_doc(gdn_doc, heads=16, head_dim=128):
    """Same width, depth and MLP as the GDN model; standard multi-head attention with RoPE."""
    return {"name": "attention_1.3b", "model": dict(gdn_doc["model"], position_embedding="rope"),
            "layers": gdn_doc["layers"].replace("gdn", "attention"),
            "attention": {"num_heads": heads, "num_kv_heads": heads, "head_dim": head_dim},
            "mlp": gdn_doc["mlp"]}


def one_layer(doc):
    out = dict(doc)
    count = int(doc["layers"].split("x")[0]) if "x" in doc["layers"] else 1
    out["layers"] = "[" + doc["layers"].split("[", 1)[1]
    return out, count


def timed(fn, device, iters, warmup=3):
    """Median ms of fn() over `iters` runs after `warmup` (CUDA events on a GPU, wall clock on
    the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU")
    parser.add_argument("--max-cache-gib", type=float, default=40.0)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()

    import yaml

    from megatron_gdn.convert import single_process
    from megatron_gdn.generation import mixers
    from megatron_gdn.hybrid import yaml_loader as yl

    single_process()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        gdn_doc = yaml.safe_load(Path("examples/configs/tiny_gdn.yaml").read_text())
        att_doc = attention_doc(gdn_doc, heads=4, head_dim=16)
        batches, contexts = (1, 2), (64, 128)
    else:
        gdn_doc = yaml.safe_load(Path(GDN_YAML).read_text())
        att_doc = attention_doc(gdn_doc)
        batches, contexts = (1, 16, 64), (4096, 32768, 131072)
    full_counts = {"gdn": yl.count_parameters(yl.parse(gdn_doc, "gdn"))["total"],
                   "attention": yl.count_parameters(yl.parse(att_doc, "attention"))["total"]}

    layers, n_layers = {}, {}
    for kind, doc in (("gdn", gdn_doc), ("attention", att_doc)):
        one, n_layers[kind] = one_layer(doc)
        hm = yl.parse(one, kind)
        cfg = yl.transformer_config(hm, use_cpu_initialization=True, params_dtype=dtype)
        model = yl.build_gpt_model(hm, cfg).to(device=device, dtype=dtype).eval()
        layers[kind] = (model, model.decoder.layers[0])

    def step(model, layer, hidden, mix):
        x = layer.input_layernorm(hidden)
        hidden = hidden + mix(x)
        out, _ = layer.mlp(layer.pre_mlp_layernorm(hidden))
        return hidden + out

    rows = []
    for B in batches:
        model, layer = layers["gdn"]
        d = layer.self_attention.dims
        D = d.conv_dim_local_tp
        state = mixers.GDNState(
            torch.randn(B, D, d.conv_kernel_dim - 1, device=device, dtype=dtype),
            0.01 * torch.randn(B, d.num_value_heads, d.key_head_dim, d.value_head_dim, device=device))
        hidden = torch.randn(1, B, d.hidden_size, device=device, dtype=dtype)
        with torch.no_grad():
            gdn_ms = timed(lambda: step(model, layer, hidden, lambda x: mixers.gdn_decode(layer.self_attention, x, state)),
                           device, args.iters)
        gdn_bytes = state.nbytes() // B
        for C in contexts:
            model_a, layer_a = layers["attention"]
            att = layer_a.self_attention
            ng, hd = att.num_query_groups_per_partition, att.hidden_size_per_attention_head
            cache_bytes = 2 * B * C * ng * hd * torch.finfo(dtype).bits // 8
            row = {"batch": B, "context": C, "gdn_step_ms_per_layer": gdn_ms,
                   "gdn_state_bytes_per_seq_per_layer": gdn_bytes,
                   "attention_kv_bytes_per_seq_per_layer": cache_bytes // B}
            if cache_bytes > args.max_cache_gib * 2**30:
                row["attention_step_ms_per_layer"] = None
                row["note"] = f"KV cache {cache_bytes / 2**30:.1f} GiB per layer > --max-cache-gib: not run"
            else:
                cache = mixers.KVCache(torch.randn(B, C, ng, hd, device=device, dtype=dtype),
                                       torch.randn(B, C, ng, hd, device=device, dtype=dtype),
                                       torch.arange(C, device=device).expand(B, C).clone(), None)
                positions = torch.full((B,), C - 1, device=device, dtype=torch.long)
                hidden_a = torch.randn(1, B, d.hidden_size, device=device, dtype=dtype)
                with torch.no_grad():
                    row["attention_step_ms_per_layer"] = timed(
                        lambda: step(model_a, layer_a, hidden_a,
                                     lambda x: mixers.attention_decode(model_a, att, x, positions, cache)),
                        device, args.iters)
                del cache
            for kind in ("gdn", "attention"):
                ms = row.get(f"{kind}_step_ms_per_layer")
                row[f"{kind}_tokens_per_s_model"] = None if ms is None else B * 1e3 / (ms * n_layers[kind])
            rows.append(row)
            print(json.dumps(row))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "dtype": str(dtype), "layers": n_layers, "parameters": full_counts,
            "attention_kernel": "torch SDPA over a masked KV cache (no flash-decoding kernel)",
            "smoke": args.smoke}
    (out / "bench_generate.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# bench_generate ({meta['device']}, {meta['dtype']}, {meta['date']})", "",
             f"parameters: GDN {full_counts['gdn'] / 1e9:.2f} B, attention {full_counts['attention'] / 1e9:.2f} B; "
             f"attention baseline: {meta['attention_kernel']}", "",
             "| batch | context | GDN ms/layer | attn ms/layer | GDN tok/s | attn tok/s | GDN state B/seq (model) | KV B/seq (model) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["attention_step_ms_per_layer"]
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['gdn_step_ms_per_layer']:.3f} | "
            f"{'n/a' if a is None else f'{a:.3f}'} | {r['gdn_tokens_per_s_model']:.0f} | "
            f"{'n/a' if a is None else f'{r['attention_tokens_per_s_model']:.0f}'} | "
            f"{r['gdn_state_bytes_per_seq_per_layer'] * n_layers['gdn']:,} | "
            f"{r['attention_kv_bytes_per_seq_per_layer'] * n_layers['attention']:,} |")
    (out / "bench_generate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
