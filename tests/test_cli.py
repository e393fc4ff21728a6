"""The CLI end to end in real subprocesses: train on a subset, evaluate, plot; help for every option."""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_cli
from mnistrec.cli import build_parser, main

PICTURES = ("curves.png", "predictions.png", "confusion.png", "mistakes.png", "reliability.png")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir) -> tuple[Path, Path, str]:
    """`mnistrec train` on 3,000 images for one epoch; returns (work dir, run dir, stdout)."""
    work = tmp_path_factory.mktemp("cli-train")
    result = run_cli("train", "--data-dir", data_dir, "--limit-train", "3000", "--limit-test", "500",
                     "--epochs", "1", "--out", "runs/small", cwd=work)
    assert result.returncode == 0, result.stderr
    return work, work / "runs" / "small", result.stdout


def test_train_prints_seed_lines_and_writes_the_run(trained_run):
    work, run, stdout = trained_run
    epoch = re.search(r"^Epoch 1/1, Train Loss: ([\d.]+), Train Acc: ([\d.]+)%, Test Loss: ([\d.]+), Test Acc: ([\d.]+)%$",
                      stdout, re.M)
    assert epoch, stdout
    assert re.search(r"^Test Loss: [\d.]+, Test Acc: [\d.]+% \(\d+/500\) in [\d.]+s$", stdout, re.M)
    assert "model saved to mnist_model.pth" in stdout
    for name in ("model.pth", "last.pth", "metrics.json", "history.csv", *PICTURES):
        assert (run / name).is_file(), name
    assert (work / "mnist_model.pth").read_bytes() == (run / "model.pth").read_bytes()

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["recipe"] == "seed" and metrics["config"]["limit_train"] == 3000
    assert metrics["test"]["count"] == 500
    # The printed epoch line, history.csv and metrics.json agree.
    assert f"{100 * metrics['test']['accuracy']:.2f}" == epoch.group(4)
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert len(rows) == 1 and abs(float(rows[0]["test_accuracy"]) - metrics["test"]["accuracy"]) < 1e-12
    assert f"{100 * float(rows[0]['train_accuracy']):.2f}" == epoch.group(2)
    # Well above chance (10%) after one epoch on 3,000 images.
    assert metrics["test"]["accuracy"] > 0.8


def test_a_selection_run_with_no_test_never_reports_the_test_set(tmp_path, data_dir):
    # Choices are made on the validation split; a selection run must not show test figures a person could peek at.
    result = run_cli("train", "--data-dir", data_dir, "--limit-train", "3000", "--val-size", "500", "--epochs", "2",
                     "--no-test", "--save", "", "--out", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = result.stdout.replace("the test set was not evaluated", "").replace(str(tmp_path), "")
    assert "test" not in shown.lower(), result.stdout
    assert re.search(r"^Validation Loss: [\d.]+, Validation Acc: [\d.]+% \(epoch [12]; the test set was not evaluated\)",
                     result.stdout, re.M), result.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"] is None and metrics["best_epoch"] in (1, 2)
    assert not any((tmp_path / "run" / name).exists() for name in PICTURES[1:])  # the pictures of the test set
    rows = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    assert len(rows) == 2 and all(not row.get("test_accuracy") for row in rows)


@pytest.mark.parametrize("extra", [[], ["--val-size", "500", "--final"], ["--val-size", "500", "--ensemble-size", "2"]])
def test_no_test_without_a_single_validation_run_is_one_line_error(tmp_path, data_dir, extra):
    result = run_cli("train", "--data-dir", data_dir, "--limit-train", "1000", "--epochs", "1", "--no-test", *extra,
                     "--out", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "run").exists()
    assert result.stderr.startswith("mnistrec: error: --no-test is for a single run with a validation split")
    assert len(result.stderr.strip().splitlines()) == 1


def test_evaluate_text_and_json_match_the_run(trained_run, data_dir, capsys):
    _, run, _ = trained_run
    accuracy = json.loads((run / "metrics.json").read_text())["test"]["accuracy"]

    result = run_cli("evaluate", run / "model.pth", "--data-dir", data_dir, "--limit-test", "500", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert 0.0 <= report["accuracy"] <= 1.0
    assert report["accuracy"] == accuracy
    assert report["model"] == "mlp" and report["count"] == 500
    assert len(report["precision"]) == len(report["recall"]) == 10
    cm = report["confusion_matrix"]
    assert sum(map(sum, cm)) == 500 and sum(cm[i][i] for i in range(10)) == round(500 * accuracy)

    # The text report (in-process: the subprocess path is proven above).
    assert main(["evaluate", str(run / "model.pth"), "--data-dir", str(data_dir), "--limit-test", "500"]) == 0
    text = capsys.readouterr().out
    assert f"accuracy {100 * accuracy:.2f}%" in text and f"({round(500 * accuracy)}/500 correct)" in text
    assert "confusion matrix (rows: true digit, columns: predicted)" in text
    assert "digit  precision  recall" in text


def test_plot_redraws_five_valid_pngs(trained_run, data_dir):
    _, run, _ = trained_run
    for name in PICTURES:
        (run / name).unlink()
    result = run_cli("plot", run, "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    assert sorted(Path(line).name for line in result.stdout.split()) == sorted(PICTURES)
    for name in PICTURES:
        with Image.open(run / name) as image:
            assert image.format == "PNG"
            width, height = image.size
            image.verify()
        assert 300 <= width <= 2000 and 200 <= height <= 2000, (name, image.size)
        assert (run / name).stat().st_size < 1_000_000


def test_user_mistakes_are_one_line_errors(tmp_path, capsys, data_dir):
    assert main(["evaluate", str(tmp_path / "absent.pth"), "--data-dir", str(data_dir)]) == 2
    assert capsys.readouterr().err == f"mnistrec: error: {tmp_path / 'absent.pth'}: no such checkpoint file\n"
    assert main(["plot", str(tmp_path)]) == 2
    assert "is not a run directory: model.pth is missing" in capsys.readouterr().err
    assert main(["train", "--epochs", "0", "--data-dir", str(data_dir)]) == 2
    assert capsys.readouterr().err == "mnistrec: error: --epochs must be at least 1 (got 0)\n"


def test_models_lists_the_seed_mlp(capsys):
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    # 784*512+512 + 512*256+256 + 256*10+10
    assert rows["mlp"]["parameters"] == 535_818


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["train", "evaluate", "calibrate", "plot", "models", "download"])
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in _subcommands()[command]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS and len(action.help) > 8, action.dest
        for option in action.option_strings or [action.dest]:
            assert option in text, (command, option)
        # The first words of the explanation appear in the rendered help.
        assert " ".join(action.help.split()[:3]) in " ".join(text.split()), (command, action.dest)


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("train", "evaluate", "plot", "models", "download"):
        assert re.search(rf"^\s+{command}\s+\S", text, re.M), command
