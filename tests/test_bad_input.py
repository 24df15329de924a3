"""Bad input never reaches Ray: random argument lists, hostile checkpoints, half-written files."""

import contextlib
import io
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT
from tune.space import parse_sweep_args
from vae.training import checkpoint
from vae.config import TrainConfig, parse_train_args
from vae.tables.results import Results

TRAIN_FLAGS = ["--dataset", "--model", "--subset", "--latent-dim", "--hidden-dim", "--decoder-var", "--beta",
               "--kl-warmup-epochs", "--free-bits", "--num-mc", "--epochs", "--batch-size", "--lr", "--seed",
               "--active-threshold", "--iw-samples", "--iw-subset", "--num-workers", "--use-gpu",
               "--cpus-per-worker", "--max-failures", "--storage", "--name", "--bogus"]
SWEEP_FLAGS = ["--latent-dims", "--lrs", "--betas", "--hidden-dims", "--kl-warmups", "--free-bits", "--repeats",
               "--search", "--num-samples", "--scheduler", "--cpus-per-trial", "--gpus-per-trial",
               "--workers-per-trial", "--max-concurrent", "--kl-threshold", "--epochs", "--dataset"]
VALUES = st.one_of(
    st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", "nan", "-inf", "1e309", "abc", "mnist", "gaussian2d", "linear", "mlp", "learned", "true",
                     "0", "-1", "1,2", "0.1,1,10", ",", "1,,2", "s3://b/p", "ftp://x", "../up", "grid", "asha"]),
    st.text(max_size=12))


def parses_or_exits_2(parse, argv) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cfg, _ = parse(argv)
        except SystemExit as e:
            assert e.code == 2, (argv, e.code)
            lines = err.getvalue().strip().splitlines()
            assert len(lines) == 1 and ": error: " in lines[0], (argv, err.getvalue())
            return
    assert cfg is not None  # accepted: the config was validated on construction


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(TRAIN_FLAGS), VALUES), max_size=5))
@example(pairs=[("--bogus", "\x1e0")])  # argparse echoed a record separator, which splits the line
def test_random_train_arguments_parse_or_exit_2_with_one_line(pairs):
    parses_or_exits_2(parse_train_args, [x for pair in pairs for x in pair])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(SWEEP_FLAGS), VALUES), max_size=5))
def test_random_sweep_arguments_parse_or_exit_2_with_one_line(pairs):
    parses_or_exits_2(parse_sweep_args, [x for pair in pairs for x in pair])


@pytest.mark.parametrize("flag", ["--subset", "--latent-dim", "--beta", "--num-mc", "--epochs", "--batch-size",
                                  "--lr", "--iw-samples", "--num-workers", "--kl-warmup-epochs", "--free-bits"])
@pytest.mark.parametrize("value", ["-1", "nan", "1e30", "ten"])
def test_every_numeric_flag_refuses_negative_nan_huge_and_text(flag, value):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        parse_train_args([flag, value])
    assert exit_info.value.code == 2
    assert err.getvalue().count("\n") == 1 and flag in err.getvalue()


def test_zero_is_refused_where_it_means_nothing():
    for flag in ["--lr", "--epochs", "--num-mc", "--batch-size", "--num-workers", "--objective-k", "--decoder-layers"]:
        with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
            parse_train_args([flag, "0"])
    assert parse_train_args(["--iw-subset", "0"])[0].iw_subset == 0  # the whole test set


# ------------------------------------------------------------------ checkpoints

class Evil:
    """Unpickling it would run `touch <marker>`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_with_code_in_them_are_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": checkpoint.FORMAT, "payload": Evil(str(marker))}, tmp_path / "state.pt")
    with pytest.raises(checkpoint.CheckpointError, match="refused: UnpicklingError"):
        checkpoint.load(str(tmp_path))
    assert not marker.exists()


def test_truncated_foreign_or_misplaced_checkpoints_are_refused(tmp_path):
    folder = str(tmp_path)
    checkpoint.save(folder, model_state={"w": torch.ones(3)}, optimizer_state={}, epoch=2, trial_id="a")
    assert checkpoint.load(folder, "a")["epoch"] == 2
    with pytest.raises(checkpoint.CheckpointError, match="belongs to trial 'a', not 'b'"):
        checkpoint.load(folder, "b")
    raw = (tmp_path / "state.pt").read_bytes()
    (tmp_path / "state.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="refused"):
        checkpoint.load(folder)
    torch.save({"state_dict": {"w": torch.ones(3)}}, tmp_path / "state.pt")  # someone else's file
    with pytest.raises(checkpoint.CheckpointError, match="not a vae-collapse-checkpoint/1 file"):
        checkpoint.load(folder)


# ------------------------------------------------------------------ writes killed half-way

WRITER = """
import sys, numpy as np, pandas as pd, torch
sys.path.insert(0, {root!r})
from vae.training import checkpoint
from vae.tables.results import Results, SCHEMAS
res = Results({path!r})
weights = {{"w": torch.randn(2000, 500)}}
rows = [{{"trial_id": "t", "epoch": 1, "index": i, "label": 0, "mu": np.random.rand(512).astype("float32")}}
        for i in range(4000)]
print("ready", flush=True)
i = 0
while True:
    res.write("latents", rows, f"t{{i % 3}}.parquet")
    checkpoint.save({path!r} + "/ckpt", model_state=weights, optimizer_state={{}}, epoch=i, trial_id="t")
    i += 1
"""


def test_a_writer_killed_mid_write_leaves_only_whole_files(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), path=str(tmp_path / "run"))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 60
    while time.time() < deadline and len(list((tmp_path / "run" / "latents").glob("t*.parquet"))) < 3:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latents = Results(str(tmp_path / "run")).read("latents")  # hidden temp files are never read
    assert len(latents) == 3 * 4000
    assert len(pd.read_parquet(tmp_path / "run" / "latents")) == 3 * 4000
    state = checkpoint.load(str(tmp_path / "run" / "ckpt"), "t")  # the last whole checkpoint, never a torn one
    assert state["model"]["w"].shape == (2000, 500)
    # the next write replaces its file rather than adding rows
    Results(str(tmp_path / "run")).write("latents", latents.iloc[:10], "t0.parquet")
    assert len(Results(str(tmp_path / "run")).read("latents")) == 2 * 4000 + 10


def test_unwritable_storage_stops_the_run_naming_the_path(tmp_path):
    from vae.training.loop import train_loop
    from vae.tables.results import StorageError
    from vae.training.session import LocalSession

    storage = tmp_path / "store"
    (storage / "run").mkdir(parents=True)
    (storage / "run" / "kl_per_dim").write_text("a file where a folder must be")  # a write that must fail
    with pytest.raises(StorageError, match=f"cannot write results to {storage}/run/kl_per_dim"):
        train_loop(TrainConfig(dataset="gaussian2d", epochs=2, storage=str(storage), name="run", iw_samples=0),
                   LocalSession())
    assert len(Results(str(storage / "run")).read("epochs")) == 1  # what was written stays readable


def test_a_full_disk_stops_the_run_naming_the_path_and_keeps_what_was_written(tmp_path):
    from vae.training.loop import train_loop
    from vae.tables.results import StorageError
    from vae.training.session import LocalSession

    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root): the file-in-the-way test covers the same path")
    try:
        with pytest.raises(StorageError, match=f"cannot write .*{disk}/run/.*No space left on device"):
            train_loop(TrainConfig(dataset="gaussian2d", epochs=30, storage=str(disk), name="run", iw_samples=0),
                       LocalSession())
        epochs = Results(str(disk / "run")).read("epochs")  # every file that made it is whole and readable
        assert len(epochs) >= 1 and not list((disk / "run").glob("*/.tmp-*"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
