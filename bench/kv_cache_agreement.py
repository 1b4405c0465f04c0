"""How far an fp8 KV cache (decoding.kv_cache_dtype=fp8) moves greedy completions from the exact cache's, on
a real model: the unperturbed model writes the same countdown prompts with both caches, and the script reports
identical completions, where each pair first parts (in tokens), and the task's reward of each side. Runs on a
GPU or, slowly, on a CPU (the fused engine's PyTorch path in float32), e.g.

    python bench/kv_cache_agreement.py --model MODEL_DIR --data countdown.json --chat --prompts 6 \
        --max-new-tokens 160 --device cpu --dtype float32

It is a measurement, not a test: the exact cache is what the tests hold to the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from engine_gpu import first_divergence  # a sibling script: bench/ is sys.path[0] when run

from evolm.config import ModelConfig
from evolm.engine import PopulationEngine, SamplingParams
from evolm.models import eos_token_ids, load_model
from evolm.scoring import render_all, score_all, summarize
from evolm.tasks.countdown import CountdownTask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", help="the paper's countdown.json (its first --prompts records)")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, help="write the report (JSON) here")
    args = ap.parse_args()

    task = CountdownTask(train_size=args.prompts, chat=args.chat)
    examples = task.load_split("train", None if args.data is None else f"{args.data}[:{args.prompts}]")
    loaded = load_model(ModelConfig(name_or_path=args.model, dtype=args.dtype, device=args.device))
    prompts = render_all(loaded.tokenizer, examples)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, stop_strings=tuple(task.stop_strings))
    out = {}
    for cache in ("model", "fp8"):
        engine = PopulationEngine(loaded.model, loaded.tokenizer, (), eos_token_ids=eos_token_ids(
            loaded.model, loaded.tokenizer), backend="fused", kv_cache_dtype=cache)
        out[cache] = engine.generate(prompts, None, params)
        scales = getattr(engine.backend, "k_scale", None)
        if scales is not None:
            print(f"fp8 scales: keys {scales.min():.3g}-{scales.max():.3g}, values "
                  f"{engine.backend.v_scale.min():.3g}-{engine.backend.v_scale.max():.3g}", flush=True)
        del engine
    exact, fp8 = out["model"].tokens[0], out["fp8"].tokens[0]
    parts = [first_divergence(a, b) for a, b in zip(exact, fp8)]  # token positions here
    report = {
        "model": args.model, "device": args.device, "dtype": str(loaded.dtype), "prompts": len(prompts),
        "chat": args.chat, "max_new_tokens": args.max_new_tokens,
        "identical": sum(p is None for p in parts),
        "median_parted_at": statistics.median([p for p in parts if p is not None] or [0]),
        "parted_at": parts,
        "mean_tokens": {c: out[c].num_tokens / len(prompts) for c in out},
        "reward": {c: summarize(score_all(task, examples, out[c].texts[0]))["reward"] for c in out},
    }
    print(json.dumps({k: v for k, v in report.items() if k != "parted_at"}, indent=1))
    print("parted at (tokens; None = identical):", parts)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
