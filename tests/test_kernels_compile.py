"""Every Triton kernel compiles for the H200 (sm_90) with the argument types the engine passes it.

Triton's interpreter (tests/test_rowwise.py, test_attention.py) runs a kernel's Python on the CPU and checks
what it computes, but not what only the compiler checks: a variable that one branch makes bf16 and another
fp8 runs interpreted and fails to compile (it did: the fp8 KV cache's first GPU run). Compiling needs no GPU.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from evolm.engine import attention, lowrank, rowwise, sampling  # noqa: E402
from evolm.es import noise  # noqa: E402

H200 = GPUTarget("cuda", 90, 32)
CACHES = pytest.mark.parametrize("cache", ["bf16", "fp8e4nv"])


def compiles(kernel, types: dict[str, str], constexprs: dict) -> None:
    """Compile `kernel` for the H200: `types` of its pointer and scalar arguments (the rest i32), `constexprs`
    the values of its compile-time arguments (None arguments among them)."""
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
    assert "cubin" in triton.compile(ASTSource(kernel, signature, constexprs), target=H200).asm


@CACHES
def test_the_decode_attention_compiles(cache):
    quantised = cache != "bf16"
    types = {"Q": "*bf16", "K": f"*{cache}", "V": f"*{cache}", "Slots": "*i64", "Lengths": "*i64", "Out": "*fp32",
             "Lse": "*fp32", "scale": "fp32"} | ({"KScale": "*fp32", "VScale": "*fp32"} if quantised else {})
    constexprs = {"GROUP": 6, "GROUP_PAD": 16, "DIM": 128, "BLOCK": attention.BLOCK_KEYS, "QUANTISED": quantised}
    compiles(attention._decode_kernel, types, constexprs | ({} if quantised else {"KScale": None, "VScale": None}))


@CACHES
def test_the_rotary_kernel_compiles(cache):
    quantised = cache != "bf16"
    types = {name: "*bf16" for name in ("QKV", "Cos", "Sin", "Q")} | {
        "KCache": f"*{cache}", "VCache": f"*{cache}", "Slots": "*i64", "Position": "*i64"}
    constexprs = {"HEADS": 12, "KV_HEADS": 2, "HALF": 64, "QUANTISED": quantised, "FP8_MAX": 448.0}
    if quantised:
        types |= {"KScale": "*fp32", "VScale": "*fp32"}
    else:
        constexprs |= {"KScale": None, "VScale": None}
    compiles(rowwise._rotary_to_cache_kernel, types, constexprs)


@pytest.mark.parametrize("delta", [True, False])
def test_the_row_kernels_compile(delta):
    norm = {name: "*bf16" for name in ("X", "Delta", "Weight", "Summed", "Normed")} | {"eps": "fp32"}
    compiles(rowwise._add_rms_norm_kernel, norm, {"HAS_DELTA": delta, "BLOCK": 2048})
    compiles(rowwise._silu_mul_kernel, {"GateUp": "*bf16", "Out": "*bf16"}, {"BLOCK": 1024})


def test_the_sampling_and_noise_kernels_compile():
    compiles(sampling._gumbel_argmax, {"Logits": "*bf16", "Temperature": "*fp64", "Keys": "*i64",
                                       "Positions": "*i64", "Out": "*i64"}, {"BLOCK": sampling.BLOCK})
    # keys are 32-bit values (Triton types those past 2**31 u32), offsets reach past 2**31 in a 1.5B model
    compiles(noise._gaussian_kernel, {"Out": "*fp32", "start": "i64", "count": "i64", "k1": "u32", "k2": "i32"},
             {"BLOCK": noise.BLOCK})


@pytest.mark.parametrize("dtype,widen", [("bf16", False), ("fp32", True)])
def test_the_lowrank_add_kernel_compiles(dtype, widen):
    compiles(lowrank._add_lowrank_kernel, {"Y": f"*{dtype}", "T": f"*{dtype}", "B": f"*{dtype}"},
             {"BLOCK_M": lowrank.BLOCK_ROWS, "BLOCK_N": lowrank.BLOCK_COLUMNS, "RANK_PAD": 16, "WIDEN": widen})
