"""The public names of :mod:`mnistrec.training`, where the training code lives.

Kept so that ``from mnistrec.train import make_config, train`` (the README, the
notebook, scripts written against earlier versions) keeps working.
"""

from .training import (  # noqa: F401 - re-exported
    BestEpoch, build_optimizer, build_scheduler, channels_last_helps, copy_model, ema_update, ensemble_probabilities,
    EnsembleResult, format_epoch, make_config, member_view_probabilities, NonFiniteLoss, recipe_names, RECIPES,
    resolve_device, resume_config, resume_options, RUN_OPTIONS, score_epoch, Split, split_data, test_split, train,
    train_ensemble, train_epoch, train_final, TrainConfig, TrainingState, TrainResult, write_run, write_run_options,
)
from .training import __all__  # noqa: F401
