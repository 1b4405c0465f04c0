"""Tiny real models and tokenizers built from configs: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "es-paper"
TESTS = Path(__file__).parent
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
# architecture -> model class and the config fields that give it what the fused backend must handle
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    # q/k norm, and a head_dim that is not hidden_size / heads (Qwen3 decouples the two)
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 32}),
    # Mistral's default 4096-token window would route it to the transformers backend
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: every byte is a token, so any text round-trips."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(sorted(alphabet))})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token=None, unk_token=None
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(path: Path, arch: str = "llama", seed: int = 0, tied: bool = False,
                     dtype: torch.dtype = torch.float32) -> Path:
    """`tied`: the lm_head is the embedding (as SmolLM2's); `dtype`: what the weights are stored in."""
    tok = make_tokenizer()
    common = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=tied,
    )
    config_class, model_class, specific = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    model = model_class(config_class(**common, **specific)).to(dtype)
    with torch.no_grad():  # larger logits than the default init: sharper, more varied greedy text
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen"), "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-mistral"), "mistral")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the ES paper's data is not present at {SHARED_DATA} (../shared is absent outside this workplace)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _tests_on_path(monkeypatch):
    """Tasks named `helpers.…:Class` load in process whatever the import mode."""
    monkeypatch.syspath_prepend(str(TESTS))
