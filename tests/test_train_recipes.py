"""Training-side of the accuracy work on tiny data: CNNs learn, validation-only selection,
early stopping, --final, ensembles (with TTA) and their resume state, CLI errors.

Every run here uses a few hundred to a few thousand images: the full-size
recipes are measured by benchmarks/bench_recipes.py, not by tests.
"""

import json
import shutil

import pytest
import torch

from conftest import run_cli
from mnistrec.checkpoint import load_checkpoint, read_checkpoint
from mnistrec.errors import MnistrecError
from mnistrec.evaluate import evaluate
from mnistrec.train import BestEpoch, RECIPES, ensemble_probabilities, make_config, train, train_ensemble, train_final

QUIET = {"progress": False, "log": lambda _: None}
TINY = {"limit_train": 700, "limit_test": 300, "val_size": 200, "threads": 1}


def test_seed_recipe_is_untouched_and_the_accuracy_recipes_test_once_on_all_training_images():
    assert RECIPES["seed"] == {}
    seed = make_config("seed")
    assert (seed.model, seed.optimizer, seed.lr, seed.batch_size, seed.epochs, seed.val_size) == ("mlp", "adam", 1e-3, 64, 5, 0)
    for name in ("fast", "best", "ensemble"):
        config = make_config(name)
        assert config.val_size == 0 and not config.epoch_test and config.model.startswith("cnn")
    assert make_config("ensemble").ensemble_size >= 3


def test_small_cnn_learns_on_a_tiny_subset(mnist):
    config = make_config("fast", epochs=2, limit_train=1500, limit_test=500, val_size=300, batch_size=64, threads=1)
    result = train(config, mnist, None, **QUIET)
    assert result.metrics["accuracy"] > 0.6  # chance is 0.1
    assert result.history[-1]["val_accuracy"] > 0.6
    assert "test_accuracy" not in result.history[-1]  # the test set is not looked at per epoch


def test_best_epoch_selection_prefers_accuracy_then_loss():
    model = torch.nn.Linear(2, 2)
    best = BestEpoch()
    assert best.update({"epoch": 1, "val_accuracy": 0.9, "val_loss": 0.5}, model)
    assert not best.update({"epoch": 2, "val_accuracy": 0.8, "val_loss": 0.1}, model)
    assert best.update({"epoch": 3, "val_accuracy": 0.9, "val_loss": 0.4}, model)
    assert best.epoch == 3 and not best.should_stop(4, 2) and best.should_stop(5, 2) and not best.should_stop(9, 0)


def _stalled(**extra):
    # An MLP with a vanishing learning rate: validation never improves after epoch 1.
    return make_config("seed", optimizer="sgd", lr=1e-12, epochs=5, early_stop=2, epoch_test=False, **TINY, **extra)


def test_early_stopping_keeps_the_best_epoch_and_is_restored_on_resume(mnist, tmp_path):
    result = train(_stalled(), mnist, tmp_path, **QUIET)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert result.stopped_early and result.best_epoch == 1
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["best_epoch"] == 1 and summary["stopped_early"] is True
    state = read_checkpoint(tmp_path / "last.pth")
    assert state["best"]["epoch"] == 1 and state["stopped_early"] is True
    # Resuming a stopped run trains no further.
    again = train(_stalled(), mnist, tmp_path, resume=True, **QUIET)
    assert len(again.history) == 3 and again.best_epoch == 1


def test_interrupted_run_resumes_to_the_same_selected_weights(mnist, tmp_path):
    config = make_config("fast", model="mlp", epochs=3, batch_size=100, **TINY)
    whole = train(config, mnist, tmp_path / "whole", **QUIET)

    def stop_after_epoch_two(line):
        if line.startswith("Epoch 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, mnist, tmp_path / "cut", progress=False, log=stop_after_epoch_two)
    assert read_checkpoint(tmp_path / "cut" / "last.pth")["epoch"] == 1
    resumed = train(config, mnist, tmp_path / "cut", resume=True, **QUIET)
    assert resumed.best_epoch == whole.best_epoch
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert resumed.metrics["accuracy"] == whole.metrics["accuracy"]


def test_final_retrains_on_every_training_image_for_the_chosen_epochs(mnist, tmp_path):
    config = make_config("fast", model="mlp", epochs=4, early_stop=1, batch_size=100, **TINY)
    result = train_final(config, mnist, tmp_path, **QUIET)
    selection = json.loads((tmp_path / "selection" / "metrics.json").read_text())
    assert selection["test"] is None  # the selection run never saw the test set
    assert result.config.epochs == selection["best_epoch"] == len(result.history)
    assert result.config.val_size == 0 and result.config.early_stop == 0
    assert all("val_accuracy" not in row and "test_accuracy" not in row for row in result.history)
    assert 0.5 < result.metrics["accuracy"] <= 1 and result.metrics["count"] == 300
    with pytest.raises(MnistrecError, match="--final needs a validation split"):
        train_final(make_config("seed", epochs=1, limit_train=100), mnist, tmp_path / "x", **QUIET)


def test_ensemble_reports_members_and_averaged_softmax_and_resumes(mnist, tmp_path):
    config = make_config("ensemble", model="mlp", augment="none", epochs=1, ensemble_size=2, batch_size=100, **TINY)
    result = train_ensemble(config, mnist, tmp_path, **QUIET)
    assert [m["seed"] for m in result.members] == [42, 43]
    assert all(0 < m["test_accuracy"] <= 1 and 0 < m["val_accuracy"] <= 1 for m in result.members)
    assert {"ensemble", "ensemble_tta"} <= set(result.metrics)
    # The saved checkpoint is one `ensemble` model whose accuracy is the reported one.
    loaded = load_checkpoint(tmp_path / "model.pth")
    assert loaded.model_name == "ensemble" and len(loaded.model.members) == 2
    test_x, test_y = mnist.test_images[:300], mnist.test_labels[:300]
    assert evaluate(loaded.model, test_x, test_y)["accuracy"] == result.metrics["ensemble"]["accuracy"]
    # Its temperature was fitted on the validation split, and the reported test NLL is the calibrated ensemble's.
    assert loaded.temperature == result.metrics["calibration"]["temperature"] != 1.0
    assert "validation split: 200" in loaded.meta["calibration"]["fitted_on"]
    calibrated_metrics = evaluate(loaded.inference_model, test_x, test_y)
    assert calibrated_metrics["nll"] == pytest.approx(result.metrics["ensemble"]["nll"], rel=1e-4)
    members = [m for m in loaded.model.members]
    probs = ensemble_probabilities(members, test_x, tta=True)
    assert float((probs.argmax(1) == test_y).double().mean()) == result.metrics["ensemble_tta"]["accuracy"]
    # Member seeds live in each member's own resume state; finished members are reused.
    assert read_checkpoint(tmp_path / "member1" / "last.pth")["config"]["seed"] == 43
    mtime = (tmp_path / "member0" / "model.pth").stat().st_mtime_ns
    again = train_ensemble(config, mnist, tmp_path, resume=True, **QUIET)
    assert (tmp_path / "member0" / "model.pth").stat().st_mtime_ns == mtime
    assert again.metrics["ensemble"]["accuracy"] == result.metrics["ensemble"]["accuracy"]


def test_ensemble_member_is_the_best_recipe_with_its_seed(mnist, tmp_path):
    # bench_recipes.py reports `best` from the ensemble's members instead of training it again: that is
    # only fair if member I is exactly `--recipe best --seed SEED+I` (same data order, augmentation, EMA).
    tiny = dict(model="cnn-lite", epochs=1, batch_size=100, **TINY)
    ensemble = train_ensemble(make_config("ensemble", ensemble_size=2, **tiny), mnist, tmp_path / "ensemble", **QUIET)
    alone = train(make_config("best", seed=43, **tiny), mnist, tmp_path / "best", **QUIET)
    member = load_checkpoint(tmp_path / "ensemble" / "member1" / "model.pth").model.state_dict()
    assert member.keys() == alone.model.state_dict().keys()
    assert all(torch.equal(member[k], v) for k, v in alone.model.state_dict().items())
    assert ensemble.members[1]["test_accuracy"] == alone.metrics["accuracy"]


def test_cli_errors_for_unknown_names_are_one_line_and_list_the_choices(data_dir):
    cases = {
        ("--model", "resnet9000"): "unknown model 'resnet9000'; choose from: cnn-lite, cnn-small, cnn-vgg, cnn-wide, ensemble, mlp",
        ("--augment", "mixup"): "unknown augmentation 'mixup'; choose from: none, shift, affine, affine+elastic",
        ("--recipe", "turbo"): "invalid choice: 'turbo' (choose from 'seed', 'fast', 'best', 'ensemble')",
    }
    for args, message in cases.items():
        result = run_cli("train", "--data-dir", data_dir, *args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert message in lines[-1] and "Traceback" not in result.stderr


def test_inconsistent_options_are_refused_with_one_line_errors(mnist):
    with pytest.raises(MnistrecError, match="--early-stop needs a validation split"):
        make_config("seed", early_stop=2)
    with pytest.raises(MnistrecError, match="--ensemble-size must be at least 1"):
        make_config("ensemble", ensemble_size=0)
    with pytest.raises(MnistrecError, match="onecycle needs at least 4 steps"):
        train(make_config("fast", epochs=1, limit_train=300, val_size=100, batch_size=128), mnist, None, **QUIET)


def test_cli_final_run_writes_a_loadable_cnn(data_dir, tmp_path):
    result = run_cli("train", "--recipe", "fast", "--final", "--epochs", "1", "--limit-train", "600", "--limit-test", "200", "--batch-size", "50",
                     "--val-size", "100", "--threads", "1", "--data-dir", data_dir, "--out", tmp_path / "run",
                     "--save", tmp_path / "model.pth", "--no-plots", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "final run: 1 epochs" in result.stdout and "Test Acc:" in result.stdout
    assert load_checkpoint(tmp_path / "model.pth").model_name == "cnn-lite"


def test_recipe_benchmark_collects_runs_into_json_and_plot(mnist, tmp_path):
    import subprocess
    import sys

    from conftest import REPO, cli_env

    work = tmp_path / "bench"
    tiny = dict(epochs=1, batch_size=100, **TINY)
    train(make_config("seed", **{**tiny, "val_size": 0}), mnist, work / "seed", **QUIET)
    train_ensemble(make_config("ensemble", model="mlp", augment="none", **tiny), mnist, work / "ensemble", **QUIET)
    train(make_config("fast", model="mlp", **tiny), mnist, work / "fast-seed42", **QUIET)
    results, picture = tmp_path / "recipes.json", tmp_path / "recipes.png"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_recipes.py"), "--collect", "--work-dir", work,
                           "--recipes", "seed,ensemble", "--separate-fast", "--fast-seeds", "42,43", "--results", results,
                           "--plot", picture, "--note", "shared"],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(results.read_text())
    recipes = report["recipes"]
    members = json.loads((work / "ensemble" / "metrics.json").read_text())["members"]
    # `best` was not run by name: its row is the mean over the ensemble's members (each a `best` run with its seed).
    assert recipes["best"]["seeds"] == [42, 43, 44, 45, 46]
    assert recipes["best"]["test_accuracy"]["values"] == [m["test_accuracy"] for m in members]
    assert recipes["best"]["wall_seconds"]["mean"] == pytest.approx(sum(m["seconds"] for m in members) / 5)
    fast_run = json.loads((work / "fast-seed42" / "metrics.json").read_text())
    assert recipes["fast"]["test_accuracy"]["values"] == [fast_run["test"]["accuracy"]]  # seed 43 never ran
    assert recipes["fast"]["incomplete"] == ["fast-seed43"]
    assert recipes["ensemble"]["vs_seed"]["time_ratio"] > 0
    assert report["machine"]["cpu_count"] and report["machine"]["torch"] and picture.stat().st_size > 10_000
    # Every run is judged against issue 17's targets: tiny runs meet none of the accuracy bars.
    assert report["targets"]["best"]["min_test_accuracy"] == 0.997
    assert recipes["best"]["runs"]["best-seed44"]["meets"] == {"min_test_accuracy": False, "max_train_seconds": True}
    assert recipes["fast"]["runs"]["fast-seed42"]["meets"] == {"min_test_accuracy": False}  # no plain loop in --collect
    assert recipes["ensemble"]["meets"] == {"min_test_accuracy": False}


def test_recipe_benchmark_runs_the_ensemble_under_torchrun(data_dir, tmp_path):
    """`--ensemble-procs 2`: torchrun starts 2 processes on this machine, they share out the members, and the
    JSON says how the ensemble ran (its `best` rows come from members trained on both ranks)."""
    import subprocess
    import sys

    from conftest import REPO, cli_env

    results = tmp_path / "recipes.json"
    tiny = "--limit-train 600 --limit-test 200 --epochs 1 --model mlp --augment none --ensemble-size 2 --batch-size 100"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_recipes.py"), "--recipes", "ensemble",
                           "--ensemble-procs", "2", "--threads", "1", "--no-plain-loop", "--train-args", tiny,
                           "--data-dir", str(data_dir), "--work-dir", tmp_path / "bench", "--results", results,
                           "--plot", tmp_path / "recipes.png"],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ensemble = json.loads(results.read_text())["recipes"]["ensemble"]
    assert ensemble["command"].startswith("torchrun --standalone --nproc_per_node 2 -m mnistrec train --recipe ensemble")
    assert (ensemble["processes"], ensemble["threads_per_process"]) == (2, 1)
    assert [(m["member"], m["rank"]) for m in ensemble["members"]] == [(0, 0), (1, 1)]
    assert json.loads((tmp_path / "bench" / "ensemble" / "metrics.json").read_text())["world_size"] == 2
    best = json.loads(results.read_text())["recipes"]["best"]
    assert "1 thread(s) in one of 2 processes" in best["source"] and best["seeds"] == [42, 43]


def test_recipe_benchmark_judges_each_seed_and_the_mean():
    """`fast` is judged on its mean accuracy and on every run's time; `best` on every seed and on its mean."""
    import importlib
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    bench = importlib.import_module("bench_recipes")

    def run(accuracy, seconds, ratio=None):
        row = {"test_accuracy": accuracy, "train_seconds": seconds, "wall_seconds": seconds + 3}
        return {**row, "vs_plain_loop": ratio} if ratio is not None else row

    recipes = {
        "seed": {**run(0.98, 10.0, 0.9)},
        "fast": bench.per_seed("fast", {"fast-seed42": run(0.9958, 50.0, 3.5), "fast-seed43": run(0.9964, 52.0, 4.1),
                                        "fast-seed44": run(0.9962, 51.0, 3.6)}),
        "best": bench.per_seed("best", {"best-seed42": run(0.9976, 700.0), "best-seed43": run(0.9969, 950.0)}),
    }
    bench.judge(recipes)
    assert recipes["seed"]["meets"] == {"max_vs_plain_loop": True}
    # The seed recipe, run three times after its own plain loop each: the median ratio is reported, with all three.
    repeats = [{**run(0.98, seconds, ratio), "plain_loop_seconds": seconds / ratio}
               for seconds, ratio in ((10.0, 1.10), (9.0, 0.90), (9.5, 0.95))]
    median = bench.median_seed_run(repeats)
    assert median["train_seconds"] == 9.5 and [r["vs_plain_loop"] for r in median["repeats"]] == [0.90, 0.95, 1.10]
    # Five runs, one failed: of the two middle ratios of the four left, the upper (less flattering) one; the failure is said.
    failed = {"recipe": "seed", "incomplete": "exit code 1", "plain_loop_seconds": [10.0]}
    median = bench.median_seed_run([*repeats, failed, {**run(0.98, 8.0, 0.80), "plain_loop_seconds": 10.0}])
    assert median["vs_plain_loop"] == 0.95 and median["incomplete"] == ["exit code 1"]
    median = bench.median_seed_run([failed, repeats[0]])  # one finished run: that one, not the failed one
    assert median["vs_plain_loop"] == 1.10 and median["incomplete"] == ["exit code 1"]
    fast = recipes["fast"]
    assert fast["runs"]["fast-seed42"]["meets"] == {"min_test_accuracy": False, "max_vs_plain_loop": True}
    assert fast["meets"] == {"min_test_accuracy": True, "max_vs_plain_loop": False}  # mean 99.613%; seed 43 took 4.1x
    best = recipes["best"]
    assert best["runs"]["best-seed42"]["meets"] == {"min_test_accuracy": True, "max_train_seconds": True}
    assert best["meets"] == {"min_test_accuracy": False, "max_train_seconds": False, "min_mean_test_accuracy": False}


def test_cli_resume_of_ensemble_and_final_runs_needs_no_other_flag(data_dir, tmp_path):
    """Ensembles and --final runs keep their state in sub-folders; `--resume RUN_DIR` alone must still continue them.

    The interruption is reproduced as the files a kill leaves: the first member (or the selection run)
    finished, nothing of the later stage written yet.
    """
    common = ["--epochs", "1", "--limit-train", "600", "--limit-test", "200", "--batch-size", "50",
              "--val-size", "100", "--threads", "1", "--data-dir", data_dir, "--no-plots", "--quiet", "--save", ""]
    ensemble_dir = tmp_path / "ensemble"
    first = run_cli("train", "--recipe", "ensemble", "--ensemble-size", "2", "--no-tta", "--out", ensemble_dir, *common)
    assert first.returncode == 0, first.stderr
    member1_model = (ensemble_dir / "member1" / "model.pth").read_bytes()
    shutil.rmtree(ensemble_dir / "member1")
    for name in ("model.pth", "metrics.json"):
        (ensemble_dir / name).unlink()
    resumed = run_cli("train", "--resume", ensemble_dir, "--data-dir", data_dir, "--no-plots", "--quiet", "--save", "")
    assert resumed.returncode == 0, resumed.stderr
    assert "Ensemble of 2" in resumed.stdout
    assert "member 1/2" in resumed.stdout and "member 2/2" in resumed.stdout
    # The member that was lost is retrained with its own seed and comes out the same.
    assert torch.equal(load_checkpoint(ensemble_dir / "member1" / "model.pth").model.state_dict()["classifier.weight"],
                       _state_from_bytes(member1_model)["classifier.weight"])
    assert load_checkpoint(ensemble_dir / "model.pth").model_name == "ensemble"

    final_dir = tmp_path / "final"
    first = run_cli("train", "--recipe", "fast", "--final", "--out", final_dir, *common)
    assert first.returncode == 0, first.stderr
    for name in ("last.pth", "model.pth", "metrics.json", "history.csv"):
        (final_dir / name).unlink()
    resumed = run_cli("train", "--resume", final_dir, "--data-dir", data_dir, "--no-plots", "--quiet", "--save", "")
    assert resumed.returncode == 0, resumed.stderr
    assert "final run: 1 epochs" in resumed.stdout and "Test Acc:" in resumed.stdout
    assert load_checkpoint(final_dir / "model.pth").meta["config"]["val_size"] == 0


def _state_from_bytes(raw: bytes) -> dict:
    import io

    return torch.load(io.BytesIO(raw), weights_only=True)["state_dict"]
