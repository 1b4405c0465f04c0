"""Tiny run configs for the tests of `evolm es` and `evolm grpo`, written as YAML."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

LETTER_TASK = "helpers.letter_task:LetterTask"
# A 2-generation lora run of 4 members writing 4 tokens, never evaluated in between: what the tests of
# failures and of run-folder safety start from.
SMALL_ES_RUN = {"space": {"rank": 2, "target_modules": ["q_proj", "v_proj"]},
                "es": {"generations": 2, "population": 4}, "decoding": {"max_new_tokens": 4},
                "eval": {"every": 0}, "logging": {"progress": False, "tensorboard": False}}


def write_config(path: Path, model: Path, out: Path, defaults: dict, **sections) -> Path:
    """A run of `model` on the letter task writing to `out`, with `defaults` and then `sections` merged in (a
    mapping updates its section, anything else replaces it)."""
    config = {"output_dir": str(out), "model": {"name_or_path": str(model)}, "task": {"name": LETTER_TASK},
              "logging": {"progress": False}}
    for layer in (defaults, sections):
        for name, values in copy.deepcopy(layer).items():
            if isinstance(values, dict) and isinstance(config.get(name), dict):
                config[name].update(values)
            else:
                config[name] = values
    path.write_text(yaml.safe_dump(config))
    return path
