"""Loading a causal LM and its tokenizer from a hub id or a local folder."""

from __future__ import annotations

import gc
import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import huggingface_hub
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from evolm.config import ConfigError, ModelConfig
from evolm.engine.layer import find_target_linears
from evolm.errors import ctrl_c_behind, memory_problem

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={name}: this machine has no CUDA device (torch.cuda.is_available() is "
                          "False); use model.device=cpu or auto, or install a CUDA build of torch")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # bf16 where the hardware does it well, fp32 on CPU for exactness
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def model_source(name_or_path: str) -> tuple[str, dict]:
    """What from_pretrained gets for a hub id, a model folder or a .gguf file: (name or folder, extra
    keyword arguments). A local path that is no model is a ConfigError naming it, before any download."""
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf"):
        if not path.is_file():
            raise ConfigError(f"model {name_or_path}: no such GGUF file")
        if importlib.util.find_spec("gguf") is None:
            raise ConfigError(f"model {name_or_path} is a GGUF file, which needs the gguf package: "
                              "pip install 'evolm[gguf]'")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model {name_or_path}: the folder has no config.json, so it is no transformers model "
                              "folder; give the folder that holds config.json and the weights")
        return str(path), {}
    if path.exists() or looks_like_path(name_or_path):
        raise ConfigError(f"model {name_or_path}: no such model folder (a local path; a hub id looks like "
                          "'org/name')")
    return name_or_path, hub_access(name_or_path)


@lru_cache(maxsize=None)
def hub_access(name: str) -> dict:
    """Ask the hub once, without retries, whether `name` can be reached: offline, a cached copy is loaded
    without asking again ({"local_files_only": True}), and no cached copy is one line at once, instead of
    minutes of transformers retrying each file."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return {}  # transformers itself then reads only the cache, and fails at once
    try:
        huggingface_hub.model_info(name, timeout=10)
    except (huggingface_hub.errors.RepositoryNotFoundError, huggingface_hub.errors.GatedRepoError) as exc:
        raise hub_failure(name, exc) from None
    except huggingface_hub.errors.HfHubHTTPError:
        return {}  # the hub answered: let transformers load and report
    except Exception as exc:  # no connection (the HTTP client's own error types)
        if huggingface_hub.try_to_load_from_cache(name, "config.json") is None:
            raise hub_failure(name, exc) from None
        return {"local_files_only": True}
    return {}


def looks_like_path(name: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else with a slash, or starting with . or ~, is a path."""
    return name.startswith((".", "~", "/")) or name.count("/") > 1 or "\\" in name


def hub_failure(name: str, exc: Exception) -> ConfigError:
    """A hub id that did not load, with the way round it when offline."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ConfigError(f"model {name} could not be loaded from the Hugging Face hub ({reason}); offline, or for a "
                       f"private model, download it where there is network (hf download {name} --local-dir DIR) "
                       "and pass the folder: model.name_or_path=DIR")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    source, extra = model_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except OSError as exc:
        raise hub_failure(name_or_path, exc) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def check_model(config: ModelConfig) -> None:
    """What can fail about the model without loading its weights: the path, the hub, the device."""
    source, extra = model_source(config.name_or_path)
    resolve_device(config.device)
    try:
        AutoConfig.from_pretrained(source, trust_remote_code=config.trust_remote_code, **extra)
    except OSError as exc:
        raise hub_failure(config.name_or_path, exc) from exc


def stored_dtype(name_or_path: str) -> torch.dtype | None:
    """The dtype a model's config.json records (what its weights are stored in), None where it says none."""
    source, extra = model_source(name_or_path)
    dtype = getattr(AutoConfig.from_pretrained(source, **extra), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def weight_bytes(source: str, extra: dict, trust_remote_code: bool, dtype: torch.dtype) -> int | None:
    """Bytes of the model's parameters in `dtype` (shared ones once), counted on the meta device; None for a
    model that cannot be built there (the load itself then says what is wrong)."""
    try:
        model_config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
        with torch.device("meta"):
            empty = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    except Exception:  # only an estimate for the message: never a reason to refuse a model
        return None
    return sum(p.numel() for p in empty.parameters()) * dtype.itemsize


def _does_not_fit(config: ModelConfig, dtype: torch.dtype, device: torch.device, needed: int | None,
                  free: int | None) -> str:
    """The one line for a model whose weights do not fit `device` (`needed`: their bytes, None if unknown)."""
    size = f"{needed / 2**30:.2f} GiB" if needed is not None else "more memory than there is"
    has = f"; {device} has {free / 2**30:.1f} GiB free" if free is not None else f" on {device}, more than it has"
    return (f"model {config.name_or_path} needs {size} for its weights in {str(dtype).removeprefix('torch.')}"
            f"{has}, before any run buffers: use model.dtype=bfloat16, a smaller model, a device with more "
            "memory, or another model.device")


def load_model(config: ModelConfig) -> LoadedModel:
    source, extra = model_source(config.name_or_path)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    kwargs = {"dtype": dtype, "trust_remote_code": config.trust_remote_code, **extra}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    needed = weight_bytes(source, extra, config.trust_remote_code, dtype) if free is not None else None
    if needed is not None and needed > free:  # fail before loading what cannot fit
        raise ConfigError(_does_not_fit(config, dtype, device, needed, free))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        model.to(device)
    except OSError as exc:
        raise hub_failure(config.name_or_path, exc) from exc
    except Exception as exc:  # a Ctrl-C mid-load can come out as torch's mode-stack error: it stays a Ctrl-C
        interrupt = ctrl_c_behind(exc)
        if interrupt is not None:
            raise interrupt from None
        if memory_problem(exc):  # on a CPU the weights are counted only now, for the message
            needed = needed if free is not None else weight_bytes(source, extra, config.trust_remote_code, dtype)
            raise ConfigError(_does_not_fit(config, dtype, device, needed, free)) from exc
        raise
    model.eval()
    model.requires_grad_(False)
    tokenizer = load_tokenizer(config.name_or_path, config.trust_remote_code)
    return LoadedModel(model, tokenizer, device, dtype)


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends a completion: the generation config's EOS ids and the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update([configured] if isinstance(configured, int) else configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def release_memory() -> None:
    """Return a dropped model's accelerator memory before the next one loads (callers `del` their references)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_targets(model: PreTrainedModel, target_modules: Iterable[str], field: str,
                  layers: Iterable[int] | None = None) -> None:
    """Fail before any work when `field` names a linear module (matched as peft matches: the whole
    dotted name or its ending) or a decoder layer the model does not have."""
    missing = [t for t in target_modules if not _has_target(model, t)]
    if missing:
        linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
        present = sorted({name.rpartition(".")[2] for name in linear})
        raise ConfigError(f"{field}: the model has no linear module named {', '.join(missing)}; "
                          f"it has {', '.join(present)}")
    count = getattr(model.config, "num_hidden_layers", None)
    absent = [i for i in layers or () if count is not None and not 0 <= i < count]
    if absent:
        raise ConfigError(f"space.layers: the model has {count} decoder layers (0 to {count - 1}); "
                          f"there is no layer {', '.join(map(str, absent))}")


def _has_target(model: PreTrainedModel, target: str) -> bool:
    """Whether the engine's own rule (find_target_linears) finds a linear module named `target`."""
    try:
        return bool(find_target_linears(model, [target]))
    except ValueError:
        return False
