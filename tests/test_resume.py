"""Exact resume: a run killed with SIGKILL right after a mid-epoch checkpoint, then resumed from that checkpoint in a
new process, ends with the parameters and META task weights of a run never interrupted, bit for bit."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from resume_worker import EPOCH_BATCHES, train

WORKER = Path(__file__).with_name("resume_worker.py")
KILL_AFTER = 6  # epoch 1, batch 2 of 4: mid-epoch, after an epoch boundary; the resumed run crosses another


def worker_spec(tiny_encoder: str, data_root: Path, cache_dir: str, tmp_path: Path, **options) -> dict:
    """`resume_worker.train`'s keyword arguments for ACL-ARC and a short corpus that wraps around within an epoch."""
    short = tmp_path / "short.txt"
    short.write_text("".join(f"a short document, number {i}, about citing earlier work\n" for i in range(10)))
    paths = {"encoder": tiny_encoder, "data_dir": str(data_root / "citation_intent"), "cache_dir": cache_dir}
    return {**paths, "short_corpus": str(short), **options}


def run_worker(spec: dict, out_dir: Path) -> tuple[int, str]:
    out_dir.mkdir()
    log = out_dir / "log.txt"
    with log.open("w") as out:  # a file, not a pipe: a killed run's orphaned loader workers would hold a pipe open
        command = [sys.executable, str(WORKER), json.dumps({**spec, "out_dir": str(out_dir)})]
        returncode = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=300).returncode
    return returncode, log.read_text()[-3000:]


@pytest.mark.parametrize(
    "weighting, num_workers, max_epochs",
    [("equal", 0, None), ("equal", 2, None), ("meta", 0, None), ("meta", 2, None), ("meta", 0, 3)],
    ids=["equal-0", "equal-2", "meta-0", "meta-2", "meta-0-max_epochs"],
)
def test_run_killed_after_mid_epoch_checkpoint_resumes_bit_for_bit(
    tiny_encoder, data_root, cache_dir, tmp_path, weighting, num_workers, max_epochs
):
    """Also for a run counted in epochs, whose learning-rate schedule reads the run's length from Lightning."""
    spec = worker_spec(tiny_encoder, data_root, cache_dir, tmp_path, weighting=weighting, num_workers=num_workers)
    spec["max_epochs"] = max_epochs

    returncode, log = run_worker({**spec, "kill_after": KILL_AFTER}, tmp_path / "killed")
    assert returncode == -signal.SIGKILL, log
    checkpoint = tmp_path / "killed" / "mid.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (KILL_AFTER // EPOCH_BATCHES, KILL_AFTER)
    assert KILL_AFTER % EPOCH_BATCHES != 0  # mid-epoch

    returncode, log = run_worker({**spec, "ckpt_path": str(checkpoint)}, tmp_path / "resumed")
    assert returncode == 0, log
    resumed = torch.load(tmp_path / "resumed" / "final.pt")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker: the same reduction order
    try:
        uninterrupted = train(**spec, out_dir=str(tmp_path))
    finally:
        torch.set_num_threads(threads)

    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(saved["state_dict"][name], value) for name, value in uninterrupted.items())
    if weighting == "meta":
        assert not torch.equal(uninterrupted["weighting.logits"], torch.zeros(4))


@pytest.mark.long
def test_a_ddp_run_killed_mid_epoch_resumes_bit_for_bit(tiny_encoder, data_root, cache_dir, tmp_path):
    """Two CPU ranks (gloo): each rank's dropout must continue its own random stream, not rank 0's. The ranks' batches
    are padded to different lengths, so their streams part after the first step (dropout draws one number per
    position)."""
    spec = worker_spec(tiny_encoder, data_root, cache_dir, tmp_path, weighting="meta", num_workers=0)
    spec |= {"devices": 2, "max_length": 128}
    returncode, log = run_worker({**spec, "kill_after": KILL_AFTER}, tmp_path / "killed")
    assert returncode == -signal.SIGKILL, log
    returncode, log = run_worker({**spec, "ckpt_path": str(tmp_path / "killed" / "mid.ckpt")}, tmp_path / "resumed")
    assert returncode == 0, log
    returncode, log = run_worker(spec, tmp_path / "uninterrupted")
    assert returncode == 0, log

    resumed = torch.load(tmp_path / "resumed" / "final.pt")
    uninterrupted = torch.load(tmp_path / "uninterrupted" / "final.pt")
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
