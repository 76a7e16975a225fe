"""Training: the AGD loop (trainer.py), train/eval steps (step.py), task sampling (agd.py),
checkpoints and metrics. `train_and_evaluate(config, workdir)` is the entry point."""
from moe_jax.train.trainer import TrainingError, evaluate, train_and_evaluate

__all__ = ["TrainingError", "evaluate", "train_and_evaluate"]
