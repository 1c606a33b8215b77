"""Generate text (token ids) with a converted checkpoint: packed prefill, then recurrent decoding.

    python -m megatron_gdn.convert import-hf path/to/qwen3_next_hf ckpt/qwen3_next
    python examples/generate.py ckpt/qwen3_next --prompt "1 2 3 4" --prompt "7 8" --max-new-tokens 32

Prompts are space-separated token ids, or text when --tokenizer names a Hugging Face tokenizer
directory (needs `transformers`). Greedy by default; --temperature / --top-k / --top-p sample.
Runs in one process at TP = PP = 1, on the GPU when there is one.
"""
import argparse
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="a converted checkpoint directory (model.yaml, model_tp1.pt)")
    parser.add_argument("--prompt", action="append", required=True, help="token ids (or text with --tokenizer)")
    parser.add_argument("--tokenizer", default=None, help="Hugging Face tokenizer directory")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="run the model in bf16 (GPU)")
    args = parser.parse_args()

    from megatron_gdn.convert import build_model, single_process
    from megatron_gdn.generation import generate

    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        prompts = [tokenizer.encode(p) for p in args.prompt]
    else:
        prompts = [[int(t) for t in p.split()] for p in args.prompt]

    single_process(seed=args.seed)
    model = build_model(args.ckpt).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    if args.bf16:
        model = model.bfloat16()
    gen = torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu").manual_seed(args.seed)
    start = time.perf_counter()
    result = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, generator=gen,
                      eos_token_id=getattr(tokenizer, "eos_token_id", None))
    seconds = time.perf_counter() - start
    for prompt, new in zip(prompts, result.tokens):
        text = tokenizer.decode(new) if tokenizer else " ".join(map(str, new))
        print(f"prompt ({len(prompt)} tokens) -> {text}")
    total = sum(len(t) for t in result.tokens)
    print(f"{total} tokens in {seconds:.2f} s; cached state {result.state_bytes / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
