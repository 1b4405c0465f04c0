"""The population engine must reproduce PEFT + generate exactly, member by member (fp32, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from evolm.adapters import Adapter, layer_of, peft_key
from evolm.engine import PopulationEngine, fused_backend
from evolm.engine.decoding import StopCheck, decode_texts, trim_at_stops
from evolm.engine.sampling import SamplingParams
from evolm.errors import UserError
from evolm.es.lora_space import LoRASpace
from evolm.models import load_tokenizer

PROMPTS = ["Hello there", "The quick brown fox", "1 + 1 =", "a", "Once upon a time, in a land far away"]


def _members(space: LoRASpace, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Random non-zero A and B so every member's adapter really changes the output."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, *p.shape, generator=g) * 0.3 for name, p in space.initial_params(0).items()}


def _member(members: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {name: t[i : i + 1] for name, t in members.items()}


def _mid_text_token(tokens: list[list[list[int]]]) -> int:
    """A token that first appears after a few steps in some rows and not at all in others."""
    rows = [t for member in tokens for t in member]
    counts: dict[int, int] = {}
    for row in rows:
        for tok in set(row[3:]) - set(row[:3]):
            counts[tok] = counts.get(tok, 0) + 1
    return min(counts, key=lambda tok: abs(counts[tok] - len(rows) / 2))


def _peft_generate(base, member_theta, space, targets, tokenizer, prompts, max_new_tokens, eos):
    config = LoraConfig(r=space.rank, lora_alpha=space.alpha, target_modules=targets, lora_dropout=0.0)
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    weights = space.unflatten(member_theta)
    with torch.no_grad():
        for name, w in weights.items():
            module = peft_model.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(w.A[0])
            module.lora_B["default"].weight.copy_(w.B[0])
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        y = peft_model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
        )
        outs.append(y[0, x.shape[1]:].tolist())
    return outs


@pytest.mark.parametrize("backend", ["transformers", "fused"])
@pytest.mark.parametrize(
    "fixture,rank,alpha,targets",
    [
        ("tiny_llama", 1, 1.0, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ("tiny_llama", 4, 8.0, ["q_proj", "v_proj"]),
        ("tiny_qwen", 2, 3.0, ["o_proj", "down_proj", "up_proj"]),
        ("tiny_qwen3", 2, 2.0, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ("tiny_mistral", 3, 6.0, ["q_proj", "k_proj", "o_proj", "gate_proj"]),
    ],
)
def test_engine_matches_peft_generate_per_member(request, fixture, rank, alpha, targets, backend):
    path = request.getfixturevalue(fixture)
    tokenizer = load_tokenizer(str(path))
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = copy.deepcopy(base)
    engine = PopulationEngine(model, tokenizer, targets, eos_token_ids=[tokenizer.eos_token_id], max_batch_rows=7,
                              backend=backend)
    space = LoRASpace(engine.shapes(), rank, alpha)
    members = _members(space, 4, seed=rank)
    engine.set_factors(space.unflatten(members), space.scale)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    params = SamplingParams(max_new_tokens=24)
    free = engine.generate(prompts, members=[0, 1, 2, 3], params=params)
    # A random tiny model rarely emits its real EOS: make a token it does emit mid-text the EOS, so
    # rows finish at different steps and the engine's dropping of finished rows is exercised.
    eos = _mid_text_token(free.tokens)
    engine.eos_token_ids = [eos]
    out = engine.generate(prompts, members=[0, 1, 2, 3], params=params)
    lengths = {len(t) for row in out.tokens for t in row}
    assert len(lengths) > 2 and max(lengths) == 24, "rows should stop at different steps"
    if backend == "fused":  # 4 member groups of one slot each: the other rows waited for a finished row's slot
        assert out.rows_at_once == 4 and out.refills >= 4
    else:
        assert out.rows_at_once == 7  # 20 rows in waves of at most 7
    distinct = set()
    for m in range(4):
        expected = _peft_generate(base, _member(members, m), space, targets, tokenizer, prompts, 24, eos)
        assert out.tokens[m] == expected, f"member {m} differs from PEFT + generate"
        distinct.add(tuple(map(tuple, expected)))
    assert len(distinct) == 4, "the members' adapters should give different completions"
    plain = engine.generate(prompts, members=None, params=SamplingParams(max_new_tokens=24))
    base_out = [
        base.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                      max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=eos)[0, len(p):].tolist()
        for p in prompts
    ]
    assert plain.tokens[0] == base_out


@pytest.mark.parametrize("backend", ["transformers", "fused"])
def test_subset_of_members_and_eos_stop(tiny_llama, backend):
    tokenizer = load_tokenizer(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    engine = PopulationEngine(model, tokenizer, ["q_proj", "v_proj"], eos_token_ids=[tokenizer.eos_token_id],
                              backend=backend)
    space = LoRASpace(engine.shapes(), 2, 2.0)
    members = _members(space, 6, seed=3)
    engine.set_factors(space.unflatten(members), space.scale)
    prompts = [tokenizer(p).input_ids for p in PROMPTS[:3]]
    params = SamplingParams(max_new_tokens=40)
    full = engine.generate(prompts, members=list(range(6)), params=params)
    share = engine.generate(prompts, members=[4, 1], params=params)
    assert share.tokens == [full.tokens[4], full.tokens[1]]
    for row in full.tokens:
        for toks in row:
            assert len(toks) <= 40
            assert tokenizer.eos_token_id not in toks[:-1]  # nothing is generated after EOS


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen3"])
def test_refill_gives_every_row_what_it_gets_alone(request, fixture, monkeypatch):
    """Rows that take over finished rows' slots, in any order and bucket, decode exactly as without refill;
    a refill's rows of several groups prefill with gathered factors or a matmul pair per group alike."""
    path = request.getfixturevalue(fixture)
    tokenizer = load_tokenizer(str(path))
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    prompts = [tokenizer(p).input_ids for p in PROMPTS * 2]
    results = {}
    for name, backend, rows in [("waves", "transformers", None), ("all at once", "fused", None),
                                ("refill", "fused", 6), ("one slot each", "fused", 1),
                                ("refill, a matmul pair per group", "fused", 6)]:
        if name == "refill, a matmul pair per group":
            monkeypatch.setattr(fused_backend, "PREFILL_GATHER", 0)
        engine = PopulationEngine(copy.deepcopy(base), tokenizer, targets, eos_token_ids=[tokenizer.eos_token_id],
                                  max_batch_rows=rows, backend=backend)
        space = LoRASpace(engine.shapes(), 2, 4.0)
        engine.set_factors(space.unflatten(_members(space, 3, seed=9)), space.scale)
        if name == "waves":
            free = engine.generate(prompts, [0, 1, 2], SamplingParams(max_new_tokens=20))
            eos = _mid_text_token(free.tokens)
            stop = tokenizer.decode([_mid_text_token([[t[1:] for t in row] for row in free.tokens])])
        engine.eos_token_ids = [eos]
        params = SamplingParams(max_new_tokens=20, stop_strings=[stop])
        results[name] = engine.generate(prompts, [2, 0, 1], params, keep_slots=True)
        if name == "one slot each":  # a member whose rows are all done leaves the batch while others decode on
            assert any(g.picked for layer in engine.backend.groups for g in layer.values())
        if rows:  # the last member group left decodes through its merged weights
            assert all(g.merged_group is not None for layer in engine.backend.groups for g in layer.values()), name
        if name == "refill":  # seen prompts come back longest first: another admission order, the same rows
            assert engine._longest_first(prompts) != list(range(len(prompts))), "a new admission order"
            results["refill, longest first"] = engine.generate(prompts, [2, 0, 1], params)
    lengths = {len(t) for row in results["waves"].tokens for t in row}
    assert len(lengths) > 3, "rows should end at many different steps"
    assert results["all at once"].refills == 0 and results["refill"].refills > 0
    refill = results["refill"]  # where the time went: device phases, and the host loop's blocks
    assert set(refill.seconds) == {"prefill", "decode"} and min(refill.seconds.values()) > 0
    assert set(refill.host_seconds) == {"open", "waits", "stop_checks", "rebuilds", "collect", "texts"}
    assert set(results["refill, longest first"].host_seconds) == set(refill.host_seconds) | {"release"}  # not kept
    assert set(results["waves"].host_seconds) == {"texts"}
    assert results["one slot each"].rows_at_once == 3
    for name, out in results.items():
        assert out.tokens == results["waves"].tokens, f"{name}: tokens differ from the wave-by-wave reference"
        assert out.texts == results["waves"].texts, name


def test_a_shared_prompt_prefix_is_prefilled_once_per_member_and_decodes_as_in_waves(tiny_qwen3, monkeypatch):
    """Prompts that open with the same instructions: the prefix's keys are computed once per member group and
    copied into every slot (first admission and refills alike), and every token equals the wave reference."""
    tokenizer = load_tokenizer(str(tiny_qwen3))
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    template = "You are a careful assistant. Think, then answer: "
    prompts = [tokenizer(template + p).input_ids for p in PROMPTS * 2]
    prefilled = []  # tokens each prefill computes
    layers = fused_backend.FusedBackend._layers

    def counting(self, slots, index, parts, start):
        prefilled.append(sum(len(p) for p in parts))
        return layers(self, slots, index, parts, start)

    monkeypatch.setattr(fused_backend.FusedBackend, "_layers", counting)
    results = {}
    for name, backend, rows in [("waves", "transformers", None), ("refill", "fused", 6)]:
        engine = PopulationEngine(copy.deepcopy(base), tokenizer, targets, eos_token_ids=[tokenizer.eos_token_id],
                                  max_batch_rows=rows, backend=backend)
        space = LoRASpace(engine.shapes(), 2, 4.0)
        engine.set_factors(space.unflatten(_members(space, 3, seed=4)), space.scale)
        if backend == "transformers":
            eos = _mid_text_token(engine.generate(prompts, [0, 1, 2], SamplingParams(max_new_tokens=16)).tokens)
        engine.eos_token_ids = [eos]
        results[name] = engine.generate(prompts, [1, 2, 0], SamplingParams(max_new_tokens=16))
    shared = len(tokenizer(template).input_ids)
    assert results["refill"].refills > 0
    assert sum(prefilled) == 3 * shared + sum(len(p) - shared for p in prompts) * 3  # the prefix once a member
    assert results["refill"].tokens == results["waves"].tokens
    assert len({str(member) for member in results["refill"].tokens}) == 3


def test_a_members_rows_split_over_several_batch_groups_decode_as_in_waves(tiny_llama, monkeypatch):
    """As rows drain unevenly, one member's live rows run in several batch groups, each with that member's
    factors (scheduler.batch_layout): every row's tokens are still the wave-by-wave reference's, and the
    batch decodes fewer rows than one as wide as its fullest member would."""
    tokenizer = load_tokenizer(str(tiny_llama))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    targets = ["q_proj", "v_proj", "gate_proj"]
    prompts = [tokenizer(p).input_ids for p in PROMPTS * 3]
    layouts = []
    set_batch = fused_backend.FusedBackend.set_batch

    def recording(self, slots_by_group, per_group, groups=None):
        layouts.append([(g, len(slots)) for g, slots in zip(groups, slots_by_group) if slots])
        return set_batch(self, slots_by_group, per_group, groups)

    monkeypatch.setattr(fused_backend.FusedBackend, "set_batch", recording)
    results = {}
    for backend in ("transformers", "fused"):
        engine = PopulationEngine(copy.deepcopy(base), tokenizer, targets, eos_token_ids=[tokenizer.eos_token_id],
                                  backend=backend)
        space = LoRASpace(engine.shapes(), 2, 4.0)
        engine.set_factors(space.unflatten(_members(space, 16, seed=5)), space.scale)
        if backend == "transformers":  # EOS: every token the others write after their first and member 0 never
            free = engine.generate(prompts, list(range(16)), SamplingParams(max_new_tokens=24)).tokens
            never = {t for row in free[0] for t in row}
            eos = sorted({t for member in free[1:] for row in member for t in row[1:]} - never)
        engine.eos_token_ids = eos
        results[backend] = engine.generate(prompts, list(range(16)), SamplingParams(max_new_tokens=24))
    split = [layout for layout in layouts if len({g for g, _ in layout}) < len(layout)]
    assert split, f"no batch ran a member in several groups: {layouts}"
    assert results["fused"].tokens == results["transformers"].tokens
    fused = results["fused"]
    assert fused.num_tokens <= fused.row_steps < fused.steps * 16 * len(prompts)


def test_batch_layout_covers_every_live_row_in_at_most_the_groups_and_fewer_rows():
    from evolm.engine.scheduler import batch_layout, bucket

    for live, groups, per_group in [([152] * 30, 30, 152), ([150] + [2] * 7 + [0] * 22, 30, 152),
                                    ([3, 150, 150, 150] + [4] * 10 + [0] * 16, 30, 152), ([5, 1, 0, 0], 4, 8),
                                    ([0, 0, 7], 3, 7), ([1], 1, 1)]:
        pieces, count, rows = batch_layout(live, groups, per_group)
        assert all(k >= 1 for n, k in zip(live, pieces) if n)  # every live row has a place
        assert sum(pieces) <= count <= groups and rows <= per_group
        assert all(-(-n // k) <= rows for n, k in zip(live, pieces) if k)  # every piece fits its batch group
        widest = bucket(sum(n > 0 for n in live), groups) * bucket(max(live), per_group)
        assert count * rows <= widest
    assert batch_layout([152] * 30, 30, 152) == ([1] * 30, 30, 152)  # a full batch stays as it is
    _, count, rows = batch_layout([150] + [2] * 7 + [0] * 22, 30, 152)
    assert count * rows <= 256 < 8 * 152  # one long member beside seven short ones


def test_sampled_rows_do_not_depend_on_the_batch(tiny_llama):
    """A sampled token is a function of (seed, prompt, position) and the logits: refilled slots, one slot a
    group and the wave-by-wave path sample the very same completions."""
    tokenizer = load_tokenizer(str(tiny_llama))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompts = [tokenizer(p).input_ids for p in PROMPTS * 2]
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=4)
    results = {}
    for name, backend, rows in [("waves", "transformers", None), ("all at once", "fused", None),
                                ("refill", "fused", 4), ("one slot each", "fused", 1)]:
        engine = PopulationEngine(copy.deepcopy(base), tokenizer, ["q_proj", "v_proj"],
                                  eos_token_ids=[tokenizer.eos_token_id], max_batch_rows=rows, backend=backend)
        space = LoRASpace(engine.shapes(), 2, 4.0)
        engine.set_factors(space.unflatten(_members(space, 2, seed=9)), space.scale)
        results[name] = engine.generate(prompts, [1, 0], params)
    assert results["refill"].refills > 0
    for name, out in results.items():
        assert out.tokens == results["waves"].tokens, f"{name}: sampled tokens differ from the wave-by-wave path"
    first = results["waves"].tokens[0]
    assert first[:len(PROMPTS)] != first[len(PROMPTS):], "a repeated prompt draws anew"


def test_sampling_is_reproducible_with_seed(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    engine = PopulationEngine(model, tokenizer, ["q_proj"], eos_token_ids=[tokenizer.eos_token_id])
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=11)
    a = engine.generate(prompts, None, params)
    b = engine.generate(prompts, None, params)
    c = engine.generate(prompts, None, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=12))
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_stop_strings_cut_text(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    engine = PopulationEngine(model, tokenizer, ["q_proj"], eos_token_ids=[tokenizer.eos_token_id])
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    free = engine.generate(prompts, None, SamplingParams(max_new_tokens=32))
    # pick a character the model does produce, and stop on it
    sample = next(t for t in free.texts[0] if len(t) > 4)
    stop = sample[2]
    cut = engine.generate(prompts, None, SamplingParams(max_new_tokens=32, stop_strings=[stop]))
    for full_text, text in zip(free.texts[0], cut.texts[0]):
        if stop in full_text:
            assert text == full_text[: full_text.index(stop) + 1]
        else:
            assert text == full_text


@pytest.mark.parametrize("clean_up", [False, True])
def test_batched_detokenising_matches_decode_row_by_row(tiny_llama, clean_up):
    """The batch paths (Rust decode_batch, or row by row when the tokenizer cleans up spaces) give decode()'s
    text, and the stop trimming finds the shortest prefix holding a stop string, even where a prefix ends
    inside a multi-byte character or many split characters put its guess of the cut tokens away."""
    tokenizer = load_tokenizer(str(tiny_llama))
    tokenizer.clean_up_tokenization_spaces = clean_up
    texts = ["x = 1 , y = 2 . ", "héllo wörld → ok", "no stop here at all", "→→ arrow first", "a . b → c", "",
             "ü ö ä é à ç ñ " * 6 + "so → then", "word , " * 20 + "end ."]
    rows = [tokenizer(t).input_ids + [tokenizer.eos_token_id] for t in texts]
    assert decode_texts(tokenizer, rows) == [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    stops = ["→", " ."]
    trimmed = trim_at_stops(tokenizer, rows, stops)
    for row, cut in zip(rows, trimmed):
        holds = [any(s in tokenizer.decode(row[:k], skip_special_tokens=True) for s in stops)
                 for k in range(len(row) + 1)]
        assert cut == (row[: holds.index(True)] if True in holds else row)
    assert trimmed[2] == rows[2] and tokenizer.decode(trimmed[1]) == "héllo wörld →"


@pytest.mark.parametrize("stop", ["</answer>", " .", "→"])
def test_stop_check_skips_only_rows_that_cannot_have_completed_a_stop_string(tiny_llama, stop):
    """A row whose text had no stop string before its last `new` tokens holds one after them exactly when
    the check says so, though the check detokenises only rows whose new tokens hold the stop's last character
    (every row where that character is not ASCII)."""
    tokenizer = load_tokenizer(str(tiny_llama))
    check = StopCheck(tokenizer, [stop])
    assert (check.enders is None) == (not stop[-1].isascii())
    texts = ["so <answer> 3 </answer> done", "x = 1 , y = 2 . z", "héllo → wörld </ans", "a . b → c </answer>",
             "no stop here at all", "</answer></answer>", "it ends in an arrow →"]
    rows = [tokenizer(t).input_ids for t in texts]
    cases = [(row, new) for row in rows for new in range(1, 9)
             if stop not in tokenizer.decode(row[: max(len(row) - new, 0)], skip_special_tokens=True)]
    expected = [stop in tokenizer.decode(row, skip_special_tokens=True) for row, _ in cases]
    assert any(expected) and not all(expected)
    assert [check([row], new)[0] for row, new in cases] == expected
    assert check([[-1, -1, *rows[0]], rows[4]], 8) == [stop in texts[0], False]  # -1: no token yet


def test_exported_adapter_loads_in_peft_and_matches_engine(tiny_llama, tmp_path):
    tokenizer = load_tokenizer(str(tiny_llama))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    engine = PopulationEngine(copy.deepcopy(base), tokenizer, targets, eos_token_ids=[tokenizer.eos_token_id])
    space = LoRASpace(engine.shapes(), 2, 4.0)
    theta = _members(space, 1, seed=5)
    space.export({name: t[0] for name, t in theta.items()}, tmp_path / "adapter", str(tiny_llama))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    engine.set_factors(space.unflatten(theta), space.scale)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    ours = engine.generate(prompts, [0], SamplingParams(max_new_tokens=16)).tokens[0]
    for ids, mine in zip(prompts, ours):
        x = torch.tensor([ids])
        ref = peft_model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=16,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        assert mine == ref


def test_peft_keys_are_the_ones_peft_writes(tiny_llama, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    engine = PopulationEngine(copy.deepcopy(base), load_tokenizer(str(tiny_llama)), ["q_proj", "down_proj"])
    space = LoRASpace(engine.shapes(), 2, 4.0)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4.0, target_modules=["q_proj", "down_proj"]))
    keys = set(get_peft_model_state_dict(peft_model))
    assert keys == {peft_key(name, which) for name in space.shapes for which in "AB"}
    assert {layer_of(key) for key in keys} == {(name, which) for name in space.shapes for which in "AB"}
    theta = {name: t[0] for name, t in _members(space, 1, seed=7).items()}
    space.export(theta, tmp_path / "adapter", str(tiny_llama))
    adapter = Adapter.of_folder(tmp_path / "adapter")
    restored = space.params_of(adapter.factors)
    assert adapter.scale == 2.0 and all(a.shape[0] == 2 for a, _ in adapter.factors.values())
    assert adapter.base_model == str(tiny_llama) and restored.keys() == theta.keys()
    assert all(torch.equal(restored[name], t) for name, t in theta.items())


def test_fused_backend_declines_a_sliding_window(tiny_mistral):
    """A windowed Mistral attends to the last `sliding_window` tokens only, which the fused backend does not do."""
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral, dtype=torch.float32)
    assert fused_backend.supports(model)
    model.config.sliding_window = 16
    assert not fused_backend.supports(model)


def test_batch_buckets_pad_little_and_never_exceed_the_slots():
    from evolm.engine.scheduler import BUCKET_STEP, bucket

    for per_group in (1, 5, 8, 107, 300):
        sizes = {bucket(rows, per_group) for rows in range(1, per_group + 1)}
        for rows in range(1, per_group + 1):
            size = bucket(rows, per_group)
            assert rows <= size <= per_group
            assert size - rows < max(BUCKET_STEP, rows)  # powers of two below the step, its multiples above
        assert len(sizes) <= 4 + per_group // BUCKET_STEP  # one CUDA graph per bucket: a bounded number


def test_an_fp8_kv_cache_decodes_close_to_the_exact_cache_in_half_the_bytes(tiny_qwen, monkeypatch):
    """kv_cache_dtype="fp8" is inexact by design, so it is held to what is stable in float32: the logits of a
    call's first prefill (whose attention reads the fp8 keys) stay within a tenth of their spread of the exact
    cache's (about a twentieth on this model) without equalling them. Tokens are a weaker check: a random tiny
    model's top two logits lie a few hundredths apart, so a greedy row may part at any step and then writes
    another text; most rows' first token still agrees. The run covers calibration by a shared prefix's
    prefill, the prefix's fp8 keys copied into slots, and refills prefilled under the fixed scales."""
    tokenizer = load_tokenizer(str(tiny_qwen))
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    prompts = [tokenizer("Instructions every prompt shares: " + p).input_ids for p in PROMPTS * 2]
    picked = []  # the logits of every pick, in order: the first is the first prefill chunk's
    pick = fused_backend.pick_token
    monkeypatch.setattr(fused_backend, "pick_token", lambda logits, *rest: picked.append(logits) or pick(logits, *rest))
    out, engines, first_logits = {}, {}, {}
    for dtype in ("model", "fp8"):
        picked.clear()
        engine = PopulationEngine(copy.deepcopy(base), tokenizer, targets, eos_token_ids=[tokenizer.eos_token_id],
                                  max_batch_rows=6, backend="fused", kv_cache_dtype=dtype)
        space = LoRASpace(engine.shapes(), 2, 4.0)
        engine.set_factors(space.unflatten(_members(space, 2, seed=6)), space.scale)
        out[dtype] = engine.generate(prompts, [1, 0], SamplingParams(max_new_tokens=16), keep_slots=True)
        engines[dtype], first_logits[dtype] = engine, picked[0]
    fp8 = engines["fp8"].backend
    assert fp8.k_cache[0].dtype == torch.float8_e4m3fn and torch.isfinite(fp8.k_scale).all()
    assert out["fp8"].refills > 0
    exact, ours = first_logits["model"], first_logits["fp8"]
    spread = exact.amax(-1) - exact.amin(-1)
    assert not torch.equal(exact, ours) and ((exact - ours).abs().amax(-1) < 0.1 * spread).all()
    rows = [(a, b) for d in zip(out["model"].tokens, out["fp8"].tokens) for a, b in zip(*d)]
    assert sum(a[0] == b[0] for a, b in rows) >= 0.75 * len(rows)
    # a slot takes a quarter of a float32 slot's bytes, so more than twice the rows fit the same memory
    assert engines["model"].backend.slot_bytes(100) == 4 * fp8.slot_bytes(100)
    fit = {d: e._slots_in_memory(100, 40, 2**30) for d, e in engines.items()}
    assert fit["fp8"] > 2 * fit["model"]


def test_an_fp8_kv_cache_is_refused_where_the_engine_cannot_honour_it(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with pytest.raises(UserError, match="kv_cache_dtype=fp8 needs the fused engine"):
        PopulationEngine(model, tokenizer, ["q_proj"], backend="transformers", kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        PopulationEngine(model, tokenizer, ["q_proj"], kv_cache_dtype="fp16")
    # on a CPU "auto" takes the transformers backend, except for an fp8 cache, which only the fused one has
    assert isinstance(PopulationEngine(model, tokenizer, ["q_proj"], kv_cache_dtype="fp8").backend,
                      fused_backend.FusedBackend)
