"""Ensembles across processes: rank r of K trains members r, r+K, ...; rank 0 gathers, scores and writes the run.

Two gloo ranks are started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT in the environment), but each in its own working directory with a
relative ``--out``: as on two machines without a shared disk, whatever a rank
writes lands in its own directory, so the test sees exactly who wrote what.
A member is trained by one process alone (no DDP), with the same seed and thread
count as in the sequential run, so the ensemble must be the same bits.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from conftest import cli_env

# Three members on two ranks: rank 0 trains members 0 and 2, rank 1 trains member 1.
FLAGS = ["--ensemble-size", "3", "--epochs", "2", "--limit-train", "640", "--limit-test", "300",
         "--no-plots", "--quiet", "--out", "run", "--save", "copy.pth"]
ENV = {"OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mnistrec(data_dir, *args: str) -> list[str]:
    return [sys.executable, "-m", "mnistrec", "train", "--data-dir", str(data_dir), *FLAGS, *args]


def _two_ranks(data_dir, dirs, *args: str) -> list[subprocess.CompletedProcess]:
    port = str(_free_port())
    procs = []
    for rank, cwd in enumerate(dirs):
        env = cli_env(**ENV, RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(_mnistrec(data_dir, *args), cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        finally:
            proc.kill()
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def _members(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_two_ranks_train_the_sequential_ensemble_and_rank_0_alone_writes_it(tmp_path, data_dir):
    sequential = tmp_path / "sequential"
    sequential.mkdir()
    reference = subprocess.run(_mnistrec(data_dir), cwd=sequential, env=cli_env(**ENV), capture_output=True,
                               text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir()
    node1.mkdir()
    rank0, rank1 = _two_ranks(data_dir, [node0, node1])
    assert rank0.returncode == 0 and rank1.returncode == 0, rank0.stderr[-3000:] + rank1.stderr[-3000:]

    # Bit-identical members: the gathered ensemble is the sequential one.
    expected, got = _members(sequential / "run" / "model.pth"), _members(node0 / "run" / "model.pth")
    assert got.keys() == expected.keys() and len(got) == 3 * 6  # 3 members x (3 weights + 3 biases)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert torch.equal(_members(node0 / "copy.pth")[key], expected[key])

    # Rank 0 alone printed, and its report is the sequential one's.
    assert rank1.stdout == ""
    def scores(stdout: str) -> list[str]:
        return [line for line in stdout.splitlines() if line.startswith(("member ", "ensemble:"))]

    assert len(scores(rank0.stdout)) == 4 and scores(rank0.stdout) == scores(reference.stdout)
    assert sum(line.startswith("Ensemble of 3") for line in rank0.stdout.splitlines()) == 1
    # Rank 0 wrote the run and the copy; rank 1 wrote only what it needs to resume its own member.
    assert _files(node1) == ["run/member1/history.csv", "run/member1/last.pth", "run/member1/metrics.json",
                             "run/member1/model.pth", "run/run.json"]
    assert {"copy.pth", "run/model.pth", "run/metrics.json", "run/run.json"} <= set(_files(node0))
    assert not any(name.startswith("run/member1/") for name in _files(node0))
    metrics = json.loads((node0 / "run" / "metrics.json").read_text())
    assert [m["member"] for m in metrics["members"]] == [0, 1, 2]
    assert [m["rank"] for m in metrics["members"]] == [0, 1, 0]
    assert metrics["world_size"] == 2
    assert metrics["test"] == json.loads((sequential / "run" / "metrics.json").read_text())["test"]

    # Resumable: member 2 lost its results (as if killed after its last epoch) and the run its model; each rank
    # resumes from its own directory, reuses the finished members, and the ensemble is again the same bits.
    for name in ("run/model.pth", "run/metrics.json", "run/member2/model.pth", "run/member2/metrics.json", "copy.pth"):
        (node0 / name).unlink()
    rank0, rank1 = _two_ranks(data_dir, [node0, node1], "--resume", "run")
    assert rank0.returncode == 0 and rank1.returncode == 0, rank0.stderr[-3000:] + rank1.stderr[-3000:]
    assert "resuming run/member2 after epoch 2/2" in rank0.stdout and rank1.stdout == ""
    got = _members(node0 / "run" / "model.pth")
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
