"""Ensembles: ``ensemble_size`` ordinary runs with consecutive seeds, evaluated together once.

Each member is a run directory ``RUN_DIR/memberI`` of its own (resumable on its
own). After the last member the test set is evaluated once: every member
alone, the averaged-softmax ensemble and, with ``tta``, the ensemble over
shifted views of every image.

Members are independent, so under torchrun (``--nproc_per_node K``, one node or
several) the ranks split the members, not the data: rank ``r`` trains members
``r, r + K, ...`` alone, each exactly as the sequential run would (same seed, same
code, no DDP; same bits for the same thread count), in its own ``RUN_DIR/memberI``.
Rank 0 gathers the weights over the process group, scores the ensemble and alone
logs and writes the run. A rank resumes its members from its own directory.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import distributed
from ..checkpoint import library_versions, save_checkpoint
from ..data import MNIST, to_float
from ..devices import resolve_device
from ..models import create_model
from ..fileio import atomic_write_text
from .config import TrainConfig
from .final import resume_or_train, train_final
from .rundir import completed
from .split import split_data, test_split


@dataclass
class EnsembleResult:
    """What :func:`train_ensemble` returns: one model holding every member, and the test report."""

    model: nn.Module  # an ``ensemble`` model holding every member
    config: TrainConfig
    members: list[dict[str, Any]]  # per member: seed, best epoch, seconds, validation and test accuracy
    metrics: dict[str, Any]  # "ensemble" (and "ensemble_tta") test metrics
    run_dir: Path | None
    seconds: float
    world_size: int = 1  # processes that trained the members (torchrun)


def member_view_probabilities(models: list[nn.Module], images: torch.Tensor, tta: bool, batch_size: int = 1000,
                              device: str | torch.device = "cpu") -> torch.Tensor:
    """Softmax of every model on every view: ``[models, views, N, 10]``; view 0 is the images themselves.

    With ``tta`` the views are the images and their four 1-pixel shifts, so one
    pass gives each member alone, the plain ensemble and the TTA ensemble.
    """
    from ..augment import tta_views
    from ..evaluate import predict_logits

    if images.dtype == torch.uint8:
        images = to_float(images)
    views = tta_views(images) if tta else [images]
    return torch.stack([
        torch.stack([predict_logits(model, view, batch_size, device).softmax(1) for view in views]) for model in models
    ])


def ensemble_probabilities(models: list[nn.Module], images: torch.Tensor, tta: bool, batch_size: int = 1000,
                           device: str | torch.device = "cpu") -> torch.Tensor:
    """Softmax averaged over ``models`` (and, with ``tta``, over shifted views of every image)."""
    return member_view_probabilities(models, images, tta, batch_size, device).mean((0, 1))


def train_ensemble(
    config: TrainConfig,
    data: MNIST,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    final: bool = False,
) -> EnsembleResult | None:
    """Train ``ensemble_size`` members (seeds ``seed``, ``seed + 1``, …) and evaluate them together.

    Each member is an ordinary run in ``RUN_DIR/memberI`` (resumable on its
    own; finished members are reused on ``resume``). After the last one, the
    test set is evaluated once: every member alone, the averaged-softmax
    ensemble, and with ``tta`` the ensemble over shifted views. The validation
    split gets the same report so TTA can be judged without the test set.

    Under torchrun the ranks share the members out (see the module's docstring);
    rank 0 returns the result, the other ranks ``None``. The caller ends the
    process group (:func:`mnistrec.distributed.shutdown`).
    """
    from ..models import Ensemble

    start_time = time.perf_counter()
    run_dir = Path(run_dir) if run_dir else None
    ctx = distributed.setup(resolve_device(config.device))
    if not ctx.is_main:  # rank 0 alone logs; every rank writes its own members' directories
        log, progress = (lambda _: None), False
    mine = _train_members(config, data, run_dir, resume, progress, log, final, ctx)
    gathered = _gather_members(config, mine, ctx)
    if gathered is None:
        return None
    if ctx.enabled:
        log(f"gathered {len(gathered)} members from {ctx.world_size} processes")
    models, members = [gathered[i][0] for i in sorted(gathered)], [gathered[i][1] for i in sorted(gathered)]
    metrics = _score_members(config, data, models, members, ctx.device, final)
    _log_scores(members, metrics, log)

    ensemble = Ensemble(config.model, len(models), config.model_kwargs)
    for slot, model in zip(ensemble.members, models):
        slot.load_state_dict(model.state_dict())
    ensemble.eval()
    seconds = time.perf_counter() - start_time
    result = EnsembleResult(ensemble, config, members, metrics, run_dir, seconds, ctx.world_size)
    if run_dir:
        _write_ensemble_run(result, data, final)
    return result


_Members = dict[int, tuple[nn.Module, dict[str, Any]]]  # member index -> (model, report row)


def _train_members(config: TrainConfig, data: MNIST, run_dir: Path | None, resume: bool, progress: bool,
                   log: Callable[[str], None], final: bool, ctx: distributed.DistContext) -> _Members:
    """Train (or, when resuming, reuse the finished) members of this rank; their models and one report row each."""
    from ..checkpoint import load_checkpoint

    mine: _Members = {}
    for i in range(ctx.rank, config.ensemble_size, ctx.world_size):
        member_config = dataclasses.replace(config, seed=config.seed + i, ensemble_size=1, tta=False)
        member_dir = run_dir / f"member{i}" if run_dir else None
        log(f"ensemble member {i + 1}/{config.ensemble_size} (seed {member_config.seed})")
        if resume and completed(member_dir):
            summary = json.loads((member_dir / "metrics.json").read_text())
            model = load_checkpoint(member_dir / "model.pth").model
            best_epoch, seconds = summary["best_epoch"], summary["seconds"]
        else:
            trainer = train_final if final else resume_or_train
            result = trainer(member_config, data, member_dir, resume, progress, log, evaluate_test=False, ddp=False)
            model, best_epoch, seconds = result.model, result.best_epoch, result.seconds
        row = {"member": i, "seed": member_config.seed, "best_epoch": best_epoch, "seconds": round(seconds, 3),
               "rank": ctx.rank}
        mine[i] = (model.eval(), row)
    return mine


def _gather_members(config: TrainConfig, mine: _Members, ctx: distributed.DistContext) -> _Members | None:
    """Every rank's members on rank 0 (weights sent as CPU tensors over the process group); ``None`` elsewhere."""
    if not ctx.enabled:
        return mine
    sent = {i: ({k: v.detach().cpu() for k, v in model.state_dict().items()}, row) for i, (model, row) in mine.items()}
    gathered = ctx.gather(sent)
    if gathered is None:
        return None
    members: _Members = {}
    for part in gathered:
        for i, (state_dict, row) in part.items():
            if i in mine:  # trained here: keep the model as it is
                members[i] = mine[i]
                continue
            model = create_model(config.model, **config.model_kwargs).to(ctx.device)
            model.load_state_dict(state_dict)
            members[i] = (model.eval(), row)
    return members


def _score_members(config: TrainConfig, data: MNIST, models: list[nn.Module], members: list[dict[str, Any]],
                   device: torch.device, final: bool) -> dict[str, Any]:
    """The one and only look at the test set (and a matching report on validation).

    Adds ``val_accuracy``/``test_accuracy`` to each member's row; returns the
    ensemble's test metrics (``ensemble``, ``ensemble_tta``) and validation
    accuracies (``ensemble_val``, ``ensemble_tta_val``). With a validation split
    the ensemble's temperature is fitted there (``calibration``) and the test
    metrics are those of the calibrated ensemble.
    """
    from ..calibration import calibration_record
    from ..evaluate import metrics_from_logits

    split = split_data(data, config)
    test_x, test_y = test_split(data, config)
    metrics: dict[str, Any] = {}
    temperature = 1.0
    for name, images, labels in (("val", split.val_x, split.val_y), ("test", test_x, test_y)):
        if images is None or final and name == "val":  # final members trained on the validation images
            continue
        probabilities = member_view_probabilities(models, images, config.tta, config.eval_batch_size, device)
        for member_probabilities, row in zip(probabilities, members):
            row[f"{name}_accuracy"] = float((member_probabilities[0].argmax(1) == labels).double().mean())
        variants = {"ensemble": probabilities[:, 0].mean(0)}
        if config.tta:
            variants["ensemble_tta"] = probabilities.mean((0, 1))
        if name == "val":
            metrics["calibration"] = calibration_record(variants["ensemble"].clamp_min(1e-12).log(), labels,
                                                        f"validation split: {len(labels)} training images, "
                                                        f"split_seed {config.split_seed}")
            temperature = metrics["calibration"]["temperature"]
        for key, averaged in variants.items():
            result_metrics = metrics_from_logits(averaged.clamp_min(1e-12).log() / temperature, labels)
            metrics[key if name == "test" else f"{key}_val"] = result_metrics if name == "test" else result_metrics["accuracy"]
    return metrics


def _log_scores(members: list[dict[str, Any]], metrics: dict[str, Any], log: Callable[[str], None]) -> None:
    for row in members:
        log(f"member {row['member']} (seed {row['seed']}): " + ", ".join(
            f"{k} {100 * row[k]:.2f}%" for k in ("val_accuracy", "test_accuracy") if k in row))
    for key in ("ensemble", "ensemble_tta"):
        if key in metrics:
            val = metrics.get(f"{key}_val")
            log(f"{key}: test {100 * metrics[key]['accuracy']:.2f}%" + (f", val {100 * val:.2f}%" if val is not None else ""))


def _write_ensemble_run(result: EnsembleResult, data: MNIST, final: bool) -> None:
    """``model.pth`` (every member in one ``ensemble`` model) and ``metrics.json`` in the run directory."""
    config, members, metrics, run_dir = result.config, result.members, result.metrics, result.run_dir
    assert run_dir is not None
    kwargs = {"member": config.model, "size": len(members), "member_kwargs": config.model_kwargs}
    save_checkpoint(run_dir / "model.pth", "ensemble", kwargs, result.model, recipe=config.recipe,
                    config=config.to_dict(), members=members, data_checksums=data.checksums(),
                    metrics={k: v for k, v in metrics["ensemble"].items()
                             if k in ("loss", "accuracy", "count", "errors", "ece", "nll")},
                    **({"calibration": metrics["calibration"]} if metrics.get("calibration") else {}))
    summary = {"recipe": config.recipe, "model": "ensemble", "config": config.to_dict(), "final": final,
               "members": members, "test": metrics["ensemble"], "test_tta": metrics.get("ensemble_tta"),
               "val_accuracy": metrics.get("ensemble_val"), "val_accuracy_tta": metrics.get("ensemble_tta_val"),
               "calibration": metrics.get("calibration"),
               "seconds": round(result.seconds, 3), "world_size": result.world_size, "versions": library_versions(),
               "data_checksums": data.checksums()}
    atomic_write_text(run_dir / "metrics.json", json.dumps(summary, indent=2))
