"""Checkpoints: round trip with metadata, the seed's bare state_dict, and one-line refusals."""

from __future__ import annotations

import torch
from torch import nn

import pytest

from mnistrec.checkpoint import load_checkpoint, save_checkpoint
from mnistrec.fileio import atomic_write
from mnistrec.data import FILES, to_float
from mnistrec.errors import CheckpointError, MnistrecError
from mnistrec.evaluate import predict_logits


class SeedNotebookModel(nn.Module):
    """The seed notebook's ``MNIST_model0`` as it was written there: it expects inputs already normalised."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.layer_1 = nn.Linear(784, 512)
        self.layer_2 = nn.Linear(512, 256)
        self.layer_3 = nn.Linear(256, 10)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        return self.layer_3(self.relu(self.layer_2(self.relu(self.layer_1(x)))))


def test_trained_checkpoint_holds_the_metadata(mlp_checkpoint):
    loaded = load_checkpoint(mlp_checkpoint)
    meta = loaded.meta
    assert loaded.model_name == "mlp" and loaded.model_kwargs == {}
    assert not loaded.model.training
    assert meta["normalization"]["mean"] == 0.1307 and meta["normalization"]["std"] == 0.3081
    assert meta["recipe"] == "seed" and meta["config"]["epochs"] == 1 and meta["config"]["batch_size"] == 64
    assert 0.85 < meta["metrics"]["accuracy"] <= 1.0 and meta["metrics"]["count"] == 1000
    assert meta["versions"]["torch"] == str(torch.__version__) and meta["versions"]["mnistrec"]
    assert meta["data_checksums"] == {name: f.sha256 for name, f in FILES.items()}
    assert len(meta["history"]) == 1 and "optimizer" not in meta


def test_save_load_round_trip_gives_identical_predictions_and_metadata(mlp_checkpoint, mnist, tmp_path):
    original = load_checkpoint(mlp_checkpoint)
    path = tmp_path / "copy.pth"
    meta = {"recipe": "seed", "metrics": {"accuracy": 0.5}, "data_checksums": {"x": "y"}, "note": "round trip"}
    save_checkpoint(path, original.model_name, original.model_kwargs, original.model, **meta)
    again = load_checkpoint(path)
    images = mnist.test_images[:500]
    assert torch.equal(predict_logits(original.model, images), predict_logits(again.model, images))
    assert again.model_name == "mlp" and again.model_kwargs == {}
    for key, value in meta.items():
        assert again.meta[key] == value
    assert again.meta["versions"]["torch"] == str(torch.__version__)
    assert again.meta["normalization"] == original.meta["normalization"]
    assert [p.name for p in tmp_path.iterdir()] == ["copy.pth"]  # no temporary file left


def test_seed_style_bare_state_dict_loads_and_predicts_the_same(mlp_checkpoint, mnist, tmp_path):
    seed_model = SeedNotebookModel()
    # Give the seed-style model the trained weights, then save it exactly as the seed did.
    trained = load_checkpoint(mlp_checkpoint).model.state_dict()
    seed_model.load_state_dict(trained)
    path = tmp_path / "mnist_model.pth"
    torch.save(seed_model.state_dict(), path)

    loaded = load_checkpoint(path)
    assert loaded.model_name == "mlp" and loaded.meta == {"format": "bare-state-dict"}
    images = mnist.test_images[:500]
    seed_model.eval()
    with torch.no_grad():  # the seed normalised in its transform, outside the model
        expected = seed_model((to_float(images) - 0.1307) / 0.3081)
    ours = predict_logits(loaded.model, images)
    assert torch.allclose(ours, expected, atol=1e-4)
    assert torch.equal(ours.argmax(1), expected.argmax(1))


def test_unsafe_truncated_and_mismatched_checkpoints_are_refused(mlp_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(mlp_checkpoint.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": SeedNotebookModel()}, unsafe)  # a pickled module: could run code on load
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(unsafe)

    wrong = tmp_path / "wrong.pth"
    torch.save({"layer_1.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(CheckpointError, match="do not fit model 'mlp'"):
        load_checkpoint(wrong)

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pth")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"old and complete")

    def failing(fh) -> None:
        fh.write(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(MnistrecError, match="No space left on device"):
        atomic_write(path, failing)
    assert path.read_bytes() == b"old and complete"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]
