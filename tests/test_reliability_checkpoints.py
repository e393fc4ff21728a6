"""Safe checkpoint loading: a real malicious pickle never runs, and every broken file is
refused with one line (exit 2 from the CLI, no traceback).

Each malicious file is first shown to be live: plain ``torch.load(weights_only=False)``
really creates the marker file. Only then is our loader checked to refuse it.
"""

from __future__ import annotations

import os
import random
import shlex
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from mnistrec.checkpoint import load_checkpoint, read_checkpoint
from mnistrec.cli import main
from mnistrec.errors import CheckpointError
from mnistrec.models import create_model, model_names


class ShellPayload:
    """Unpickling this runs ``touch MARKER`` through os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class TouchPayload:
    """Unpickling this calls pathlib.Path.touch(MARKER) directly, no shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _malicious(tmp_path: Path, kind: str, placement: str, real_checkpoint: Path) -> tuple[Path, Path]:
    marker = tmp_path / f"pwned-{kind}-{placement}"
    payload = (ShellPayload if kind == "os.system" else TouchPayload)(marker)
    path = tmp_path / f"evil-{kind}-{placement}.pth"
    if placement == "whole file":
        torch.save(payload, path)
    elif placement == "nested beside real weights":
        good = torch.load(real_checkpoint, weights_only=True)
        good["meta"] = {"notes": ["trained on MNIST", payload]}
        torch.save(good, path)
    else:  # the pre-1.6 (non-zip) torch format, which has no zip container at all
        torch.save({"state_dict": payload}, path, _use_new_zipfile_serialization=False)
    return path, marker


PLACEMENTS = ["whole file", "nested beside real weights", "legacy format"]


@pytest.mark.parametrize("kind", ["os.system", "Path.touch"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, mlp_checkpoint, kind, placement):
    path, marker = _malicious(tmp_path, kind, placement, mlp_checkpoint)
    # Control: the file is a live exploit for an unsafe loader.
    torch.load(path, weights_only=False)
    assert marker.exists(), "the crafted pickle should run code under weights_only=False"
    marker.unlink()

    for load in (load_checkpoint, read_checkpoint):
        with pytest.raises(CheckpointError) as info:
            load(path)
        message = str(info.value)
        assert "\n" not in message and "refused" in message and str(path) in message
    assert not marker.exists()


def test_cli_refuses_a_malicious_checkpoint_in_a_fresh_process(tmp_path, mlp_checkpoint, data_dir):
    path, marker = _malicious(tmp_path, "os.system", "nested beside real weights", mlp_checkpoint)
    result = run_cli("evaluate", path, "--limit-test", "10", cwd=tmp_path, MNIST_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1")
    assert result.returncode == 2
    assert result.stderr.startswith("mnistrec: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "refused to load" in result.stderr and "posix.system" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not marker.exists()


def test_resume_refuses_a_malicious_training_state(tmp_path, mlp_checkpoint):
    from mnistrec.train import resume_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path, marker = _malicious(tmp_path, "Path.touch", "nested beside real weights", mlp_checkpoint)
    path.rename(run_dir / "last.pth")
    with pytest.raises(CheckpointError, match="refused"):
        resume_config(run_dir)
    assert not marker.exists()


def _cli_error(capsys, *argv: str) -> str:
    """Run the real CLI entry point; it must exit 2 with exactly one ``mnistrec: error:`` line."""
    code = main(list(map(str, argv)))
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.startswith("mnistrec: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    return captured.err


def _broken_files(tmp_path: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase the one-line error must contain)."""
    raw = good.read_bytes()
    state = torch.load(good, weights_only=True)
    files: dict[str, tuple[Path, str]] = {}

    def put(name: str, data: bytes | None = None, obj=None, phrase: str = "") -> None:
        path = tmp_path / f"{name}.pth"
        if data is not None:
            path.write_bytes(data)
        else:
            torch.save(obj, path)
        files[name] = (path, phrase)

    put("empty", b"", phrase="not a readable PyTorch checkpoint")
    put("truncated-half", raw[: len(raw) // 2], phrase="not a readable PyTorch checkpoint")
    put("truncated-tail", raw[:-30], phrase="checkpoint")
    put("text-file", b"these are not the weights you are looking for\n" * 10, phrase="not a readable PyTorch checkpoint")
    garbled = bytearray(raw)
    garbled[len(raw) // 2] ^= 0xFF  # one flipped byte inside the weights
    put("one-flipped-byte", bytes(garbled), phrase="corrupt checkpoint")
    put("list-payload", obj=[state["state_dict"]], phrase="expected a dict of weights, found list")
    put("tensor-payload", obj=torch.zeros(3), phrase="expected a dict of weights, found Tensor")
    put("unrelated-dict", obj={"hello": 1, "world": [1, 2]}, phrase="not an mnistrec checkpoint nor a state_dict")
    put("unknown-model", obj={**state, "model_name": "resnet-9000"}, phrase="unknown model")
    renamed = dict(state["state_dict"])
    renamed["extra.weight"] = renamed.pop(next(iter(renamed)))
    put("wrong-keys", obj={**state, "state_dict": renamed}, phrase="weights do not fit model 'mlp'")
    reshaped = {k: (v[:-1] if i == 0 else v) for i, (k, v) in enumerate(state["state_dict"].items())}
    put("wrong-shape", obj={**state, "state_dict": reshaped}, phrase="has shape")
    bare = dict(state["state_dict"])
    bare.popitem()
    put("bare-state-dict-missing-a-tensor", obj=bare, phrase="missing")
    others = [name for name in model_names() if name != "mlp"]
    if others:  # another architecture's weights under the MLP's name
        put("wrong-architecture", obj={**state, "state_dict": create_model(others[0]).state_dict()}, phrase="do not fit model 'mlp'")
    return files


def test_broken_checkpoints_give_one_line_errors_via_the_cli(tmp_path, mlp_checkpoint, capsys, data_dir, monkeypatch):
    monkeypatch.setenv("MNIST_DATA_DIR", str(data_dir))
    files = _broken_files(tmp_path, mlp_checkpoint)
    assert len(files) >= 12
    for name, (path, phrase) in files.items():
        message = _cli_error(capsys, "evaluate", path, "--limit-test", "10")
        assert str(path) in message and phrase in message, (name, message)
    # The original is untouched and still works.
    assert main(["evaluate", str(mlp_checkpoint), "--limit-test", "100", "--json"]) == 0


def test_random_corruptions_of_a_real_checkpoint_are_refused(tmp_path, mlp_checkpoint):
    """200 seeded corruptions (flipped, inserted, deleted bytes; truncation): each loads as the
    identical model or is refused with a CheckpointError; nothing else, never silently different weights."""
    raw = mlp_checkpoint.read_bytes()
    reference = load_checkpoint(mlp_checkpoint).model.state_dict()
    rng = random.Random(8)
    refused = identical = 0
    path = tmp_path / "corrupt.pth"
    for case in range(200):
        data = bytearray(raw)
        mode = case % 4
        if mode == 0:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= rng.randint(1, 255)
        elif mode == 1:
            at = rng.randrange(len(data))
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        elif mode == 2:
            at = rng.randrange(len(data))
            del data[at : at + rng.randint(1, 16)]
        else:
            del data[rng.randrange(len(data)) :]
        path.write_bytes(bytes(data))
        try:
            loaded = load_checkpoint(path)
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            refused += 1
            continue
        # Accepted only if it is bit-for-bit the same model (e.g. a flip in unused zip padding).
        state = loaded.model.state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference), f"case {case}: corrupted weights loaded silently"
        identical += 1
    print(f"checkpoint corruption fuzz: 200 cases, {refused} refused, {identical} loaded identical")
    assert refused >= 190
