"""The sampling kernel on a GPU: the same tokens as the PyTorch ops, capturable in a CUDA graph, and its time.

    python bench/sampling_gpu.py [--rows 128] [--vocab 151936] [--top-p 1.0]

Prints whether the kernel's tokens equal the ops' (float64 scores, the same counter-based noise), whether a
captured graph replays the same draw, and the milliseconds of one draw by the kernel and by the ops.
"""

from __future__ import annotations

import argparse

import torch

from evolm.engine.sampling import SamplingParams, gumbel_argmax, nucleus, pick_token, row_keys


def milliseconds(fn, repeat: int = 20) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--top-p", type=float, default=1.0)
    args = ap.parse_args()
    params = SamplingParams(temperature=0.7, top_p=args.top_p, seed=3)
    logits = torch.randn(args.rows, args.vocab, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    logits = (logits * 4).to(torch.bfloat16)
    keys = row_keys(params.seed, range(args.rows)).cuda()
    positions = torch.arange(args.rows, device="cuda") * 1000

    def ops():
        return gumbel_argmax(nucleus(logits, params) if params.top_p < 1 else logits, params.temperature, keys,
                             positions)

    kernel = pick_token(logits, params, keys, positions)
    print(f"kernel == ops: {torch.equal(kernel, ops())}")
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        pick_token(logits, params, keys, positions)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        captured = pick_token(logits, params, keys, positions)
    graph.replay()
    torch.cuda.synchronize()
    print(f"graph replay == kernel: {torch.equal(captured, kernel)}")
    kernel_ms = milliseconds(lambda: pick_token(logits, params, keys, positions))
    print(f"ms a draw of {args.rows} x {args.vocab}: kernel {kernel_ms:.3f}, ops {milliseconds(ops, repeat=3):.3f}")


if __name__ == "__main__":
    main()
