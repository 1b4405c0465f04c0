"""Supervised LoRA fine-tuning of one variant (peft), starting fresh or from a donor's adapter."""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import PreTrainedModel

from evolm.adapters import WEIGHTS_FILE
from evolm.models import check_targets
from evolm.runs import replace_dir
from evolm.search.config import SearchSpace, TrainingConfig
from evolm.search.data import Encoded, answer_nll, collate
from evolm.search.genes import Genes


def check_target_modules(model: PreTrainedModel, space: SearchSpace) -> None:
    """Fail before any training when a module set names a module the model does not have."""
    for set_name, modules in space.target_modules.items():
        check_targets(model, modules, f"space.target_modules.{set_name}")


def attach(model: PreTrainedModel, genes: Genes, space: SearchSpace) -> PeftModel:
    """Wrap the base model with a fresh LoRA adapter of this variant's shape (undo with .unload())."""
    config = LoraConfig(r=genes.rank, lora_alpha=genes.alpha, lora_dropout=genes.dropout,
                        target_modules=space.target_modules[genes.target_modules], task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def inherit(model: PeftModel, donor_dir: Path, donor: Genes, genes: Genes) -> int:
    """Start from the donor's adapter tensors wherever shapes match (same rank, shared modules); B is
    rescaled by the ratio of the LoRA scales so that the inherited update B·A·alpha/r is unchanged.
    Returns the number of tensors inherited; the rest keep their fresh initialisation."""
    saved = load_file(str(donor_dir / WEIGHTS_FILE))
    ratio = (donor.alpha / donor.rank) / (genes.alpha / genes.rank)
    inherited = {}
    for key, tensor in get_peft_model_state_dict(model).items():
        source = saved.get(key)
        if source is not None and source.shape == tensor.shape:
            inherited[key] = source * ratio if "lora_B" in key else source
    set_peft_model_state_dict(model, inherited)
    return len(inherited)


def autocast(device: torch.device, mode: str):
    """bf16 autocast on a GPU (mode auto or bf16); full precision elsewhere."""
    use = device.type == "cuda" and (mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()))
    return torch.autocast("cuda", dtype=torch.bfloat16) if use else nullcontext()


def train(model: PeftModel, rows: list[Encoded], genes: Genes, config: TrainingConfig, *, seed: int,
          pad_id: int, device: torch.device, heartbeat: Callable[[], None]) -> dict[str, float]:
    """AdamW over the adapter for genes.epochs epochs: linear warmup then linear decay, gradient
    accumulation, clipping. Each step's loss (mean over its answer tokens) is measured on the weights
    that step starts from, as in any training loop; `train_loss` is the mean of the losses of the steps
    taken and `last_step_loss` the last one's. A fresh adapter starts as the base model (B = 0), so a
    single step reports the base model's loss, alike for every variant: take several steps."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(rows), generator=generator) for _ in range(genes.epochs)]).tolist()
    micro = [order[i: i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    steps = [micro[i: i + config.gradient_accumulation] for i in range(0, len(micro), config.gradient_accumulation)]
    steps = steps[: config.max_steps] if config.max_steps else steps
    warmup = round(config.warmup_ratio * len(steps))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=genes.learning_rate, weight_decay=config.weight_decay)
    decay = max(len(steps) - warmup, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(len(steps) - s, 0) / decay)
    model.train()
    step_losses, total_tokens = [], 0
    for step in steps:
        batches = [collate([rows[i] for i in indices], pad_id, device) for indices in step]
        tokens = sum(int(b["answer_mask"].sum()) for b in batches)
        step_nll = 0.0
        for batch in batches:
            with autocast(device, config.mixed_precision):
                nll, _ = answer_nll(model, batch)
            loss = nll.sum() / tokens
            loss.backward()
            step_nll += float(nll.detach().sum())
        step_losses.append(step_nll / max(tokens, 1))
        total_tokens += tokens
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        heartbeat()
    model.eval()
    return {"train_loss": sum(step_losses) / max(len(step_losses), 1),
            "last_step_loss": step_losses[-1] if step_losses else 0.0,
            "steps": len(steps), "train_tokens": total_tokens}


def save_adapter(model: PeftModel, folder: Path) -> None:
    """PEFT folder (adapter_config.json + adapter_model.safetensors), replaced atomically."""
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    replace_dir(temporary, folder)
