"""A fast backend for Llama-family models (Llama, Qwen2/2.5, Qwen3, SmolLM, Mistral without a window).

It runs the model's own modules and weights but not its forward: per decoder layer four matmul groups
(qkv, o, gate+up, down), the base weights of a group concatenated (the model's parameters become views
of them, so nothing is duplicated).

Rows live in slots of a preallocated KV cache ([slots, kv_heads, capacity, head_dim] per layer), and
every slot belongs to one member group for the whole call (engine/scheduler.py hands a finished row's
slot to the next waiting row of the same member). The state of a slot — its last token, how many keys
it holds, its generated tokens, whether it finished — lives on the device, so a decoding step needs
nothing from the host: on a GPU it is a CUDA graph, captured once per batch-size bucket (and way of
picking tokens: greedy, or sampled with counter-based noise, engine/sampling.py) and replayed.

A decoding batch is laid out group-major, `per_group` rows for every member group, so a member's
perturbation is a batched matmul over groups,

    y = x W_catᵀ + b + bmm(bmm(x[G, C, in], A[G, in, P·r]), B[G, P·r, out])

at a cost of r·(in + out) per row, not N·r (unused rows of a group point at a scratch slot). Prefill
packs the newly admitted rows of any groups into right-padded chunks, a group's rows next to each other,
so that a group's perturbation is two plain matmuls on a slice of the chunk.

When a batch has one member group left (a generation's tail: one member still writing long rows), its
perturbation is merged into a copy of the weights, W + (A B)ᵀ, written once per such batch, so each of
the tail's steps is a plain forward rather than one with two small bmm's per matmul.

The KV cache holds the model's dtype, or fp8 with per-head scales when asked (kv_cache_dtype="fp8",
engine/kv_quant.py): every write into it quantises, every read dequantises, and a slot takes half a bf16 slot's
bytes, so about twice the rows fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from evolm.engine import kv_quant
from evolm.engine.attention import decode_attention
from evolm.engine.layer import PopulationLinear, Routing
from evolm.engine.lowrank import add_lowrank_
from evolm.engine.rowwise import add_rms_norm, rotary_to_cache, silu_mul
from evolm.engine.sampling import SamplingParams, pick_token, row_keys
from evolm.kernels import use_kernel

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")
KV_CACHE_DTYPES = ("model", "fp8")  # the model's dtype (exact), or float8 e4m3 with per-head scales
GROUPS = {
    "qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "o": ("self_attn", ("o_proj",)),
    "gate_up": ("mlp", ("gate_proj", "up_proj")),
    "down": ("mlp", ("down_proj",)),
}
PREFILL_TOKENS = 32768  # padded prompt tokens per prefill chunk: bounds activation memory
PREFILL_GATHER = 1 << 26  # factor elements a chunk's rows may gather (a refill's rows from many groups)
# cuDNN attention plans anew for every new key length (~5 ms of host time a call, measured on an H200)
PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def supports(model: nn.Module) -> bool:
    config = model.config
    if config.model_type not in SUPPORTED or getattr(config, "hidden_act", "silu") != "silu":
        return False
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        return False
    if getattr(config, "use_sliding_window", False):
        return False
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers is not None and all(
        hasattr(layer, "self_attn") and hasattr(layer, "mlp") and all(hasattr(getattr(layer, parent), name)
                                                                     for parent, names in GROUPS.values()
                                                                     for name in names)
        for layer in layers
    )


@dataclass
class Group:
    """One matmul group of a decoder layer: concatenated base weights and, per call, the members' factors."""

    weight: torch.Tensor  # [sum out, in]
    bias: torch.Tensor | None
    splits: list[int]
    names: list[str | None]  # the targeted layer name of each projection (None: not targeted)
    down: torch.Tensor | None = None  # [G, in, P·r]: the groups' A factors of the adapted projections
    up: torch.Tensor | None = None  # [G, P·r, sum out]: block diagonal B factors, scale folded in
    batch: tuple[torch.Tensor, torch.Tensor] | None = None  # (down, up) of the decoding batch's groups
    picked: tuple[torch.Tensor, torch.Tensor] | None = None  # (down, up) of the batch's groups, when a subset
    merged: torch.Tensor | None = None  # [sum out, in]: W + (A B)ᵀ of one group, for a batch of that group alone
    merged_group: int | None = None  # the group `merged` holds (None: it holds none yet)
    lone: bool = False  # the decoding batch is one group, decoded through `merged`

    def load(self, routing: Routing, members: Sequence[int]) -> None:
        """This call's member groups' factors, from the routing object (nothing when no member is perturbed)."""
        parts = [(i, name) for i, name in enumerate(self.names) if name in routing.factors]
        if not parts or not members:
            self.down = self.up = self.batch = self.merged = self.picked = None
            self.merged_group, self.lone = None, False
            return
        index = torch.as_tensor(list(members), device=self.weight.device)
        offsets = [0, *torch.tensor(self.splits).cumsum(0).tolist()]
        rank = routing.rank
        up = self.weight.new_zeros((len(members), len(parts) * rank, offsets[-1]))
        for j, (i, name) in enumerate(parts):
            b = routing.factors[name].B[index].transpose(1, 2)  # [G, r, out]
            up[:, j * rank : (j + 1) * rank, offsets[i] : offsets[i + 1]] = b * routing.scale
        down = torch.cat([routing.factors[name].A[index].transpose(1, 2) for _, name in parts], dim=2)
        if self.down is not None and self.down.shape == down.shape and self.up.shape == up.shape:
            self.down.copy_(down)  # in place: captured CUDA graphs read these very tensors
            self.up.copy_(up)
        else:
            self.down, self.up, self.picked = down, up, None
        self.batch = (self.down, self.up)
        self.merged_group, self.lone = None, False  # new factors: the merged copy is stale

    def pick(self, index: torch.Tensor | None) -> None:
        """The decoding batch runs the groups `index` (None: every group, in order; a group may come more than
        once, see scheduler.batch_layout): their factors, copied into the first rows of one buffer as large as
        all groups' factors. Captured CUDA graphs read those very addresses, whatever the count: a batch's
        factors are written before its steps replay."""
        if self.down is None:
            return
        if index is None:
            self.batch = (self.down, self.up)
            return
        if self.picked is None:
            self.picked = (torch.empty_like(self.down), torch.empty_like(self.up))
        count = index.shape[0]
        down, up = (buffer[:count] for buffer in self.picked)
        torch.index_select(self.down, 0, index, out=down)
        torch.index_select(self.up, 0, index, out=up)
        self.batch = (down, up)

    def merge(self, group: int | None) -> None:
        """Decode through W merged with `group`'s factors from now on (None: through W and the factors)."""
        self.lone = group is not None and self.merged is not None
        if self.lone and self.merged_group != group:
            torch.addmm(self.weight, self.up[group].T, self.down[group].T, out=self.merged)
            self.merged_group = group

    def decode(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """x [G·C, 1, in], rows group-major, G the decoding batch's groups (see pick)."""
        if self.lone:
            return F.linear(x, self.merged, self.bias)
        y = F.linear(x, self.weight, self.bias)
        if self.down is not None:
            down, up = self.batch
            rows = x.view(groups, -1, x.shape[-1])
            add_lowrank_(y.view(groups, -1, y.shape[-1]), torch.bmm(rows, down), up)
        return y

    def prefill(self, x: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        """x [rows, T, in], rows sorted by group (see Chunk).

        Equal segments are one bmm pair over the segments' groups. Otherwise a chunk of few rows (a refill)
        gathers each row's factors for one bmm pair, and a large one runs a matmul pair per group on views
        of its rows: a refill of rows from 30 groups would otherwise launch 30 pairs per matmul.
        """
        y = F.linear(x, self.weight, self.bias)
        if self.down is None:
            return y
        if chunk.equal is not None:
            rows = x.reshape(len(chunk.segments), -1, x.shape[-1])
            add_lowrank_(y.view(len(chunk.segments), -1, y.shape[-1]), torch.bmm(rows, self.down[chunk.equal]),
                         self.up[chunk.equal])
        elif x.shape[0] * self.up.shape[1] * max(self.up.shape[2], self.down.shape[1]) <= PREFILL_GATHER:
            add_lowrank_(y, torch.bmm(x, self.down[chunk.row_groups]), self.up[chunk.row_groups])
        else:
            for group, start, end in chunk.segments:
                rows = x[start:end].reshape(-1, x.shape[-1])
                y[start:end].view(-1, y.shape[-1]).addmm_(rows @ self.down[group], self.up[group])
        return y


@dataclass
class Chunk:
    """Which member group each row of a prefill chunk belongs to; the rows come sorted by group."""

    segments: list[tuple[int, int, int]]  # (group, first row, end row) of each group present
    equal: torch.Tensor | slice | None  # the segments' groups, when every segment has the same rows
    row_groups: torch.Tensor  # [rows]: each row's group

    @classmethod
    def of(cls, slots: Sequence[int], per_group: int, groups: int, device: torch.device) -> Chunk:
        segments: list[list[int]] = []
        for row, slot in enumerate(slots):
            group = slot // per_group
            if segments and segments[-1][0] == group:
                segments[-1][2] = row + 1
            else:
                segments.append([group, row, row + 1])
        equal = None
        if len(segments) > 1 and len({end - start for _, start, end in segments}) == 1:
            present = [g for g, _, _ in segments]
            equal = slice(None) if present == list(range(groups)) else _on_device(present, device)
        row_groups = _on_device([slot // per_group for slot in slots], device)
        return cls([tuple(segment) for segment in segments], equal, row_groups)


class HostCopy:
    """Device tensors copied to pinned host memory behind the work queued so far: reading them waits for that
    work only, not for anything queued after (on a CPU, the tensors themselves)."""

    def __init__(self, *tensors: torch.Tensor):
        pin = bool(tensors) and tensors[0].is_cuda
        self.tensors = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                        if pin else t for t in tensors]
        self.ready = torch.cuda.Event() if pin else None
        if self.ready is not None:
            self.ready.record()

    def wait(self) -> list[torch.Tensor]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tensors


@dataclass
class Snapshot:
    """The host's copy of the batch rows' state at one point of the device's queue (see FusedBackend.snapshot)."""

    rows: list[int]  # every batch row's slot, in batch order
    scratch: int  # the slot of the batch's padding rows
    copy: HostCopy  # done flags [, tails]

    def wait(self) -> tuple[dict[int, bool], dict[int, list[int]]]:
        """{slot: finished} and {slot: last tokens} of the live slots, once the copy has landed."""
        done, *tails = self.copy.wait()
        done = {s: d for s, d in zip(self.rows, done.tolist()) if s != self.scratch}
        if not tails:
            return done, {}
        return done, {s: [t for t in row if t >= 0] for s, row in zip(self.rows, tails[0].tolist()) if s in done}


@dataclass
class Generated:
    """Rows' generated tokens on their way to the host (see FusedBackend.generated)."""

    copy: HostCopy  # tokens [rows, width], counts [rows]

    def wait(self) -> list[list[int]]:
        out, counts = self.copy.wait()
        return [row[:c] for row, c in zip(out.tolist(), counts.tolist())]


class FusedBackend:
    """Slot-based prefill and decoding for supported architectures (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: dict[str, PopulationLinear], kv_cache_dtype: str = "model"):
        self.model = model
        self.config = model.config
        self.inner = model.model
        names = {layer.base: name for name, layer in layers.items()}
        self.groups: list[dict[str, Group]] = []
        for layer in self.inner.layers:
            groups = {}
            for key, (parent_name, projections) in GROUPS.items():
                parent = getattr(layer, parent_name)
                modules = [getattr(parent, n) for n in projections]
                linears = [m.base if isinstance(m, PopulationLinear) else m for m in modules]
                groups[key] = Group(
                    weight=_concatenate_in_place(linears),
                    bias=_concatenated_bias(linears),
                    splits=[lin.out_features for lin in linears],
                    names=[names.get(lin) for lin in linears],
                )
            self.groups.append(groups)
        attn = self.inner.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = self.config.num_attention_heads
        self.kv_heads = self.config.num_key_value_heads
        self.scaling = attn.scaling
        self.has_qk_norm = hasattr(attn, "q_norm")
        # (groups, rows, temperature, top_p) -> a captured step and the slot index tensor it reads
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.layout: tuple | None = None  # what the buffers below were allocated for
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        # the keys and values of the call's shared prompt prefix, per layer [groups, kv_heads, prefix, head_dim]
        self.prefix_k: list[torch.Tensor] = []
        self.prefix_v: list[torch.Tensor] = []
        self.kv_cache_dtype = kv_cache_dtype
        # an fp8 cache's scales [layers, kv_heads], from the first prefill of the backend's life (kv_quant)
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None

    @property
    def quantised(self) -> bool:
        return self.kv_cache_dtype == "fp8"

    @property
    def cache_dtype(self) -> torch.dtype:
        return kv_quant.FP8 if self.quantised else next(self.model.parameters()).dtype

    def slot_bytes(self, capacity: int) -> int:
        """KV cache bytes of one slot of `capacity` tokens."""
        per_token = 2 * len(self.groups) * self.kv_heads * self.head_dim * self.cache_dtype.itemsize
        return per_token * capacity

    def merge_bytes(self, routing: Routing) -> int:
        """Memory a merged copy of the perturbed weights takes (what a batch of one member group decodes with)."""
        return sum(group.weight.numel() * group.weight.element_size() for layer in self.groups
                   for group in layer.values() if any(name in routing.factors for name in group.names))

    # -- a call: open, then admit / set_batch / decode / finished / generated as the scheduler says --

    @torch.inference_mode()
    def open(self, routing: Routing, members: Sequence[int] | None, per_group: int, capacity: int,
             params: SamplingParams, eos_token_ids: Sequence[int], merge_lone_group: bool = False) -> None:
        """Allocate slots for len(members) groups of `per_group` rows (members None: one unperturbed group);
        `merge_lone_group`: also a merged copy of the perturbed weights (merge_bytes), for batches of one group."""
        device = next(self.model.parameters()).device
        self.members = list(members or [])
        self.prefix_k, self.prefix_v = [], []  # share_prefix sets this call's
        self.num_groups = max(len(self.members), 1)
        self.batch_group_ids: list[int] | None = None  # load() below points every group at all its factors
        shapes = []
        for groups in self.groups:
            for group in groups.values():
                group.load(routing, self.members)
                shapes.append(None if group.down is None else (group.down.shape, group.up.shape))
        merge = merge_lone_group and any(shape is not None for shape in shapes)
        layout = (self.num_groups, per_group, capacity, params.max_new_tokens, tuple(eos_token_ids), tuple(shapes),
                  merge)
        self.params = params
        if layout == self.layout:  # the same buffers and CUDA graphs serve again (e.g. the dense space's members)
            self.last.zero_(), self.length.zero_(), self.count.zero_(), self.done.fill_(True)
            return
        self.release()
        self.layout = layout
        for layer in self.groups:  # before the slots: they take most of what memory is left
            for group in layer.values():
                group.merged = torch.empty_like(group.weight) if merge and group.down is not None else None
        self.per_group, self.capacity = per_group, capacity
        slots = self.num_groups * per_group + 1  # the last slot is scratch: padding rows of a batch write there
        self.scratch = slots - 1
        # zeros, not empty: masked keys still meet the values in the reference attention, and 0 · NaN is NaN
        self.k_cache = [torch.zeros((slots, self.kv_heads, capacity, self.head_dim), device=device,
                                    dtype=self.cache_dtype) for _ in self.groups]
        self.v_cache = [torch.zeros_like(k) for k in self.k_cache]
        self.width = params.max_new_tokens + 1  # generated tokens kept per slot (+1: writes past the end land there)
        self.last = torch.zeros(slots, dtype=torch.long, device=device)
        self.length = torch.zeros(slots, dtype=torch.long, device=device)
        self.count = torch.zeros(slots, dtype=torch.long, device=device)
        self.done = torch.ones(slots, dtype=torch.bool, device=device)
        self.keys = torch.zeros((slots, 2), dtype=torch.long, device=device)  # each row's sampling key
        self.out = torch.zeros((slots, self.width), dtype=torch.long, device=device)
        self.eos = torch.as_tensor(list(eos_token_ids), device=device)
        self.batch_slots: torch.Tensor | None = None
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None

    def group_of(self, slot: int) -> int:
        return slot // self.per_group

    @property
    def prefix_length(self) -> int:
        """Tokens of the call's shared prompt prefix (share_prefix) already in every admitted slot."""
        return self.prefix_k[0].shape[2] if self.prefix_k else 0

    @torch.inference_mode()
    def admit(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], prompt_indices: Sequence[int]) -> None:
        """Prefill these prompts (the call's prompts number `prompt_indices`, which key their sampling) into
        these (free) slots and pick each one's first token.

        A chunk holds rows of similar length. When every group admits the same prompts (a call's first
        admission), a chunk takes the same prompts for every group: equal segments, one bmm per matmul.
        Every prompt starts with the call's shared prefix (share_prefix), whose keys are copied, not computed.
        """
        device = self.last.device
        index = _on_device(slots, device)
        self.keys[index] = _on_device(row_keys(self.params.seed, prompt_indices), device)
        start = self.prefix_length
        if start:  # the call's shared prefix: its keys copied in, only the rest of each prompt prefilled
            groups = _on_device([self.group_of(s) for s in slots], device)
            for k_cache, v_cache, k, v in zip(self.k_cache, self.v_cache, self.prefix_k, self.prefix_v):
                k_cache[index, :, :start] = k[groups]
                v_cache[index, :, :start] = v[groups]
        by_group: dict[int, list[int]] = {}
        for i, slot in enumerate(slots):
            by_group.setdefault(self.group_of(slot), []).append(i)
        columns = list(by_group.values())
        shared = [prompts[i] for i in columns[0]]
        balanced = len(columns) > 1 and all(
            len(c) == len(shared) and all(prompts[i] is p or prompts[i] == p for i, p in zip(c, shared))
            for c in columns[1:])
        if balanced:
            for part in _chunks(sorted(range(len(shared)), key=lambda j: len(shared[j])),
                                lambda j: len(shared[j]) - start, len(columns)):
                chunk = [column[j] for column in columns for j in part]  # group-major
                self._prefill([slots[i] for i in chunk], [prompts[i] for i in chunk])
            return
        for part in _chunks(sorted(range(len(slots)), key=lambda i: len(prompts[i])),
                            lambda i: len(prompts[i]) - start, 1):
            chunk = sorted(part, key=lambda i: slots[i])  # a group's rows together
            self._prefill([slots[i] for i in chunk], [prompts[i] for i in chunk])

    @torch.inference_mode()
    def share_prefix(self, prefix: Sequence[int]) -> None:
        """Every prompt of this call starts with `prefix` (maybe empty): prefill it once per member group, and
        let admit copy its keys into each admitted slot (a prompt template's instructions, the system prompt),
        so that a grid of groups × prompts pays the prefix's matmuls `groups` times, not groups × prompts times.

        Call it after open and before the first admit; it uses each group's first slot, which admit refills."""
        self.prefix_k, self.prefix_v = [], []
        if not prefix:
            return
        slots = [g * self.per_group for g in range(self.num_groups)]
        index = _on_device(slots, self.last.device)
        self._layers(slots, index, [prefix] * len(slots), 0)
        self.prefix_k = [k[index, :, : len(prefix)] for k in self.k_cache]  # advanced indexing: copies
        self.prefix_v = [v[index, :, : len(prefix)] for v in self.v_cache]

    @torch.inference_mode()
    def set_batch(self, slots_by_group: Sequence[Sequence[int]], per_group: int,
                  groups: Sequence[int] | None = None) -> None:
        """Decode these slots from now on, `per_group` rows for each of `groups` (default: every group, in
        order), slots_by_group[i] the live slots of groups[i], padded with the scratch slot.

        Only the groups named run: a member whose rows are all done costs nothing while others decode on.
        """
        device = self.last.device
        groups = list(range(self.num_groups)) if groups is None else list(groups)
        rows = []
        for live in slots_by_group:
            rows += list(live) + [self.scratch] * (per_group - len(live))
        if groups != self.batch_group_ids:  # the factors of the same groups are in place already
            index = None if groups == list(range(self.num_groups)) else _on_device(groups, device)
            for layer in self.groups:
                for group in layer.values():
                    group.pick(index)
                    group.merge(groups[0] if len(set(groups)) == 1 else None)
            self.batch_group_ids = groups
        self.batch_groups, self.batch_rows = len(groups), per_group
        self.batch_list = rows
        self.batch_slots = _on_device(rows, device)
        if self.pool is not None:
            _, slots = self._graph(self.batch_groups, per_group)
            slots.copy_(self.batch_slots)

    @torch.inference_mode()
    def decode(self, steps: int) -> None:
        """Run `steps` decoding steps of the current batch (finished rows run on idly until the next batch)."""
        for _ in range(steps):
            if self.pool is not None:
                self._graph(self.batch_groups, self.batch_rows)[0].replay()
            else:
                self._step(self.batch_slots)

    def snapshot(self, last: int) -> Snapshot:
        """Done flags of the batch's rows (and their `last` generated tokens), copied to the host behind the
        steps queued so far: reading it waits for those steps only, not for any queued after."""
        index = self.batch_slots
        tensors = [self.done[index]] + ([self._tails(index, last)] if last else [])
        return Snapshot(self.batch_list, self.scratch, HostCopy(*tensors))

    def generated(self, slots: Sequence[int]) -> Generated:
        """Tokens generated in these slots so far, copied behind the queued work: the slots may be refilled
        at once (the copy is ordered before any new row's writes) and the host reads them when it likes."""
        index = _on_device(slots, self.out.device)
        return Generated(HostCopy(self.out[index], self.count[index].clamp(max=self.params.max_new_tokens)))

    def _tails(self, index: torch.Tensor, last: int) -> torch.Tensor:
        """[rows, last]: the last `last` tokens generated in these slots, -1 before a row's first."""
        count = self.count[index].clamp(max=self.params.max_new_tokens)
        columns = count[:, None] - last + torch.arange(last, device=index.device)[None, :]
        return self.out[index[:, None], columns.clamp(min=0)].masked_fill(columns < 0, -1)

    def held_bytes(self) -> int:
        """Accelerator memory the slot buffers (and a merged copy) hold between calls (a next call of another
        layout frees it)."""
        merged = [group.merged for layer in self.groups for group in layer.values() if group.merged is not None]
        return sum(t.numel() * t.element_size() for t in (*self.k_cache, *self.v_cache, *merged))

    def release(self) -> None:
        """Free the slot buffers, the merged copy and the graphs."""
        self.k_cache, self.v_cache, self.graphs, self.layout, self.batch_slots = [], [], {}, None, None
        self.prefix_k, self.prefix_v = [], []
        for layer in self.groups:
            for group in layer.values():
                group.picked, group.merged = None, None
                group.pick(None)
                group.merge(None)
        self.batch_group_ids = None

    # -- pieces ---------------------------------------------------------------------------------

    def _graph(self, groups: int, per_group: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The decoding step of a batch of `per_group` rows a group, captured once for each way of picking."""
        key = (groups, per_group, self.params.temperature, self.params.top_p)
        if key not in self.graphs:
            slots = torch.full((groups * per_group,), self.scratch, dtype=torch.long,
                               device=self.last.device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (Triton compiles, cuBLAS picks kernels) on the scratch slot
                for _ in range(2):
                    self._step(slots)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._step(slots)
            self.graphs[key] = (graph, slots)
        return self.graphs[key]

    def _step(self, slots: torch.Tensor) -> None:
        """One decoding step: the next token of every row of these slots, from its key and position."""
        self._advance(slots, pick_token(self._forward(slots), self.params, self.keys[slots], self.count[slots]))

    def _advance(self, slots: torch.Tensor, token: torch.Tensor) -> None:
        """Per-slot state after one step: the new token stored and counted, finished rows marked."""
        count = self.count[slots]
        self.out[slots, count.clamp(max=self.width - 1)] = token
        self.count[slots] = count + 1
        self.last[slots] = token
        hit_eos = (token[:, None] == self.eos[None, :]).any(dim=1)
        self.done[slots] = self.done[slots] | hit_eos | (count + 1 >= self.params.max_new_tokens)

    def _forward(self, slots: torch.Tensor) -> torch.Tensor:
        """One decoding step of these slots: their last tokens in, next-token logits out; keys appended."""
        b = slots.shape[0]
        position = self.length[slots].clamp(max=self.capacity - 1)  # the scratch slot never runs past its end
        x = self.inner.embed_tokens(self.last[slots])[:, None]
        cos, sin = self.inner.rotary_emb(x, position[:, None])
        layers = self.inner.layers
        x, h = add_rms_norm(x, None, layers[0].input_layernorm)
        for i, (layer, groups) in enumerate(zip(layers, self.groups)):
            qkv = groups["qkv"].decode(h, self.batch_groups)
            scales = self._scales(i)
            if use_kernel(qkv) and not self.has_qk_norm:
                q = rotary_to_cache(qkv[:, 0], cos[:, 0], sin[:, 0], self.k_cache[i], self.v_cache[i], slots,
                                    position, self.heads, *scales)
            else:
                q, k, v = self._qkv(layer, groups["qkv"], qkv, cos, sin)
                self.k_cache[i][slots, :, position] = self._stored(k[:, :, 0], self.k_scale, i)
                self.v_cache[i][slots, :, position] = self._stored(v[:, :, 0], self.v_scale, i)
                q = q[:, :, 0]
            attn = decode_attention(q, self.k_cache[i], self.v_cache[i], slots, position + 1, self.scaling,
                                    *scales)
            x, h = add_rms_norm(x, groups["o"].decode(attn.reshape(b, 1, -1), self.batch_groups),
                                layer.post_attention_layernorm)
            up = silu_mul(groups["gate_up"].decode(h, self.batch_groups))
            following = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.inner.norm
            x, h = add_rms_norm(x, groups["down"].decode(up, self.batch_groups), following)
        self.length[slots] = position + 1
        # padding rows attend to one key, not to a scratch slot grown to capacity (a view's fill: no host copy
        # inside a CUDA graph's capture)
        self.length[self.scratch : self.scratch + 1].zero_()
        return self.model.lm_head(h[:, 0])

    def _prefill(self, slots: list[int], prompts: list[Sequence[int]]) -> None:
        """Prefill a chunk of rows after the call's shared prefix (already in their slots) and pick each row's
        first token."""
        device = self.last.device
        start = self.prefix_length
        index = _on_device(slots, device)
        h = self._layers(slots, index, [p[start:] for p in prompts], start)
        lengths = _on_device([len(p) for p in prompts], device)
        last = h[torch.arange(len(prompts), device=device), lengths - start - 1]
        token = pick_token(self.model.lm_head(last), self.params, self.keys[index], torch.zeros_like(index))
        self.length[index] = lengths
        self.count[index] = 0
        self.done[index] = False
        self._advance(index, token)

    def _layers(self, slots: list[int], index: torch.Tensor, parts: list[Sequence[int]], start: int) -> torch.Tensor:
        """Right-padded prefill of `parts` at positions [start, start + len) of their slots (`index`: the same, on
        the device), whose keys before `start` are in place; the last layer's normed hidden states out."""
        device = self.last.device
        n, width = len(parts), max(len(p) for p in parts)
        ids = torch.zeros((n, width), dtype=torch.long)
        for r, p in enumerate(parts):
            ids[r, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        ids = _on_device(ids, device)
        x = self.inner.embed_tokens(ids)
        positions = torch.arange(start, start + width, device=device)[None].expand(n, -1)
        cos, sin = self.inner.rotary_emb(x, positions)
        chunk = Chunk.of(slots, self.per_group, self.num_groups, device)
        layers = self.inner.layers
        x, h = add_rms_norm(x, None, layers[0].input_layernorm)
        calibrating = self.quantised and self.k_scale is None  # the backend's first prefill sets the scales
        if calibrating:
            self.k_scale = torch.empty((len(layers), self.kv_heads), device=device)
            self.v_scale = torch.empty_like(self.k_scale)
        fused_rotary = use_kernel(x) and not self.has_qk_norm and not calibrating
        if fused_rotary:  # every (row, token) a row of the rotary kernel, its keys written into the row's slot
            token_slots, token_positions = index.repeat_interleave(width), positions.reshape(-1).contiguous()
            cos, sin = cos.reshape(n * width, -1), sin.reshape(n * width, -1)
        for i, (layer, groups) in enumerate(zip(layers, self.groups)):
            qkv = groups["qkv"].prefill(h, chunk)
            if fused_rotary:
                q = rotary_to_cache(qkv.view(n * width, -1), cos, sin, self.k_cache[i], self.v_cache[i],
                                    token_slots, token_positions, self.heads, *self._scales(i))
                q = q.view(n, width, self.heads, self.head_dim).transpose(1, 2)
            else:
                q, k, v = self._qkv(layer, groups["qkv"], qkv, cos, sin)
                if calibrating:
                    self.k_scale[i], self.v_scale[i] = kv_quant.head_scales(k), kv_quant.head_scales(v)
                self.k_cache[i][index, :, start : start + width] = self._stored(k, self.k_scale, i)
                self.v_cache[i][index, :, start : start + width] = self._stored(v, self.v_scale, i)
            k, v = self.k_cache[i][index, :, : start + width], self.v_cache[i][index, :, : start + width]
            if self.quantised:
                k, v = (kv_quant.dequantise(t, scale, x.dtype) for t, scale in zip((k, v), self._scales(i)))
            # plain causal attention, the queries left-padded by `start` rows so that query t meets keys ≤ t:
            # right padding only ever follows a row's prompt, so a prompt query never meets a padding key
            # (padding queries do, and their keys land past the row's length, unread)
            if start:
                q = F.pad(q, (0, 0, start, 0))
            with sdpa_kernel(PREFILL_ATTENTION):
                attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True)
            attn = attn[:, :, start:].transpose(1, 2).reshape(n, width, -1)
            x, h = add_rms_norm(x, groups["o"].prefill(attn, chunk), layer.post_attention_layernorm)
            up = silu_mul(groups["gate_up"].prefill(h, chunk))
            following = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.inner.norm
            x, h = add_rms_norm(x, groups["down"].prefill(up, chunk), following)
        return h

    def _scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[()]:
        """(k_scale, v_scale) of a layer's fp8 cache, as the attention and rotary functions take them; () when
        the cache holds the model's dtype."""
        return (self.k_scale[layer], self.v_scale[layer]) if self.quantised else ()

    def _stored(self, x: torch.Tensor, scales: torch.Tensor | None, layer: int) -> torch.Tensor:
        """Keys or values [rows, kv_heads, ...] of a layer as its cache holds them (`scales`: k_scale or
        v_scale)."""
        return kv_quant.quantise(x, scales[layer]) if self.quantised else x

    def _qkv(self, layer, group: Group, qkv: torch.Tensor, cos, sin):
        b, t, _ = qkv.shape
        q, k, v = qkv.split(group.splits, dim=-1)
        q = q.view(b, t, self.heads, self.head_dim)
        k = k.view(b, t, self.kv_heads, self.head_dim)
        v = v.view(b, t, self.kv_heads, self.head_dim)
        if self.has_qk_norm:
            q, k = layer.self_attn.q_norm(q), layer.self_attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def _on_device(values, device: torch.device) -> torch.Tensor:
    """A host list or tensor of indices on the device without a sync (pageable copies wait for the queue)."""
    host = torch.as_tensor(values, dtype=torch.long)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def _chunks(order: list[int], length, copies: int):
    """Consecutive runs of `order` (sorted by length) whose padded tokens, `copies` rows each, fit a chunk."""
    start = 0
    while start < len(order):
        width, end = 0, start
        while end < len(order) and max(width, length(order[end])) * (end - start + 1) * copies <= PREFILL_TOKENS:
            width = max(width, length(order[end]))
            end += 1
        end = max(end, start + 1)
        yield order[start:end]
        start = end


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _concatenate_in_place(linears: list[nn.Linear]) -> torch.Tensor:
    """One weight tensor for the group; each linear's weight becomes a view into it."""
    if len(linears) == 1:
        return linears[0].weight
    weight = torch.cat([lin.weight.data for lin in linears])
    start = 0
    for lin in linears:
        lin.weight.data = weight[start : start + lin.out_features]
        start += lin.out_features
    return weight


def _concatenated_bias(linears: list[nn.Linear]) -> torch.Tensor | None:
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                      for lin in linears])
