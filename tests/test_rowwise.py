"""The row-wise kernels against the model's own modules, and the fused backend with every kernel against the
transformers backend, run by Triton's interpreter on the CPU (on a GPU the same kernels run compiled)."""

from __future__ import annotations

import json

from helpers.interpreter import run_interpreted

KERNELS = r"""
import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb
from evolm.engine import kv_quant, rowwise
assert rowwise.use_kernel(torch.zeros(1))
torch.manual_seed(0)

def close(ours, ref, dtype):
    if dtype == torch.float32:
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (ours - ref).abs().max()
    else:  # the interpreter stores bf16 by truncating (a GPU rounds to nearest): a few last bits apart
        assert torch.allclose(ours.float(), ref.float(), rtol=2 ** -5, atol=2 ** -6), (ours - ref).abs().max()

for dtype in (torch.float32, torch.bfloat16):
    norm = Qwen2RMSNorm(48, eps=1e-6).to(dtype)
    norm.weight.data.normal_()
    x = torch.randn(5, 3, 48).to(dtype)
    delta = torch.randn(5, 3, 48).to(dtype)
    summed, normed = rowwise.add_rms_norm(x, delta, norm)
    close(summed, x + delta, dtype)
    close(normed, norm(x + delta), dtype)
    same, normed = rowwise.add_rms_norm(x, None, norm)
    assert torch.equal(same, x)
    close(normed, norm(x), dtype)

    gate_up = torch.randn(4, 1, 2 * 1100).to(dtype)  # more than one column block
    gate, up = gate_up.split(1100, dim=-1)
    close(rowwise.silu_mul(gate_up), F.silu(gate) * up, dtype)

    heads, kv_heads, dim, slots, capacity = 4, 2, 16, 6, 9
    rows = torch.tensor([4, 0, 2])
    position = torch.tensor([0, 8, 3])
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim).to(dtype)
    angle = position[:, None].float() * torch.arange(1, dim + 1)[None] / dim
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    k_cache, v_cache = torch.randn(slots, kv_heads, capacity, dim).to(dtype), torch.randn(slots, kv_heads, capacity, dim).to(dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q = rowwise.rotary_to_cache(qkv, cos, sin, k_cache, v_cache, rows, position, heads)
    q_ref, k_ref, v_ref = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q_ref, k_ref = apply_rotary_pos_emb(q_ref.view(3, heads, 1, dim), k_ref.view(3, kv_heads, 1, dim),
                                        cos[:, None], sin[:, None])
    close(q, q_ref[:, :, 0], dtype)
    written = torch.zeros(slots, capacity, dtype=torch.bool)
    written[rows, position] = True
    close(k_cache[rows, :, position], k_ref[:, :, 0], dtype)
    assert torch.equal(v_cache[rows, :, position], v_ref.view(3, kv_heads, dim))
    untouched = ~written[:, None, :, None].expand_as(k_cache)
    assert torch.equal(k_cache[untouched], k_before[untouched]) and torch.equal(v_cache[untouched], v_before[untouched])
    # an fp8 cache gets what kv_quant.quantise makes of the same keys and values, bit for bit
    k_scale, v_scale = torch.tensor([0.01, 0.002]), torch.tensor([0.004, 0.02])  # the second saturates some
    k8, v8 = (torch.zeros(slots, kv_heads, capacity, dim, dtype=kv_quant.FP8) for _ in range(2))
    rowwise.rotary_to_cache(qkv, cos, sin, k8, v8, rows, position, heads, k_scale, v_scale)
    for cache, exact, scale in ((k8, k_cache, k_scale), (v8, v_cache, v_scale)):
        written_bits = cache[rows, :, position].view(torch.uint8)
        assert torch.equal(written_bits, kv_quant.quantise(exact[rows, :, position], scale).view(torch.uint8))
    assert not k8[untouched].float().any() and (k8.float().abs() == kv_quant.FP8_MAX).any()
print("ok")
"""

ENGINE = r"""
import copy, sys
import torch
from transformers import AutoModelForCausalLM
from evolm.engine import PopulationEngine, SamplingParams, lowrank
from evolm.engine.layer import LowRankWeights
from evolm.models import load_tokenizer
path = sys.argv[1]
tokenizer = load_tokenizer(path)
base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
texts = ["Count: 1 2 3", "The answer is", "abc" * 9, "x"]
for opening in ("", "Instructions shared by every prompt: "):  # the second prefills its prefix once a member
    prompts = [tokenizer(opening + p).input_ids for p in texts]
    out = {}
    # fused: 3 groups of 3 slots, so a 4th prompt refills one; with the perturbation's B product by baddbmm_
    # and by the low-rank add kernel
    for backend, kernel in [("transformers", False), ("fused", False), ("fused, lowrank kernel", True)]:
        lowrank.KERNEL = kernel
        engine = PopulationEngine(copy.deepcopy(base), tokenizer, targets, eos_token_ids=[tokenizer.eos_token_id],
                                  backend=backend.split(",")[0], max_batch_rows=9)
        g = torch.Generator().manual_seed(3)
        engine.set_factors({n: LowRankWeights(torch.randn(3, 2, i, generator=g), torch.randn(3, o, 2, generator=g))
                            for n, (i, o) in engine.shapes().items()}, 0.05)
        out[backend] = engine.generate(prompts, [2, 0, 1], SamplingParams(max_new_tokens=12)).tokens
    assert out["fused"] == out["transformers"] == out["fused, lowrank kernel"], (opening, out)
    assert len({str(member) for member in out["fused"]}) == 3  # each member's perturbation shows in its text
print("ok")
"""


def test_kernels_compute_what_the_modules_compute():
    run_interpreted(KERNELS)


def test_fused_backend_with_every_kernel_matches_the_transformers_backend(tiny_qwen):
    """Norm, SiLU, rotary-to-cache, attention and low-rank add kernels wired into prefill and decoding, refill and
    a shared prompt prefix included, for perturbed members with every projection targeted."""
    run_interpreted(ENGINE, str(tiny_qwen))


FP8_ENGINE = r"""
import copy, json, sys
import torch
from transformers import AutoModelForCausalLM
from evolm.engine import PopulationEngine, SamplingParams
from evolm.engine.layer import LowRankWeights
from evolm.models import load_tokenizer

def fp8_tokens(path):
    tokenizer = load_tokenizer(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [tokenizer("Instructions shared by every prompt: " + p).input_ids for p in ["Count: 1 2 3", "x", "ab"]]
    engine = PopulationEngine(base, tokenizer, ["k_proj", "v_proj"], eos_token_ids=[tokenizer.eos_token_id],
                              backend="fused", max_batch_rows=4, kv_cache_dtype="fp8")
    g = torch.Generator().manual_seed(3)
    engine.set_factors({n: LowRankWeights(torch.randn(2, 2, i, generator=g), torch.randn(2, o, 2, generator=g))
                        for n, (i, o) in engine.shapes().items()}, 0.05)
    return engine.generate(prompts, [1, 0], SamplingParams(max_new_tokens=10)).tokens

if __name__ == "__main__":
    assert fp8_tokens(sys.argv[1]) == json.loads(sys.argv[2])
    print("ok")
"""


def test_fused_backend_with_every_kernel_over_an_fp8_cache_matches_its_pytorch_path(tiny_qwen):
    """The rotary kernel's quantised writes (later prefills, every decoding step) and the attention kernel's
    scaled reads give the tokens the PyTorch path gives over the same fp8 cache (its first prefill sets the
    scales in PyTorch on both paths); two groups of two slots, so the third prompt refills one."""
    namespace: dict = {}
    exec(FP8_ENGINE, namespace)
    expected = namespace["fp8_tokens"](str(tiny_qwen))  # this process: no interpreter, the PyTorch path
    run_interpreted(FP8_ENGINE, str(tiny_qwen), json.dumps(expected))
