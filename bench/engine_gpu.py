"""Population engine vs the paper's way (transformers generate per member), on one GPU.

    PYTHONPATH=src python bench/engine_gpu.py --model /tmp/models/qwen2.5-coder-0.5b-instruct \
        --data countdown.json --out results/

Times one full ES generation (ask, generate, score, tell) with N members on the countdown training
prompts, the same rows without adapters, `--reference-members` members through PEFT + generate (the
paper's original evaluation, extrapolated to N), greedy agreement with that reference, and a
scaling table. Prints Markdown tables and writes bench.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from evolm.config import ModelConfig
from evolm.engine import PopulationEngine
from evolm.engine.decoding import SamplingParams
from evolm.es.lora_space import LoRASpace
from evolm.es.strategy import EvolutionStrategy
from evolm.models import eos_token_ids, load_model
from evolm.scoring import render_all, score_all, summarize
from evolm.tasks.countdown import CountdownTask

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_FLOPS, PEAK_BYTES = 790e12, 4.3e12  # H200 bf16 dense matmul, HBM copy


def workload(model, prompts, tokens_per_row, steps, population, rank) -> dict:
    """FLOPs and bytes of the generation, counted from what actually ran."""
    cfg = model.config
    layers, hidden, inter, vocab = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = hidden // heads
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    linear = layers * (hidden * (q_out + 2 * kv_out) + q_out * hidden + 3 * hidden * inter)
    lora = layers * population * rank * 2 * (hidden * 6 + q_out + 2 * kv_out + 2 * inter)  # x·Aᵀ and h·B over all members
    kv_bytes_per_token = 2 * layers * kv_heads * head_dim * 2
    prompt_tokens = sum(len(p) for p in prompts)
    new_tokens = sum(tokens_per_row)
    width = max(len(p) for p in prompts)
    attn_ctx = sum(n * width + n * (n - 1) // 2 for n in tokens_per_row)  # keys read, summed over steps
    flops = 2 * (linear + lora) * (prompt_tokens + new_tokens) + 2 * hidden * vocab * new_tokens
    flops += 4 * layers * heads * head_dim * attn_ctx
    weight_bytes = 2 * (linear + hidden * vocab)
    bytes_moved = weight_bytes * sum(steps) + kv_bytes_per_token * (attn_ctx + new_tokens)
    return {"flops": flops, "bytes": bytes_moved, "t_compute": flops / PEAK_FLOPS, "t_memory": bytes_moved / PEAK_BYTES}


def es_generation(engine, space, strategy, task, examples, prompt_ids, params) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    members = strategy.ask()
    engine.set_adapters(space.unflatten(members), space.scale)
    out = engine.generate(prompt_ids, list(range(strategy.population)), params)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    fitness = [summarize(score_all(task, examples, texts))["reward"] for texts in out.texts]
    t2 = time.perf_counter()
    strategy.tell(fitness)
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    rows = [len(t) for member in out.tokens for t in member]
    return {
        "members": strategy.population, "max_new_tokens": params.max_new_tokens,
        "seconds": t3 - t0, "generate_s": t1 - t0, "score_s": t2 - t1, "update_s": t3 - t2,
        "tokens": out.num_tokens, "tokens_per_s": out.num_tokens / (t1 - t0),
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "waves": out.waves, "steps": out.steps,
        "rows_tokens": rows, "output": out, "mean_fitness": sum(fitness) / len(fitness),
    }


def plain_generation(engine, prompt_ids, members, params) -> dict:
    """The same rows with no adapters at all (the engine's plain model path)."""
    engine.clear_adapters()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = engine.generate(prompt_ids * members, None, params)
    torch.cuda.synchronize()
    t = time.perf_counter() - t0
    return {"seconds": t, "tokens": out.num_tokens, "tokens_per_s": out.num_tokens / t}


def reference_generation(base, space, member_theta, tokenizer, prompt_ids, params, eos) -> dict:
    """The paper's original evaluation of one member: PEFT adapter + one generate over all prompts."""
    config = LoraConfig(r=space.rank, lora_alpha=space.alpha, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(base), config).eval()
    weights = space.unflatten(member_theta[None].cpu())
    with torch.no_grad():
        for name, w in weights.items():
            module = model.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(w.A[0])
            module.lora_B["default"].weight.copy_(w.B[0])
    batch = tokenizer.pad([{"input_ids": p} for p in prompt_ids], return_tensors="pt", padding_side="left").to(base.device)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=params.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    rows = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        kept = []
        for tok in row:
            if tok == tokenizer.pad_token_id and tok not in eos:
                break
            kept.append(tok)
            if tok in eos:
                break
        rows.append(kept)
    del model
    torch.cuda.empty_cache()
    return {"seconds": seconds, "tokens": sum(len(r) for r in rows), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="the paper's countdown.json")
    ap.add_argument("--members", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--sigma", type=float, default=0.001)
    ap.add_argument("--reference-members", type=int, default=1)
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile decoding steps and exit")
    ap.add_argument("--agreement", action="store_true",
                    help="fp32 engine vs fp32 reference, and the bf16 reference against itself in other batches")
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    loaded = load_model(ModelConfig(name_or_path=args.model, dtype="bfloat16", device="cuda"))
    base = copy.deepcopy(loaded.model)  # untouched copy for the PEFT reference
    tokenizer, model = loaded.tokenizer, loaded.model
    task = CountdownTask()
    examples = task.load_split("train", f"{args.data}[:200]")
    prompt_ids = render_all(tokenizer, examples)
    eos = eos_token_ids(model, tokenizer)
    engine = PopulationEngine(model, tokenizer, TARGETS, eos_token_ids=eos)
    space = LoRASpace(engine.shapes(), rank=1, alpha=1.0)
    print(f"device {torch.cuda.get_device_name()}, backend {type(engine.backend).__name__}, "
          f"{len(prompt_ids)} prompts, mean prompt {sum(map(len, prompt_ids)) / len(prompt_ids):.0f} tokens", flush=True)

    def strategy(n):
        return EvolutionStrategy(space.initial_theta(0).cuda(), population=n, sigma=args.sigma,
                                 learning_rate=0.0005, seed=0)

    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    if args.profile:
        return profile(engine, space, strategy(args.members), prompt_ids)
    if args.agreement:
        return agreement(args, space, prompt_ids[:64], eos, base, tokenizer)
    es_generation(engine, space, strategy(2), task, examples[:8], prompt_ids[:8], SamplingParams(max_new_tokens=8))
    results: dict = {"device": torch.cuda.get_device_name(), "members": args.members,
                     "max_new_tokens": args.max_new_tokens}
    main_run = es_generation(engine, space, strategy(args.members), task, examples, prompt_ids, params)
    results["engine"] = {k: v for k, v in main_run.items() if k not in ("output", "rows_tokens")}
    results["engine"].update(workload(model, prompt_ids * args.members, main_run["rows_tokens"], main_run["steps"],
                                      args.members, 1))
    results["plain"] = plain_generation(engine, prompt_ids, args.members, params)
    print(json.dumps({k: results[k] for k in ("engine", "plain")}, indent=1), flush=True)

    members = strategy(args.members).ask()
    refs = []
    for m in range(args.reference_members):
        ref = reference_generation(base, space, members[m], tokenizer, prompt_ids, params, eos)
        same = sum(a == b for a, b in zip(ref["rows"], main_run["output"].tokens[m]))
        refs.append({"member": m, "seconds": ref["seconds"], "tokens": ref["tokens"],
                     "identical_rows": same, "rows": len(prompt_ids)})
        print(f"reference member {m}: {ref['seconds']:.1f} s, {ref['tokens']} tokens, "
              f"{same}/{len(prompt_ids)} rows identical to the engine", flush=True)
    results["reference"] = refs
    per_member = sum(r["seconds"] for r in refs) / len(refs)
    results["reference_per_generation_s"] = per_member * args.members

    if args.scaling:
        table = []
        for new_tokens in (256, 1024):
            for n in (8, 30, 64, 128):
                run = es_generation(engine, space, strategy(n), task, examples, prompt_ids,
                                    SamplingParams(max_new_tokens=new_tokens))
                row = {k: v for k, v in run.items() if k not in ("output", "rows_tokens")}
                table.append(row)
                print(json.dumps(row), flush=True)
        results["scaling"] = table
    (args.out / "bench.json").write_text(json.dumps(results, indent=1))
    report(results)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def agreement(args, space, prompt_ids, eos, base_bf16, tokenizer) -> None:
    """Is a disagreement with the reference rounding (bf16 batching) or a bug? fp32 must agree."""
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    theta = EvolutionStrategy(space.initial_theta(0), population=2, sigma=args.sigma, learning_rate=0.0005,
                              seed=0).ask()[0]
    for dtype in ("float32", "bfloat16"):
        loaded = load_model(ModelConfig(name_or_path=args.model, dtype=dtype, device="cuda"))
        ref_base = copy.deepcopy(loaded.model)
        engine = PopulationEngine(loaded.model, tokenizer, TARGETS, eos_token_ids=eos)
        engine.set_adapters(space.unflatten(theta[None].cuda()), space.scale)
        ours = engine.generate(prompt_ids, [0], params).tokens[0]
        ref = reference_generation(ref_base, space, theta, tokenizer, prompt_ids, params, eos)["rows"]
        split = [r for i in range(0, len(prompt_ids), 16)
                 for r in reference_generation(ref_base, space, theta, tokenizer, prompt_ids[i:i + 16], params, eos)["rows"]]
        same = sum(a == b for a, b in zip(ours, ref))
        noise = sum(a == b for a, b in zip(split, ref))
        where = sorted(d for d in (first_divergence(a, b) for a, b in zip(ours, ref)) if d is not None)
        print(f"{dtype}: engine = reference on {same}/{len(ref)} rows; reference in batches of 16 = reference "
              f"in one batch on {noise}/{len(ref)}; first divergences at {where[:20]}", flush=True)
        del loaded, ref_base, engine
        torch.cuda.empty_cache()


def profile(engine, space, strategy, prompt_ids) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    engine.set_adapters(space.unflatten(strategy.ask()), space.scale)
    rows = [p for _ in range(strategy.population) for p in prompt_ids]
    members = torch.arange(strategy.population, device="cuda").repeat_interleave(len(prompt_ids))
    engine.current_max_new_tokens = 64
    backend = engine.backend
    logits = backend.prefill(rows, members)
    token = logits.argmax(-1)
    for _ in range(4):
        token = backend.step(token).argmax(-1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(8):
            token = backend.step(token).argmax(-1)
        torch.cuda.synchronize()
    print(f"8 steps of {len(rows)} rows: {time.perf_counter() - t0:.3f} s (under the profiler)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    backend.close()


def report(r: dict) -> None:
    e, p = r["engine"], r["plain"]
    bound = max(e["t_compute"], e["t_memory"])
    print("\n| what | s / ES generation | tokens | tokens/s | peak GB | vs reference |")
    print("|---|---|---|---|---|---|")
    print(f"| evolm engine, N={r['members']} | {e['seconds']:.1f} | {e['tokens']} | {e['tokens_per_s']:.0f} | "
          f"{e['peak_gb']:.1f} | {r['reference_per_generation_s'] / e['seconds']:.1f}x faster |")
    print(f"| same rows, no adapters | {p['seconds']:.1f} (generate only) | {p['tokens']} | {p['tokens_per_s']:.0f} | | |")
    print(f"| PEFT + generate per member (x{r['members']}, extrapolated) | {r['reference_per_generation_s']:.0f} | | | | 1x |")
    print(f"\nroofline: {e['flops'] / 1e15:.2f} PFLOP, {e['bytes'] / 1e12:.2f} TB -> bound {bound:.1f} s "
          f"({'compute' if e['t_compute'] > e['t_memory'] else 'memory'}); reached {bound / e['generate_s']:.0%}")
    print(f"adapters cost: {e['tokens_per_s'] / p['tokens_per_s']:.0%} of the no-adapter tokens/s")


if __name__ == "__main__":
    main()
