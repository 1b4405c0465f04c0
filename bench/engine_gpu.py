"""Population engine vs the paper's way (one plain generate per member), on one GPU; `--device cpu` for a smoke check.

    PYTHONPATH=src python bench/engine_gpu.py --model /tmp/models/qwen2.5-coder-1.5b-instruct \
        --data countdown.json --space lora|full-lowrank|full [--rank R] [--chat] [--stop '</answer>'] \
        [--max-new-tokens T] [--reference-prompts K] [--scaling] --out results/
    PYTHONPATH=src python bench/engine_gpu.py --history RUN/results/history.jsonl   # the tail row of a real run

The three regimes of docs/benchmarks.md: reasoning (`--chat --stop '</answer>' --max-new-tokens 1024`), fixed
length (`--max-new-tokens 256`, no stop) and short answers (`--stop '</answer>'`, the raw prompt).

Times one full ES generation (space.generate_population, score, strategy.tell) with N members on the countdown
training prompts, the same rows with no adapters, `--reference-members` members each as a plain model through
transformers generate (the paper's evaluation, extrapolated to N: for lora a PEFT LoRA with the member's A and B
written in, for full-lowrank the model with W + σ·E_i written in), greedy agreement with that reference, and with
`--scaling` a table over population sizes and token limits. `--profile` profiles decoding steps and exits;
`--agreement` compares fp32 and bf16 engine vs reference. Prints Markdown tables and writes
bench-SPACE.json (bench-SPACE-stop.json with --stop; a -kv-fp8 suffix with --kv-cache-dtype fp8, whose rows the
exact reference then checks for greedy agreement as any others; a -lowrank suffix with --lowrank-kernel).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from evolm.config import STEP_DEFAULTS, ModelConfig, SpaceConfig
from evolm.engine import PopulationEngine, SamplingParams, lowrank
from evolm.engine.decoding import cut_at_stop, trim_at_eos
from evolm.es.loop import make_space
from evolm.es.space import Space
from evolm.es.strategy import EvolutionStrategy
from evolm.models import eos_token_ids, load_model
from evolm.scoring import render_all, score_all, summarize
from evolm.tasks.countdown import CountdownTask

TARGETS = SpaceConfig().target_modules  # every linear layer of a decoder block
# Roofline ceilings by torch.cuda.get_device_name(): the vendor's datasheet numbers (dense bf16 matmul FLOP/s,
# HBM bytes/s). What was measured on these machines is lower: an H200 about 790 TFLOP/s bf16 and 4.3 TB/s
# device copy, an H100 80GB HBM3 about 798 TFLOP/s and 3.0 TB/s; pass those as --peak-flops/--peak-bytes to
# read "reached" against measured ceilings instead.
DEVICE_PEAKS = {
    "NVIDIA H100 80GB HBM3": (989e12, 3.35e12),  # H100 SXM
    "NVIDIA H200": (989e12, 4.8e12),  # H200 SXM
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def roofline_peaks(device: torch.device, peak_flops: float | None, peak_bytes: float | None) -> dict | None:
    """FLOP/s and bytes/s ceilings: the overrides, else the device's datasheet numbers; None when neither is known."""
    name = device_name(device)
    table = DEVICE_PEAKS.get(name, (None, None))
    flops, bytes_per_s = peak_flops or table[0], peak_bytes or table[1]
    if not (flops and bytes_per_s):
        print(f"roofline: no ceilings known for device '{name}' (known: {', '.join(DEVICE_PEAKS)}); "
              "pass --peak-flops and --peak-bytes for a roofline column", flush=True)
        return None
    source = "--peak-flops/--peak-bytes" if peak_flops or peak_bytes else "datasheet"
    print(f"roofline: {flops / 1e12:.0f} TFLOP/s and {bytes_per_s / 1e12:.2f} TB/s for device '{name}' ({source})",
          flush=True)
    return {"device": name, "flops_per_s": flops, "bytes_per_s": bytes_per_s, "source": source}


def workload(engine: PopulationEngine, prompts, tokens_per_row, steps, population: int, rank: int) -> dict:
    """FLOPs and bytes of a generation of `population` members' rank-`rank` factors, counted from what ran."""
    cfg = engine.model.config.get_text_config()
    layers, hidden, vocab = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    shapes = engine.shapes().values()  # (in, out) of every targeted linear layer, all decoder blocks
    linear = sum(fan_in * fan_out for fan_in, fan_out in shapes)  # multiply-adds per token
    adapter = rank * sum(fan_in + fan_out for fan_in, fan_out in shapes)  # x·Aᵀ then ·Bᵀ, one member per row
    element = torch.finfo(engine.dtype).bits // 8
    kv_bytes_per_token = 2 * layers * kv_heads * head_dim * element
    prompt_tokens, new_tokens = sum(len(p) for p in prompts), sum(tokens_per_row)
    width = max(len(p) for p in prompts)
    attn_ctx = sum(n * width + n * (n - 1) // 2 for n in tokens_per_row)  # keys read, summed over steps
    flops = 2 * (linear + adapter) * (prompt_tokens + new_tokens) + 2 * hidden * vocab * new_tokens
    flops += 4 * layers * heads * head_dim * attn_ctx
    # every decoding step reads the weights and all members' factors once, and the KV cache of its rows
    step_bytes = element * (linear + hidden * vocab + population * adapter)
    bytes_moved = step_bytes * steps + kv_bytes_per_token * (attn_ctx + new_tokens)
    return {"flops": flops, "bytes": bytes_moved}


def new_strategy(space: Space, population: int, sigma: float, learning_rate: float) -> EvolutionStrategy:
    """A strategy at generation 0. θ₀ of a full space is the engine's weights: the bench never evolves them
    (tell updates the strategy's fp32 θ; the model is written from it only at the next generate_population)."""
    params = {n: p.to(space.engine.device) for n, p in space.initial_params(0).items()}
    return EvolutionStrategy(params, population=population, sigma=sigma, learning_rate=learning_rate, seed=0,
                             noise_rank=space.noise_rank)


def es_generation(space: Space, strategy: EvolutionStrategy, task, examples, prompt_ids,
                  sampling: SamplingParams) -> dict:
    """One ES generation as the loop runs it: every member's completions, their rewards, the update."""
    device = space.engine.device
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = space.generate_population(strategy.ask(), range(strategy.population), prompt_ids, sampling)
    synchronize(device)
    t1 = time.perf_counter()
    fitness = [summarize(score_all(task, examples, texts))["reward"] for texts in out.texts]
    t2 = time.perf_counter()
    strategy.tell(fitness)
    synchronize(device)
    t3 = time.perf_counter()
    return {
        "space": space.kind, "members": strategy.population,
        "max_new_tokens": sampling.max_new_tokens,
        "seconds": t3 - t0, "generate_s": t1 - t0, "score_s": t2 - t1, "update_s": t3 - t2,
        "tokens": out.num_tokens, "tokens_per_s": out.num_tokens / (t1 - t0),
        "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "rows_at_once": out.rows_at_once, "steps": out.steps, "row_steps": out.row_steps, "refills": out.refills,
        "noise_s": out.seconds.get("noise", 0.0), "engine_s": out.seconds, "host_s": out.host_seconds,
        "mean_fitness": sum(fitness) / len(fitness),
        "output": out, "rows_tokens": [len(t) for member in out.tokens for t in member],
    }


def plain_generation(engine: PopulationEngine, prompt_ids, members: int, sampling: SamplingParams) -> dict:
    """The same rows with no adapters at all (the engine's plain model path)."""
    engine.clear_factors()
    synchronize(engine.device)
    t0 = time.perf_counter()
    out = engine.generate(prompt_ids * members, None, sampling)
    synchronize(engine.device)
    t = time.perf_counter() - t0
    return {"seconds": t, "tokens": out.num_tokens, "tokens_per_s": out.num_tokens / t, "steps": out.steps,
            "rows_at_once": out.rows_at_once}


@torch.no_grad()
def reference_model(base, space: Space, strategy: EvolutionStrategy, member: int):
    """Member `member` of the strategy's generation as a plain model: what the paper evaluates one by one."""
    noise = strategy.ask().noise(member)
    if space.kind == "lora":  # a PEFT LoRA holding the member's A and B
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=space.rank, lora_alpha=space.alpha,
                                                                 target_modules=TARGETS, lora_dropout=0.0))
        theta = {n: (strategy.params[n] + strategy.sigma * eps)[None] for n, eps in noise.items()}
        for name, w in space.unflatten(theta).items():
            module = model.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(w.A[0])
            module.lora_B["default"].weight.copy_(w.B[0])
        return model.eval()
    model = copy.deepcopy(base)  # full spaces: W + σ·E_i written into the weights
    for name, eps in noise.items():  # full-lowrank: E_i = B_i A_i / √r; full: dense E_i
        delta = eps if space.kind == "full" else (eps[1] @ eps[0]) / math.sqrt(eps[0].shape[0])
        model.get_submodule(name).weight.copy_(strategy.params[name] + strategy.sigma * delta)
    return model.eval()


def reference_generation(model, tokenizer, prompt_ids, sampling: SamplingParams, eos) -> dict:
    """One greedy transformers generate over all prompts (left padded), as the paper evaluates a member."""
    batch = tokenizer.pad([{"input_ids": p} for p in prompt_ids], return_tensors="pt", padding_side="left")
    batch = batch.to(model.device)
    stops = list(sampling.stop_strings)
    synchronize(model.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=sampling.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                             **({"stop_strings": stops, "tokenizer": tokenizer} if stops else {}))
    synchronize(model.device)
    seconds = time.perf_counter() - t0
    pad = tokenizer.pad_token_id
    rows = [trim_at_eos([-1 if t == pad and pad not in eos else t for t in row], eos)  # padding after a finished row
            for row in out[:, batch["input_ids"].shape[1]:].tolist()]
    texts = [cut_at_stop(tokenizer.decode(r, skip_special_tokens=True), stops)[0] for r in rows]
    return {"seconds": seconds, "tokens": sum(len(r) for r in rows), "texts": texts}


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def setup(args, dtype: str):
    """The model, an untouched copy of it for the references, the engine and the space."""
    loaded = load_model(ModelConfig(name_or_path=args.model, dtype=dtype, device=args.device))
    base = copy.deepcopy(loaded.model)  # the engine wraps (and a full space writes) the model's own layers
    eos = eos_token_ids(loaded.model, loaded.tokenizer)
    engine = PopulationEngine(loaded.model, loaded.tokenizer, TARGETS, eos_token_ids=eos, merge_share=args.merge_share,
                              kv_cache_dtype=args.kv_cache_dtype)
    space = make_space(SpaceConfig(kind=args.space, rank=args.rank, target_modules=TARGETS), engine)
    return loaded, base, engine, space, eos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model folder (needed for everything but --history)")
    ap.add_argument("--data", help="the paper's countdown.json (its first --prompts records); default the built-in "
                                   "generator")
    ap.add_argument("--prompts", type=int, default=200, help="training prompts per member (the paper: 200)")
    ap.add_argument("--space", choices=["lora", "full-lowrank", "full"], default="lora")
    ap.add_argument("--chat", action="store_true", help="countdown through the chat template (the model reasons)")
    ap.add_argument("--reference-prompts", type=int,
                    help="time the reference on this many prompts and scale to all (default: all prompts)")
    ap.add_argument("--history", type=Path, help="print the tail row of a run's history.jsonl and exit")
    ap.add_argument("--rank", type=int, default=1, help="LoRA rank (lora) or each member's noise rank (full-lowrank)")
    ap.add_argument("--members", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable), e.g. '</answer>'")
    ap.add_argument("--sigma", type=float, help="default: the space kind's (evolm.config.STEP_DEFAULTS)")
    ap.add_argument("--reference-members", type=int, default=1)
    ap.add_argument("--generations", type=int, default=1,
                    help="ES generations in a row; the table shows the last (from the second on, the engine "
                         "admits the prompts it has seen longest first)")
    ap.add_argument("--merge-share", type=float, default=0.1,
                    help="the engine's merge_share: 0 decodes a lone member's batches without merging its weights")
    ap.add_argument("--kv-cache-dtype", choices=["model", "fp8"], default="model",
                    help="the engine's KV cache storage: the model's dtype (exact) or fp8 (engine/kv_quant.py)")
    ap.add_argument("--lowrank-kernel", action="store_true",
                    help="the perturbation's B product by engine/lowrank.py's kernel, not baddbmm_")
    ap.add_argument("--skip-plain", action="store_true", help="leave out the no-perturbation row")
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--scaling-members", default="8,30,64,128")
    ap.add_argument("--scaling-tokens", default="256,1024")
    ap.add_argument("--profile", action="store_true", help="profile decoding steps and exit")
    ap.add_argument("--agreement", action="store_true",
                    help="fp32 engine vs fp32 reference, and the bf16 reference against itself in other batches")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (a smoke check on a tiny model)")
    ap.add_argument("--peak-flops", type=float, help="roofline FLOP/s (overrides the device table)")
    ap.add_argument("--peak-bytes", type=float, help="roofline memory bytes/s (overrides the device table)")
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    lowrank.KERNEL = args.lowrank_kernel
    if args.history:
        return tail_row(args.history)
    if not args.model:
        ap.error("--model is required (except with --history)")
    if args.reference_members < 1:
        ap.error("--reference-members must be at least 1 (the extrapolated reference row needs one)")
    args.out.mkdir(parents=True, exist_ok=True)
    sigma, learning_rate = STEP_DEFAULTS[args.space]
    sigma = args.sigma or sigma

    task = CountdownTask(train_size=args.prompts, chat=args.chat)
    examples = task.load_split("train", None if args.data is None else f"{args.data}[:{args.prompts}]")
    if args.agreement:
        return agreement(args, task, examples[:64], sigma, learning_rate)
    loaded, base, engine, space, eos = setup(args, "auto")
    tokenizer, device = loaded.tokenizer, loaded.device
    prompt_ids = render_all(tokenizer, examples)
    print(f"device {device_name(device)}, {loaded.dtype}, backend {type(engine.backend).__name__}, space {space.kind} "
          f"rank {args.rank}, sigma {sigma}, {len(prompt_ids)} prompts, mean prompt "
          f"{sum(map(len, prompt_ids)) / len(prompt_ids):.0f} tokens, stop {args.stop or 'none'}, chat {args.chat}, "
          f"kv cache {args.kv_cache_dtype}, lowrank kernel {args.lowrank_kernel}",
          flush=True)

    def strategy(n):
        return new_strategy(space, n, sigma, learning_rate)

    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, stop_strings=args.stop)
    if args.profile:
        return profile(space, strategy(args.members), prompt_ids)
    peaks = roofline_peaks(device, args.peak_flops, args.peak_bytes)
    es_generation(space, strategy(2), task, examples[:8], prompt_ids[:8], SamplingParams(max_new_tokens=8))  # warm-up
    results: dict = {"device": device_name(device), "dtype": str(loaded.dtype), "space": space.kind, "rank": args.rank,
                     "sigma": sigma, "members": args.members, "prompts": len(prompt_ids), "chat": args.chat,
                     "max_new_tokens": args.max_new_tokens, "stop": args.stop, "kv_cache_dtype": args.kv_cache_dtype,
                     "lowrank_kernel": args.lowrank_kernel,
                     "roofline": peaks}
    es = strategy(args.members)
    runs = []
    for g in range(args.generations):  # later generations admit rows longest first (the engine saw these prompts)
        runs.append(es_generation(space, es, task, examples, prompt_ids, sampling))
        print(f"generation {g}: {runs[-1]['seconds']:.3g} s, {runs[-1]['steps']} steps, device seconds "
              f"{ {k: round(v, 2) for k, v in runs[-1]['engine_s'].items()} }", flush=True)
    first, main_run = runs[0], runs[-1]  # the reference regenerates generation 0; the table shows the last
    results["generations"] = [{k: v for k, v in r.items() if k not in ("output", "rows_tokens")} for r in runs]
    results["engine"] = dict(results["generations"][-1])
    results["engine"].update(workload(engine, prompt_ids * args.members, main_run["rows_tokens"], main_run["steps"],
                                      args.members, 0 if space.kind == "full" else args.rank))
    if not args.skip_plain:
        results["plain"] = plain_generation(engine, prompt_ids, args.members, sampling)
    print(json.dumps({k: results.get(k) for k in ("engine", "plain")}, indent=1), flush=True)

    reference_strategy = strategy(args.members)  # generation 0 again: the members the main run generated
    refs = []
    k = min(args.reference_prompts or len(prompt_ids), len(prompt_ids))
    for m in range(args.reference_members):
        model = reference_model(base, space, reference_strategy, m)
        ref = reference_generation(model, tokenizer, prompt_ids[:k], sampling, eos)
        del model
        release(device)
        same = sum(a == b for a, b in zip(ref["texts"], first["output"].texts[m][:k]))
        refs.append({"member": m, "seconds": ref["seconds"] * len(prompt_ids) / k, "measured_prompts": k,
                     "tokens": ref["tokens"], "identical_rows": same, "rows": k})
        print(f"reference member {m}: {ref['seconds']:.3g} s on {k} prompts, {ref['tokens']} tokens, "
              f"{same}/{k} completions identical to the engine's", flush=True)
    results["reference"] = refs
    results["reference_per_generation_s"] = sum(r["seconds"] for r in refs) / len(refs) * args.members

    if args.scaling:
        table = []
        for new_tokens in map(int, args.scaling_tokens.split(",")):
            for n in map(int, args.scaling_members.split(",")):
                run = es_generation(space, strategy(n), task, examples, prompt_ids,
                                    SamplingParams(max_new_tokens=new_tokens, stop_strings=args.stop))
                row = {k: v for k, v in run.items() if k not in ("output", "rows_tokens")}
                table.append(row)
                print(json.dumps(row), flush=True)
        results["scaling"] = table
    name = (f"bench-{space.kind}-r{args.rank}{'-chat' if args.chat else ''}{'-stop' if args.stop else ''}"
            f"-{args.max_new_tokens}{'-kv-fp8' if args.kv_cache_dtype == 'fp8' else ''}"
            f"{'-lowrank' if args.lowrank_kernel else ''}.json")
    (args.out / name).write_text(json.dumps(results, indent=1))
    report(results)


def first_divergence(a: str, b: str) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def agreement(args, task, examples, sigma: float, learning_rate: float) -> None:
    """Is a disagreement with the reference rounding (bf16 batching) or a bug? fp32 must agree."""
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, stop_strings=args.stop)
    for dtype in ("float32", "bfloat16"):
        loaded, base, engine, space, eos = setup(args, dtype)
        prompt_ids = render_all(loaded.tokenizer, examples)
        strategy = new_strategy(space, 2, sigma, learning_rate)
        ours = space.generate_population(strategy.ask(), [0], prompt_ids, sampling).texts[0]
        model = reference_model(base, space, strategy, 0)
        ref = reference_generation(model, loaded.tokenizer, prompt_ids, sampling, eos)["texts"]
        split = [t for i in range(0, len(prompt_ids), 16)
                 for t in reference_generation(model, loaded.tokenizer, prompt_ids[i:i + 16], sampling, eos)["texts"]]
        same = sum(a == b for a, b in zip(ours, ref))
        noise = sum(a == b for a, b in zip(split, ref))
        where = sorted(d for d in (first_divergence(a, b) for a, b in zip(ours, ref)) if d is not None)
        print(f"{dtype}: engine = reference on {same}/{len(ref)} completions; reference in batches of 16 = reference "
              f"in one batch on {noise}/{len(ref)}; first divergences at characters {where[:20]}", flush=True)
        del loaded, base, engine, space, strategy, model
        release(torch.device(args.device))


def profile(space: Space, strategy: EvolutionStrategy, prompt_ids) -> None:
    """A short generation of the whole population under the profiler: where a decoding step's time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = space.engine.device
    on_gpu = device.type == "cuda"
    sampling = SamplingParams(max_new_tokens=64)
    space.generate_population(strategy.ask(), range(strategy.population), prompt_ids, sampling)  # graphs captured
    synchronize(device)
    t0 = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with torch_profile(activities=activities) as prof:
        out = space.generate_population(strategy.ask(), range(strategy.population), prompt_ids, sampling)
        synchronize(device)
    print(f"{out.steps} steps, {out.rows_at_once} rows at once ({space.kind}): {time.perf_counter() - t0:.3f} s "
          "(under the profiler)")
    print(prof.key_averages().table(sort_by="cuda_time_total" if on_gpu else "cpu_time_total", row_limit=25,
                                    max_name_column_width=60))


def tail_row(history: Path) -> None:
    """Median and p95 seconds of `generate` per ES generation of a real run (the tail row)."""
    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    times = sorted(r["time"]["generate"] for r in rows if "time" in r)
    if not times:
        raise SystemExit(f"{history}: no generation times")
    median = times[len(times) // 2] if len(times) % 2 else (times[len(times) // 2 - 1] + times[len(times) // 2]) / 2
    p95 = times[min(len(times) - 1, math.ceil(0.95 * len(times)) - 1)]
    # the share of the decoded rows that wrote a token (runs from before history recorded row_steps: none)
    fills = sorted(r["tokens"] / r["row_steps"] for r in rows if r.get("row_steps"))
    fill = f" useful rows {fills[len(fills) // 2]:.0%} (median), {fills[0]:.0%} (worst) |" if fills else ""
    print(f"| tail row: {len(times)} generations of {history.parent.parent.name} | median {median:.3g} s | "
          f"p95 {p95:.3g} s ({p95 / median:.2f} x median) | max {times[-1]:.3g} s |{fill}")


def report(r: dict) -> None:
    e, p = r["engine"], r.get("plain")
    peak = "" if e["peak_gb"] is None else f"{e['peak_gb']:.1f}"
    reference = "PEFT LoRA + generate" if r["space"] == "lora" else "W + σ·E_i written in + generate"
    print(f"\n{r['device']}, {r['prompts']} prompts, max_new_tokens {r['max_new_tokens']}, stop {r['stop'] or 'none'}")
    print("\n| what | s / ES generation | generate s | tokens | tokens/s | peak GB | speed-up vs reference |")
    print("|---|---|---|---|---|---|---|")
    print(f"| evolm engine, {r['space']} rank {r['rank']}, N={r['members']} | {e['seconds']:.3g} "
          f"| {e['generate_s']:.3g} | {e['tokens']} | {e['tokens_per_s']:.0f} | {peak} | "
          f"{r['reference_per_generation_s'] / e['seconds']:.3g}x |")
    if p:
        print(f"| same rows, no perturbation | | {p['seconds']:.3g} | {p['tokens']} | {p['tokens_per_s']:.0f} | | |")
    print(f"| {reference} per member (x{r['members']}, extrapolated) | {r['reference_per_generation_s']:.3g} | | | | "
          "| 1x |")
    agree = ", ".join(f"{x['identical_rows']}/{x['rows']}" for x in r["reference"])
    print(f"\ngreedy agreement with the reference (identical completions, members 0..): {agree}")
    if r["roofline"]:
        t_compute, t_memory = e["flops"] / r["roofline"]["flops_per_s"], e["bytes"] / r["roofline"]["bytes_per_s"]
        bound = max(t_compute, t_memory)
        print(f"roofline ({r['roofline']['source']}, {r['roofline']['device']}): {e['flops'] / 1e15:.3g} PFLOP, "
              f"{e['bytes'] / 1e12:.3g} TB -> bound {bound:.3g} s ({'compute' if t_compute > t_memory else 'memory'}); "
              f"generate reached {bound / e['generate_s']:.0%}; matmuls and attention one after the other "
              f"(separate kernels): {t_compute + t_memory:.3g} s")
    device_s = e.get("engine_s") or {}
    if device_s:
        host = e["generate_s"] - sum(v for k, v in device_s.items() if k in ("prefill", "decode"))
        print("device seconds: " + ", ".join(f"{k} {v:.3g}" for k, v in device_s.items())
              + f"; the host's share of generate (the device idle) {host:.3g} s; host blocks: "
              + ", ".join(f"{k} {v:.3g}" for k, v in (e.get("host_s") or {}).items()))
    if len(r.get("generations", [])) > 1:
        print("generations: " + ", ".join(f"{g['seconds']:.3g} s ({g['steps']} steps)" for g in r["generations"]))
    if p:
        print(f"perturbed rows reach {e['tokens_per_s'] / p['tokens_per_s']:.0%} of the unperturbed tokens/s")
    if e["noise_s"]:
        print(f"noise (drawing and writing θ + σε) {e['noise_s']:.3g} s of generate")
    if "scaling" in r:
        print("\n| members | max_new_tokens | s / ES generation | generate s | tokens | tokens/s | rows at once | peak GB |")
        print("|---|---|---|---|---|---|---|---|")
        for s in r["scaling"]:
            peak = "" if s["peak_gb"] is None else f"{s['peak_gb']:.1f}"
            print(f"| {s['members']} | {s['max_new_tokens']} | {s['seconds']:.3g} | {s['generate_s']:.3g} "
                  f"| {s['tokens']} | {s['tokens_per_s']:.0f} | {s['rows_at_once']} | {peak} |")


if __name__ == "__main__":
    main()
