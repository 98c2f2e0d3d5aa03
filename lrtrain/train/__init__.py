"""Training components: the loop, schedule, checkpoints, logging and the comparison report."""

from .checkpoint import latest_complete_checkpoint, load_checkpoint, save_checkpoint, verify_checkpoint
from .logger import RunLogger
from .loop import Trainer, TrainSettings, causal_lm_loss
from .schedule import build_scheduler, warmup_cosine

__all__ = [
    "RunLogger",
    "TrainSettings",
    "Trainer",
    "build_scheduler",
    "causal_lm_loss",
    "latest_complete_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
    "warmup_cosine",
]
