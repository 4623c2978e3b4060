"""Sampling throughput: Hugging Face dynamic-cache `generate` vs rlhfkit's static-cache decode loop (and the loop
with a `torch.compile`d decode step on CUDA), on a randomly initialised Llama built from a config.

    python benchmarks/sampling.py --model-size tiny                  # playground-sized model, CPU
    python benchmarks/sampling.py --device cuda --model-size 0.4b    # 896 x 24 layers, bf16, batch 64, 128 + 128

Prints a table (generated tokens/s = batch x decode steps / seconds, median of the timed repeats) and writes
JSON to benchmarks/results/sampling.json. Rows rarely hit EOS with random weights, so every backend runs the
full number of new tokens."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from rlhfkit.generation import Decoding, generate_hf, generate_static

# name -> (LlamaConfig fields, default batch, prompt length, new tokens)
SIZES = {
    # the playground's base model (WorldSpec: 128 hidden, 4 layers, 4 heads; its word vocabulary is ~380)
    "tiny": (dict(vocab_size=384, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4), 16, 32, 48),
    # a 0.4b Llama (386.5M matmul params), the size of published peer throughput figures
    "0.4b": (dict(vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2), 64, 128, 128),
}
EOS, PAD = 2, 0


def build_model(size: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    fields, *_ = SIZES[size]
    config = LlamaConfig(**fields, max_position_embeddings=4096, pad_token_id=PAD, bos_token_id=1,
                         eos_token_id=EOS, tie_word_embeddings=size == "tiny")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def make_prompts(batch: int, prompt_len: int, vocab: int, device: str):
    """Mixed-length prompts (half to full length), left-padded: (input_ids, attention_mask), each (B, P)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(prompt_len // 2, prompt_len + 1, (batch,), generator=g)  # (B,)
    lengths[0] = prompt_len
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g)  # (B, P), never EOS or pad
    mask = (torch.arange(prompt_len)[None, :] >= prompt_len - lengths[:, None]).long()  # (B, P) 1 = real token
    ids = ids.masked_fill(mask == 0, PAD)
    return ids.to(device), mask.to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_backend(fn, device: str, repeats: int, warm_fn=None) -> tuple[list[float], int, float]:
    """(timed seconds per repeat, decode steps of one call, seconds of the untimed warm-up call, which compiles
    when compiling; warm_fn, when given, is a cheaper warm-up)."""
    sync(device)
    t0 = time.perf_counter()
    out = (warm_fn or fn)()
    sync(device)
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, out[0].shape[1], warmup


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model-size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, help="default: 16 (tiny) or 64 (0.4b)")
    parser.add_argument("--prompt-len", type=int, help="default: 32 (tiny) or 128 (0.4b)")
    parser.add_argument("--new-tokens", type=int, help="default: 48 (tiny) or 128 (0.4b)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per backend (after one warm-up)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampling.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda given but torch sees no CUDA device; run on a GPU machine or use --device cpu.")

    _, batch, prompt_len, new_tokens = SIZES[args.model_size]
    batch, prompt_len, new_tokens = args.batch or batch, args.prompt_len or prompt_len, args.new_tokens or new_tokens
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    start = time.perf_counter()
    model = build_model(args.model_size, args.device, dtype)
    ids, mask = make_prompts(batch, prompt_len, model.config.vocab_size, args.device)
    common = dict(max_new_tokens=new_tokens, eos_token_id=EOS, pad_token_id=PAD, temperature=args.temperature)

    def plain_generate(n: int = new_tokens):  # what sample() did before the static loop; no log-probs kept
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=True,
                             temperature=args.temperature, top_k=0, top_p=1.0, eos_token_id=EOS, pad_token_id=PAD)
        return (out[:, ids.shape[1] :],)

    # (name, timed call, warm-up call or None for the same call); the HF loop has nothing to compile, so a short
    # call warms it up and keeps the GPU run inside its time budget
    variants = [("hf generate (dynamic cache)", plain_generate, lambda: plain_generate(8))]
    if args.device == "cpu":  # sample()'s hf backend; on a GPU it only adds a copy of the logits
        variants.append(("hf generate + log-probs", lambda: generate_hf(model, ids, mask, Decoding(**common)), None))
    variants.append(("static cache loop", lambda: generate_static(model, ids, mask, Decoding(**common)), None))
    if not args.no_compile:
        variants.append(("static cache + torch.compile",
                         lambda: generate_static(model, ids, mask, Decoding(**common), compile=True), None))
    rows = []
    for name, fn, warm_fn in variants:
        torch.manual_seed(0)
        times, steps, warmup = time_backend(fn, args.device, args.repeats, warm_fn)
        median = statistics.median(times)
        rows.append(dict(backend=name, median_s=median, min_s=min(times), max_s=max(times), steps=steps,
                         tokens_per_s=batch * steps / median, warmup_s=warmup))

    n_params = sum(p.numel() for p in model.parameters())
    print(f"\nsampling: {args.model_size} Llama ({n_params / 1e6:.1f}M params, {str(dtype).removeprefix('torch.')}) "
          f"on {args.device}, batch {batch}, prompt {prompt_len} (mixed lengths, left-padded), {new_tokens} new "
          f"tokens, temperature {args.temperature}; median of {args.repeats}")
    base = rows[0]["tokens_per_s"]
    print(f"{'backend':32} {'tokens/s':>10} {'median s':>9} {'range s':>15} {'steps':>6} {'warm-up s':>9} {'vs hf':>6}")
    for r in rows:
        print(f"{r['backend']:32} {r['tokens_per_s']:10.0f} {r['median_s']:9.3f} "
              f"{r['min_s']:7.3f}-{r['max_s']:<7.3f} {r['steps']:6d} {r['warmup_s']:9.2f} "
              f"{r['tokens_per_s'] / base:5.2f}x")
    import transformers

    result = dict(
        model_size=args.model_size, params=n_params, device=args.device, dtype=str(dtype), batch=batch,
        prompt_len=prompt_len, new_tokens=new_tokens, temperature=args.temperature, repeats=args.repeats,
        gpu=torch.cuda.get_device_name() if args.device == "cuda" else None, cpu_threads=torch.get_num_threads(),
        torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
        total_s=time.perf_counter() - start, results=rows,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} (total {result['total_s']:.1f} s)")
    return result


if __name__ == "__main__":
    main()
