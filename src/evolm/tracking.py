"""What a training run reports as it goes, for `evolm es` and `evolm grpo` alike: TensorBoard events
(and Weights & Biases when enabled) under logs/, and metrics in one line for the text log."""

from __future__ import annotations

from pathlib import Path

from evolm.config import ConfigError, LoggingConfig


def format_metrics(metrics: dict | None) -> str:
    """`reward=0.5, accuracy=0.25` for a log line ('-' for none)."""
    if not metrics:
        return "-"
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))


class Tracker:
    """TensorBoard events under logs/, and Weights & Biases when enabled."""

    def __init__(self, logging: LoggingConfig, run_config: dict, logs: Path):
        self.tensorboard = None
        self.wandb = None
        if logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(logs / "tensorboard"))
        if logging.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("logging.wandb=true needs the wandb extra: pip install 'evolm[wandb]'") from None
            self.wandb = wandb.init(project=logging.wandb_project, config=run_config, dir=str(logs))

    def log(self, metrics: dict[str, float | None], step: int) -> None:
        metrics = {k: v for k, v in metrics.items() if v is not None}
        if self.tensorboard:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
