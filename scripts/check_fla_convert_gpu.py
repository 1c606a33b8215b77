"""GPU check: a tiny random fla GatedDeltaNetForCausalLM (fla 0.6.0, its Triton kernels) converted
to megatron-gdn gives the same logits (fp32; fla's kernels use tf32 dots, hence TF32-level
tolerance), and exported back bit for bit; then the converted model generates on the GPU
(three prompts of different lengths, greedy, 24 new tokens: packed prefill, then the recurrent
step), and the logits of every decoding step equal those of one full forward over the generated
sequences, ours and fla's.

    python scripts/check_fla_convert_gpu.py --out logs/fla_convert

Needs a CUDA device and `pip install flash-linear-attention==0.6.0 fla-core==0.6.0`.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the JSON result")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (fla's model runs only with its Triton kernels)")
    # megatron_gdn first: with the repository root on sys.path our kernels/ folder would shadow
    # Hugging Face's `kernels`, which newer transformers (imported by fla) import when installed
    from megatron_gdn.convert import build_model, checkpoint_io, fla_gdn, single_process
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    from megatron_gdn.hybrid import yaml_loader as yl

    t0 = time.time()

    def progress(what):  # fla's kernels autotune on their first calls: say where the time goes
        print(f"[{time.time() - t0:6.1f} s] {what}", flush=True)

    torch.manual_seed(0)
    cfg = GatedDeltaNetConfig(hidden_size=256, num_hidden_layers=2, num_heads=2, num_v_heads=4, head_dim=64,
                              expand_v=1.0, vocab_size=512, fuse_norm=False, fuse_swiglu=False,
                              fuse_cross_entropy=False)
    fla_model = GatedDeltaNetForCausalLM(cfg).cuda().float().eval()
    doc, overrides = fla_gdn.yaml_from_hf_config(cfg.to_dict())
    hm = yl.parse(doc, "fla.yaml")
    src = {k: v.detach().cpu() for k, v in fla_model.state_dict().items()}
    state = fla_gdn.to_megatron(hm, src)
    back = fla_gdn.to_hf(hm, state)
    bit_exact = sorted(back) == sorted(src) and all(torch.equal(back[k], src[k]) for k in src)
    ckpt = tempfile.mkdtemp()
    checkpoint_io.write(ckpt, doc, overrides, state, "GatedDeltaNetForCausalLM (gpu check)")
    single_process()
    model = build_model(ckpt).cuda().eval()
    tokens = torch.randint(0, 512, (2, 256), device="cuda")
    with torch.no_grad():
        expected = fla_model(tokens).logits.float()
        progress("fla forward")
        actual = model(tokens, torch.arange(256, device="cuda")[None].expand(2, -1), None).float()
    rel = ((actual - expected).norm() / expected.norm()).item()
    progress(f"converted model forward: logits relative error {rel:.2e}")

    from megatron_gdn.generation import generate

    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (37, 5, 130)]
    with torch.no_grad():
        gen = generate(model, prompts, 24, return_logits=True)
        progress("generated")
        decode_rel = {"ours": 0.0, "fla": 0.0}
        for prompt, new_tokens, logits in zip(prompts, gen.tokens, gen.logits):
            seq = torch.tensor(prompt + new_tokens, device="cuda")[None]
            T = seq.shape[1]
            full = {"ours": model(seq, torch.arange(T, device="cuda")[None], None).float()[0],
                    "fla": fla_model(seq).logits.float()[0]}
            for name, ref in full.items():
                ref = ref[:logits.shape[0]]
                decode_rel[name] = max(decode_rel[name],
                                       ((logits.float() - ref).norm() / ref.norm()).item())
    result = {"device": torch.cuda.get_device_name(), "logits_rel_rms": rel, "export_bit_exact": bit_exact,
              "generated": gen.tokens, "state_bytes": gen.state_bytes,
              "decode_vs_full_forward_rel_rms": decode_rel,
              "pass": bool(rel <= 5e-3 and bit_exact and max(decode_rel.values()) <= 5e-3)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fla_convert.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
