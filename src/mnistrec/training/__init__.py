"""Training: recipes, the loop, the run directory, ``--final`` and ensembles.

One home per concern (read them in this order):

* :mod:`~mnistrec.training.config`: :class:`TrainConfig`, the named ``RECIPES``, validation of every option.
* :mod:`~mnistrec.training.split`: the training / validation / test tensors a run sees.
* :mod:`~mnistrec.training.optim`: optimiser, learning-rate schedule, weight EMA, augmentation.
* :mod:`~mnistrec.training.state`: :class:`TrainingState` (``last.pth``), the best epoch, :class:`TrainResult`.
* :mod:`~mnistrec.training.loop`: :func:`train`, one :func:`train_epoch` and :func:`score_epoch` at a time.
* :mod:`~mnistrec.training.rundir`: what a run writes, resume options, the copy of the model.
* :mod:`~mnistrec.training.final`: ``--final`` (choose the epoch count on validation, retrain on all).
* :mod:`~mnistrec.training.ensemble`: several seeds, evaluated together once.

Device choice lives in :mod:`mnistrec.devices`, multi-process training in :mod:`mnistrec.distributed`.
"""

from ..devices import channels_last_helps, resolve_device
from .config import RECIPES, TrainConfig, make_config, recipe_names
from .ensemble import EnsembleResult, ensemble_probabilities, member_view_probabilities, train_ensemble
from .final import train_final
from .loop import NonFiniteLoss, format_epoch, score_epoch, train, train_epoch
from .optim import build_optimizer, build_scheduler, ema_update
from .rundir import RUN_OPTIONS, copy_model, resume_config, resume_options, write_run, write_run_options
from .split import Split, split_data, test_split
from .state import BestEpoch, TrainingState, TrainResult

__all__ = [
    "RECIPES", "RUN_OPTIONS", "BestEpoch", "EnsembleResult", "NonFiniteLoss", "Split", "TrainConfig", "TrainResult",
    "TrainingState", "build_optimizer", "build_scheduler", "channels_last_helps", "copy_model", "ema_update",
    "ensemble_probabilities", "format_epoch", "make_config", "member_view_probabilities", "recipe_names",
    "resolve_device", "resume_config", "resume_options", "score_epoch", "split_data", "test_split", "train",
    "train_ensemble", "train_epoch", "train_final", "write_run", "write_run_options",
]
