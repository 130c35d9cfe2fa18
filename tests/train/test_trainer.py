"""The training loop: exact resumption after a hard kill, DDP on 2 CPU processes, checkpoints."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dao.train import atomic_save, export_weights, load_checkpoint, load_weights

SCRIPT = Path(__file__).with_name("toy_run.py")
STEPS_PER_EPOCH = 13  # ceil(100 / 8)


def _run(args, env=None, check=True):
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        env=e,
        capture_output=True,
        text=True,
        check=check,
        timeout=300,
    )


def test_kill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    ref = tmp_path / "ref"
    _run([ref, 3])
    ref_final = torch.load(ref / "final_rank0.pt")
    assert ref_final["summary"]["step"] == 3 * STEPS_PER_EPOCH

    run = tmp_path / "run"
    died = _run([run, 3, "--die-at-step", 18], check=False)  # step 18: epoch 1, batch 5
    assert died.returncode == 9
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (ck["step"], ck["epoch"], ck["batch_in_epoch"]) == (15, 1, 2)
    _run([run, 3])  # the same command resumes
    final = torch.load(run / "final_rank0.pt")
    assert final["summary"]["step"] == 3 * STEPS_PER_EPOCH
    assert final["summary"]["finished"]
    for k, v in ref_final["w"].items():
        torch.testing.assert_close(final["w"][k], v, atol=0, rtol=0)
    # every epoch validated once, none lost
    with open(run / "log.csv") as f:
        val_epochs = [int(r["epoch"]) for r in csv.DictReader(f) if r["split"] == "val"]
    assert val_epochs == [1, 2, 3]


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        str(SCRIPT),
        str(out),
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=300)
    r0 = torch.load(out / "final_rank0.pt")
    r1 = torch.load(out / "final_rank1.pt")
    assert r0["summary"]["step"] == 2 * 7  # ceil(100 / (8 * 2)) per epoch
    for k in r0["w"]:
        torch.testing.assert_close(r0["w"][k], r1["w"][k], atol=0, rtol=0)  # replicas agree
    with open(out / "log.csv") as f:
        val = [float(r["loss"]) for r in csv.DictReader(f) if r["split"] == "val"]
    assert len(val) == 2 and val[1] < val[0]  # validation is reduced over both ranks, and improves


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "ck.pt"
    atomic_save({"a": 1}, p)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"a": Boom()}, p)
    assert load_checkpoint(p) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left


def test_export_and_load_weights(tmp_path):
    sd = {"w": torch.randn(3, 2), "b": torch.zeros(2)}
    export_weights(sd, {"model": {"kind": "toy", "hidden": 3}}, tmp_path / "m.safetensors")
    back, cfg = load_weights(tmp_path / "m.safetensors")
    assert cfg == {"model": {"kind": "toy", "hidden": 3}}
    torch.testing.assert_close(back["w"], sd["w"])
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "missing.safetensors")


def test_new_stage_starts_from_previous_weights_with_a_fresh_schedule(tmp_path):
    """pretrain -> finetune: the stage-1 EMA weights carried over, optimiser and schedule new."""
    first = tmp_path / "stage1"
    _run([first, 2])
    ck = load_checkpoint(first / "checkpoints" / "last.pt")
    assert ck["step"] == 2 * STEPS_PER_EPOCH
    second = tmp_path / "stage2"
    # lr = 0: the new stage must end exactly where it started, at the stage-1 EMA weights
    _run([second, 1, "--init-from", first / "checkpoints" / "last.pt", "--lr", 0.0])
    final = torch.load(second / "final_rank0.pt")
    for k, v in ck["ema"].items():
        torch.testing.assert_close(final["w"][k], v, atol=0, rtol=0)
    st2 = load_checkpoint(second / "checkpoints" / "last.pt")
    assert st2["step"] == STEPS_PER_EPOCH  # the step count restarts with the stage
    assert st2["scheduler"]["last_epoch"] == STEPS_PER_EPOCH  # a fresh schedule
    assert st2["optimizer"]["state"][0]["step"] == STEPS_PER_EPOCH  # a fresh optimiser
