"""The fine-tuning job behind ``lomo-kernels train``: data, tokenizer, model presets, checkpoints, loop."""
from .errors import UsageError
from .trainer import TrainingDiverged, run_training

__all__ = ["UsageError", "TrainingDiverged", "run_training"]
