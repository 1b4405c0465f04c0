"""Where one decoding step of the fused backend spends its time, on one GPU, against the card's ceilings.

    PYTHONPATH=src python bench/decode_step_gpu.py --model /tmp/models/qwen2.5-coder-1.5b-instruct \
        [--members 30] [--rank 8] [--shapes 107x700,200x300,8x700] [--profile 107x700] --out DIR

For each shape `C x L` (C rows per member group, N groups, every row with L keys in its KV slot) it times,
with CUDA events over replays of the captured step:
  the whole step with the members' rank-r factors, and the same N·C rows with none;
  the decode attention of all layers alone (with variants of the Triton kernel's block, warps and stages);
  the matmuls alone (the base weights of every layer and the head);
  the members' x·A products alone (the first bmm of every matmul group's perturbation);
and prints µs per row-step against the ceilings measured in the same call (a device copy, a bf16 matmul).
The step is timed twice, with the perturbation's B product by torch.baddbmm_ (the engine's default) and by
engine/lowrank.py's kernel. The perturbation's cost is the step minus the step with none (what its two
products cost inside the step, launches and all); the unperturbed step minus its parts is the rest: norms,
rotary, SiLU, cache writes, argmax. `--profile` lists the kernels of a few eager steps of one shape by device
time; `--prefill` times and profiles one prefill chunk. The KV cache holds random keys, not zeros.

`--overlap` shapes measure two levers before they are built: the attention of half the rows issued on one
stream while the other half's matmuls run on another (memory-bound beside compute-bound work: if the pair
costs less than its parts in sequence, a step split in two interleaved halves may too); and the attention
with every row of a group reading its group's first slot (the most a group's rows can gain from reading the
same keys, from the L2 cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from evolm.config import ModelConfig, SpaceConfig
from evolm.engine import PopulationEngine, SamplingParams, attention, lowrank
from evolm.engine.layer import LowRankWeights
from evolm.models import eos_token_ids, load_model

TARGETS = SpaceConfig().target_modules
KERNEL_VARIANTS = [(64, 4, 3), (64, 4, 2), (64, 8, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3), (32, 4, 3),
                   (64, 4, 4)]  # (block, warps, stages); the first is the engine's default


def timed(fn, repeat: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() over `repeat` calls, each between CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


@contextmanager
def lowrank_kernel():
    """The perturbation's B product by engine/lowrank.py's kernel inside the block (baddbmm_ outside it)."""
    lowrank.KERNEL = True
    try:
        yield
    finally:
        lowrank.KERNEL = False


def base_matmuls(layers, xs: dict) -> None:
    """Every layer's matmul groups on their inputs `xs`, base weights only."""
    for groups in layers:
        for key, group in groups.items():
            F.linear(xs[key], group.weight, group.bias)


def ceilings() -> dict:
    """What this card reaches: a 4 GiB device copy (bytes read + written) and an 8192³ bf16 matmul."""
    source = torch.empty(2**31, dtype=torch.bfloat16, device="cuda").normal_()
    target = torch.empty_like(source)
    copy_s = timed(lambda: target.copy_(source), repeat=10)
    source = target = None
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_s = timed(lambda: x @ y, repeat=10)
    return {"bytes_per_s": 2 * 2**32 / copy_s, "flops_per_s": 2 * 8192**3 / mm_s}


def random_factors(engine: PopulationEngine, members: int, rank: int) -> dict[str, LowRankWeights]:
    g = torch.Generator(device="cuda").manual_seed(0)
    return {name: LowRankWeights(torch.randn(members, rank, i, device="cuda", generator=g),
                                 torch.randn(members, o, rank, device="cuda", generator=g))
            for name, (i, o) in engine.shapes().items()}


def open_shape(engine: PopulationEngine, members: list[int] | None, per_group: int, context: int,
               merge: bool = False):
    """The backend's slots for this shape, every slot holding `context` random keys; the step's graph captured.
    `merge`: a batch of one member group decodes through its merged weights."""
    backend = engine.backend
    params = SamplingParams(max_new_tokens=64)
    backend.open(engine.routing, members, per_group, context + 96, params, engine.eos_token_ids, merge)
    for k, v in zip(backend.k_cache, backend.v_cache):
        k.normal_(), v.normal_()
    backend.length.fill_(context), backend.done.fill_(False)
    groups = max(len(members or []), 1)
    backend.set_batch([range(g * per_group, (g + 1) * per_group) for g in range(groups)], per_group)
    return backend


def step_seconds(backend, context: int) -> float:
    graph = backend._graph(backend.batch_groups, backend.batch_rows)[0]

    def replay():
        backend.length.fill_(context)  # keys stay at L: every replay reads the same amount
        graph.replay()
    return timed(replay)


def parts(engine: PopulationEngine, backend, rows: int, context: int, variants: bool) -> dict:
    """The step's parts alone, each over all layers: attention (and its kernel variants), matmuls, x·A."""
    cfg = engine.model.config
    heads, dim = cfg.num_attention_heads, backend.head_dim
    slots = backend.batch_slots
    lengths = torch.full_like(slots, context)
    q = torch.randn(rows, heads, dim, dtype=engine.dtype, device="cuda")
    out = {}
    for block, warps, stages in KERNEL_VARIANTS if variants else KERNEL_VARIANTS[:1]:
        def attend(block=block, warps=warps, stages=stages):
            for k, v in zip(backend.k_cache, backend.v_cache):
                attention._kernel_attention(q, k, v, slots, lengths, backend.scaling, block=block, warps=warps,
                                             stages=stages)
        try:
            out[f"attention b{block} w{warps} s{stages}"] = timed(attend)
        except Exception as error:  # a variant that does not compile (shared memory) is reported, not fatal
            out[f"attention b{block} w{warps} s{stages}"] = f"failed: {type(error).__name__}"
    layers = backend.groups
    xs = {key: torch.randn(rows, 1, group.weight.shape[1], dtype=engine.dtype, device="cuda")
          for key, group in layers[0].items()}
    hidden = torch.randn(rows, cfg.hidden_size, dtype=engine.dtype, device="cuda")

    def matmuls():
        base_matmuls(layers, xs)
        engine.model.lm_head(hidden)
    out["matmuls"] = timed(matmuls)
    if layers[0]["qkv"].down is not None:
        n = backend.num_groups

        def times_a():
            for groups in layers:
                for key, group in groups.items():
                    torch.bmm(xs[key].view(n, -1, xs[key].shape[-1]), group.batch[0])
        out["low-rank x·A"] = timed(times_a)
        out.update(perturbed_matmuls(layers, xs, n))
    return out


def perturbed_matmuls(layers, xs: dict, groups: int) -> dict:
    """Every layer's perturbed matmuls (x·A included) three ways: the base product, then y += t·B by
    baddbmm_ (the engine's default) or by the lowrank kernel; or t·B (+ bias) written first and the base product
    added to it by cuBLAS's epilogue (addmm_: beta = 1 reads y while the product computes)."""
    def run(way):
        for layer in layers:
            for key, group in layer.items():
                x = xs[key]
                down, up = group.batch
                t = torch.bmm(x.view(groups, -1, x.shape[-1]), down)
                if way == "addmm_":
                    y = torch.bmm(t, up) if group.bias is None else torch.baddbmm(group.bias, t, up)
                    y.view(-1, y.shape[-1]).addmm_(x.view(-1, x.shape[-1]), group.weight.T)
                    continue
                y = F.linear(x, group.weight, group.bias).view(groups, -1, up.shape[-1])
                lowrank.add_lowrank_(y, t, up)  # baddbmm_, or the kernel inside lowrank_kernel()
    out = {f"perturbed matmuls, {way}": timed(lambda way=way: run(way)) for way in ("baddbmm_", "addmm_")}
    with lowrank_kernel():
        out["perturbed matmuls, kernel"] = timed(lambda: run("kernel"))
    return out


def overlap(engine: PopulationEngine, backend, rows: int, context: int) -> dict:
    """Half the rows' attention (all layers) beside the other half's matmuls on two streams, against each alone;
    and the attention with a group's rows all on one slot (see the module docstring)."""
    cfg = engine.model.config
    half = rows // 2
    slots = backend.batch_slots
    lengths = torch.full_like(slots, context)
    q = torch.randn(rows, cfg.num_attention_heads, backend.head_dim, dtype=engine.dtype, device="cuda")
    xs = {key: torch.randn(half, 1, group.weight.shape[1], dtype=engine.dtype, device="cuda")
          for key, group in backend.groups[0].items()}

    def attend(index=slots[:half]):
        for k, v in zip(backend.k_cache, backend.v_cache):
            attention._kernel_attention(q[: index.shape[0]], k, v, index, lengths[: index.shape[0]], backend.scaling)

    def matmuls():
        base_matmuls(backend.groups, xs)
    streams = torch.cuda.Stream(), torch.cuda.Stream()

    def both():
        current = torch.cuda.current_stream()
        for stream, work in zip(streams, (attend, matmuls)):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                work()
        for stream in streams:
            current.wait_stream(stream)
    shared = (slots // backend.per_group) * backend.per_group  # every row of a group on the group's first slot
    return {"half attention": timed(attend), "half matmuls": timed(matmuls), "both on two streams": timed(both),
            "attention": timed(lambda: attend(slots)), "attention, group rows on one slot":
            timed(lambda: attend(shared))}


def profile(work, times: int = 3) -> str:
    """The kernels of `work()` run `times` times, by device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(times):
            work()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70)


def eager_step(backend) -> None:
    backend._step(backend.batch_slots)


def prefill_chunk(engine: PopulationEngine, members: list[int], rows_per_group: int, length: int, peak: dict) -> dict:
    """One prefill chunk as a call's first admission makes it (the same prompts for every group): its seconds
    against the matmul floor of its tokens, and its kernels by device time."""
    backend = engine.backend
    backend.open(engine.routing, members, rows_per_group, length + 8, SamplingParams(max_new_tokens=8),
                 engine.eos_token_ids)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (length,), generator=g).tolist() for _ in range(rows_per_group)]
    slots = [grp * rows_per_group + i for grp in range(len(members)) for i in range(rows_per_group)]

    def chunk():
        backend._prefill(slots, [p for _ in members for p in prompts])
    tokens = len(slots) * length
    linear = sum(i * o for i, o in engine.shapes().values())
    result = {"rows": len(slots), "length": length, "tokens": tokens, "seconds": timed(chunk, repeat=5),
              "matmul floor": 2 * tokens * linear / peak["flops_per_s"], "profile": profile(chunk, times=2)}
    with lowrank_kernel():
        result["seconds, lowrank kernel"] = timed(chunk, repeat=5)
    backend.release()
    return result


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--members", type=int, default=30)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--shapes", default="107x700,107x200,200x300,32x700,8x700",
                    help="CxL,...: C rows per member group, L keys per row")
    ap.add_argument("--variants", default="107x700,200x300", help="shapes at which the kernel variants are timed")
    ap.add_argument("--profile", default="107x700", help="the shape whose kernels are listed ('' for none)")
    ap.add_argument("--prefill", default="8x136", help="RxT: a first-admission prefill chunk of R rows a group, "
                                                       "T tokens each, timed and profiled ('' for none)")
    ap.add_argument("--lone", default="1x700,8x700,32x700",
                    help="CxL shapes of a batch of one member group (a tail): its step through the factors, through "
                         "the merged weights and unperturbed ('' for none)")
    ap.add_argument("--overlap", default="107x700,200x300",
                    help="shapes at which the two-stream overlap and a group's shared slot are timed ('' for none)")
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(ModelConfig(name_or_path=args.model, dtype="auto", device="cuda"))
    engine = PopulationEngine(loaded.model, loaded.tokenizer, TARGETS,
                              eos_token_ids=eos_token_ids(loaded.model, loaded.tokenizer))
    engine.set_factors(random_factors(engine, args.members, args.rank), 0.01)
    cfg = engine.model.config
    peak = ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {peak['bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 matmul {peak['flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    linear = sum(i * o for i, o in engine.shapes().values())
    head = cfg.hidden_size * cfg.vocab_size
    kv_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * engine.backend.head_dim * 2
    results = {"device": torch.cuda.get_device_name(), "ceilings": peak, "members": args.members,
               "rank": args.rank, "shapes": []}
    members = list(range(args.members))
    for shape in filter(None, args.shapes.split(",")):
        per_group, context = map(int, shape.split("x"))
        rows = per_group * args.members
        backend = open_shape(engine, members, per_group, context)
        row = {"shape": shape, "rows": rows, "context": context, "step": step_seconds(backend, context)}
        row.update(parts(engine, backend, rows, context, shape in args.variants.split(",")))
        if shape in args.overlap.split(","):
            row["overlap"] = overlap(engine, backend, rows, context)
        if shape == args.profile:
            row["profile"] = profile(lambda backend=backend: eager_step(backend))
        backend.release()
        with lowrank_kernel():  # the same step, its graph captured with the kernel
            backend = open_shape(engine, members, per_group, context)
            row["step, lowrank kernel"] = step_seconds(backend, context)
            backend.release()
        plain = open_shape(engine, None, rows, context)
        row["step, no perturbation"] = step_seconds(plain, context)
        plain.release()
        torch.cuda.empty_cache()
        # floors: the matmuls' FLOPs at the measured matmul rate; the KV cache and weights at the copy rate
        row["matmul floor"] = 2 * rows * (linear + head) / peak["flops_per_s"]
        row["attention floor"] = rows * context * kv_token / peak["bytes_per_s"]
        results["shapes"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        if "profile" in row:
            print(row["profile"], flush=True)
    results["lone"] = []
    for shape in filter(None, args.lone.split(",")):  # a generation's tail: one member group left
        per_group, context = map(int, shape.split("x"))
        row = {"shape": shape, "rows": per_group, "context": context}
        for name, some, merge in [("factors", [0], False), ("merged", [0], True), ("no perturbation", None, False)]:
            backend = open_shape(engine, some, per_group, context, merge)
            row[name] = step_seconds(backend, context)
            backend.release()
        torch.cuda.empty_cache()
        results["lone"].append(row)
        print(json.dumps(row), flush=True)
    if args.prefill:
        rows_per_group, length = map(int, args.prefill.split("x"))
        chunk = prefill_chunk(engine, members, rows_per_group, length, peak)
        results["prefill"] = chunk
        print(f"prefill chunk {chunk['rows']} rows x {length} tokens: {chunk['seconds'] * 1e3:.1f} ms "
              f"({chunk['seconds, lowrank kernel'] * 1e3:.1f} ms with the lowrank kernel), matmul floor "
              f"{chunk['matmul floor'] * 1e3:.1f} ms ({chunk['matmul floor'] / chunk['seconds']:.0%})\n"
              + chunk["profile"], flush=True)
    (args.out / "decode-step.json").write_text(json.dumps(results, indent=1))
    print(f"\n| shape (C x L, N={args.members}) | rows | step ms | step with the lowrank kernel ms | µs/row | "
          "no perturbation ms | attention ms (floor) | matmuls ms (floor) | low-rank ms (x·A) | rest ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["shapes"]:
        attn = r["attention b64 w4 s3"]
        plain = r["step, no perturbation"]
        rest = plain - attn - r["matmuls"]
        print(f"| {r['shape']} | {r['rows']} | {r['step'] * 1e3:.2f} | {r['step, lowrank kernel'] * 1e3:.2f} | "
              f"{r['step'] / r['rows'] * 1e6:.2f} | "
              f"{plain * 1e3:.2f} | {attn * 1e3:.2f} ({r['attention floor'] * 1e3:.2f}) | "
              f"{r['matmuls'] * 1e3:.2f} ({r['matmul floor'] * 1e3:.2f}) | "
              f"{(r['step'] - plain) * 1e3:.2f} ({r['low-rank x·A'] * 1e3:.2f}) | {rest * 1e3:.2f} |")
    print("\nperturbed matmuls of all layers (ms): y += t·B by baddbmm_, by the lowrank kernel; t·B first, then addmm_")
    for r in results["shapes"]:
        if "perturbed matmuls, baddbmm_" in r:
            print(r["shape"], ", ".join(f"{way}: {r[f'perturbed matmuls, {way}'] * 1e3:.2f}"
                                        for way in ("baddbmm_", "kernel", "addmm_")))
    print("\nkernel variants (ms, all layers):")
    for r in results["shapes"]:
        variants = {k: v for k, v in r.items() if k.startswith("attention b")}
        if len(variants) > 1:
            print(r["shape"], ", ".join(f"{k[10:]}: {v * 1e3:.2f}" if isinstance(v, float) else f"{k[10:]}: {v}"
                                        for k, v in variants.items()))

    overlaps = [r for r in results["shapes"] if "overlap" in r]
    if overlaps:
        print("\n| shape | half attention ms | half matmuls ms | both on two streams ms | saved | attention ms | "
              "a group's rows on one slot ms |")
        print("|---|---|---|---|---|---|---|")
        for r in overlaps:
            o = r["overlap"]
            pair = o["half attention"] + o["half matmuls"]
            print(f"| {r['shape']} | {o['half attention'] * 1e3:.2f} | {o['half matmuls'] * 1e3:.2f} | "
                  f"{o['both on two streams'] * 1e3:.2f} | {1 - o['both on two streams'] / pair:.0%} | "
                  f"{o['attention'] * 1e3:.2f} | {o['attention, group rows on one slot'] * 1e3:.2f} |")

    if results["lone"]:
        print("\n| one member group, C x L | step ms through the factors | merged | no perturbation |")
        print("|---|---|---|---|")
        for r in results["lone"]:
            print(f"| {r['shape']} | {r['factors'] * 1e3:.2f} | {r['merged'] * 1e3:.2f} | "
                  f"{r['no perturbation'] * 1e3:.2f} |")


if __name__ == "__main__":
    main()
