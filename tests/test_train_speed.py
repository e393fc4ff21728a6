"""The seed loop's speed work keeps results: folded normalisation gives the same bits; a generous time bound.

Timing lives in benchmarks/bench_seed_pipeline.py (ratio to the plain in-memory
loop, same run); the test here only catches a gross regression (3x the plain loop
on a 100-step run, the better of two alternating tries on a possibly loaded box).
"""

from __future__ import annotations

import importlib.util
import time

import torch

from conftest import REPO
from mnistrec.models import Normalize
from mnistrec.training import loop
from mnistrec.training.config import make_config
from mnistrec.training.loop import train


def _train(mnist, **options):
    config = make_config("seed", epochs=1, limit_train=1280, limit_test=200, threads=1, **options)
    return train(config, mnist, None, progress=False, log=lambda _: None)


def test_normalising_the_training_set_once_gives_the_same_weights(mnist, monkeypatch):
    folded = _train(mnist)
    assert not any(m.inputs_normalised for m in folded.model.modules() if isinstance(m, Normalize))  # off after training
    monkeypatch.setattr(loop, "_input_normalisation", lambda model: None)  # normalise every batch inside the model
    unfolded = _train(mnist)
    for key, tensor in unfolded.model.state_dict().items():
        assert torch.equal(folded.model.state_dict()[key], tensor), key
    assert folded.metrics == unfolded.metrics


def test_augmented_runs_do_not_fold(mnist):
    # Augmentations work on raw pixels (0 is background): with one, the model normalises every batch itself.
    config = make_config("seed", augment="shift", epochs=1, limit_train=256, limit_test=100)
    run, _ = loop._start(config, mnist, loop.distributed.DistContext(), 64, None)
    assert run.normalise is None and float(run.train_x.min()) == 0.0


def test_seed_loop_is_within_a_generous_bound_of_the_plain_loop(mnist, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the benchmark imports its sibling machine.py
    spec = importlib.util.spec_from_file_location("bench_seed_pipeline", REPO / "benchmarks" / "bench_seed_pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    subset = type(mnist)(mnist.train_images[:6400], mnist.train_labels[:6400], mnist.test_images[:1000],
                         mnist.test_labels[:1000], mnist.data_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain, ours = [], []
        for _ in range(2):
            plain.append(bench.run_plain_loop(subset, 1, 42)["seconds"])
            start = time.perf_counter()
            train(make_config("seed", epochs=1), subset, None, progress=False, log=lambda _: None)
            ours.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    print(f"100 steps: plain loop {min(plain):.2f}s, ours {min(ours):.2f}s (with its test pass)")
    assert min(ours) <= 3 * min(plain)
