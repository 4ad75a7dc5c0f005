"""``pyowt train``: training with a parallel strategy, checkpoints and exact resume.

- :mod:`.cli`: the command (``register`` adds it to ``pyowt``; ``main`` runs it alone);
- :mod:`.config`: :class:`TrainConfig` and its validation;
- :mod:`.loop`: :func:`run`, what every rank executes;
- :mod:`.data`, :mod:`.imagefolder`: sharded loading, ImageFolder with safety limits;
- :mod:`.checkpoint`: atomic, weights-only, K-independent checkpoints;
- :mod:`.interrupt`: Ctrl-C stops every rank after the same step (then a checkpoint);
- :mod:`.progress`, :mod:`.results`: progress bar/lines, JSON and PNG results.
"""
from .config import TrainConfig
from .errors import UserError

__all__ = ["TrainConfig", "UserError", "run_train"]


def run_train(cfg: TrainConfig) -> int:
    """Run ``cfg`` (torchrun's group if launched by it, else ``cfg.workers`` local processes);
    returns the exit status."""
    from .cli import run_train as _run

    return _run(cfg)
