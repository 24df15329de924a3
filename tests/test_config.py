"""Flags and YAML become one validated config; bad input is one line and exit 2."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT
from vae.config import ConfigError, TrainConfig, parse_train_args, resolve


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("dataset: gaussian2d\nlatent-dim: 3\nbeta: 2\nlr: 0.01\n")
    cfg, _ = parse_train_args(["--config", str(cfg_file), "--beta", "0.5", "--storage", str(tmp_path)])
    assert (cfg.dataset, cfg.latent_dim, cfg.beta, cfg.lr) == ("gaussian2d", 3, 0.5, 0.01)
    assert cfg.model == "gaussian-mlp" and cfg.hidden_dim == 64  # the dataset's defaults
    assert cfg.storage == str(tmp_path) and cfg.name.startswith("gaussian2d-gaussian-mlp-z3-b0.5-")


def test_resolve_is_idempotent():
    cfg = resolve(TrainConfig(name="x"))
    assert resolve(cfg) == cfg
    assert (cfg.model, cfg.latent_dim, cfg.hidden_dim) == ("mlp", 20, 400)


@pytest.mark.parametrize("changes, flag", [
    ({"lr": 0.0}, "--lr"), ({"lr": float("nan")}, "--lr"), ({"beta": -1.0}, "--beta"),
    ({"epochs": 0}, "--epochs"), ({"num_mc": 0}, "--num-mc"), ({"dataset": "cifar"}, "--dataset"),
    ({"model": "cnn"}, "--model"), ({"decoder_var": "-1"}, "--decoder-var"),
    ({"decoder_var": "loud"}, "--decoder-var"), ({"storage": "ftp://x/y"}, "--storage"),
    ({"batch_size": 2, "num_workers": 4}, "--batch-size"), ({"name": "../escape"}, "--name"),
    ({"dataset": "gaussian2d", "model": "mlp"}, "--model"),
])
def test_bad_values_name_the_flag(changes, flag):
    with pytest.raises(ConfigError, match=f"^{flag}: "):
        TrainConfig(**changes)


def run_job(*args: str, module: str = "jobs.train") -> subprocess.CompletedProcess:
    probe = ("import runpy, sys; sys.argv = [sys.argv[0]] + sys.argv[1:]\n"
             "try:\n    runpy.run_module(%r, run_name='__main__')\n"
             "finally:\n    print('RAY-IMPORTED' if 'ray' in sys.modules else 'NO-RAY', file=sys.stdout)\n" % module)
    return subprocess.run([sys.executable, "-c", probe, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args", [
    ["--lr", "-1"], ["--lr", "abc"], ["--epochs", "0"], ["--beta", "nan"], ["--dataset", "cifar"],
    ["--latent-dim", "1e9"], ["--unknown-flag", "1"], ["--use-gpu", "maybe"], ["--config", "/nonexistent.yaml"],
])
def test_bad_arguments_exit_2_with_one_line_and_start_no_ray(args):
    proc = run_job(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jobs.train: error: "), proc.stderr
    assert "NO-RAY" in proc.stdout


def test_yaml_with_unknown_key_or_wrong_type_is_refused(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("learning_rate: 0.1\n")
    bad_type = tmp_path / "b.yaml"
    bad_type.write_text("epochs: [1, 2]\n")
    not_yaml = tmp_path / "c.yaml"
    not_yaml.write_text("epochs: [1, 2\n")
    for path, needle in [(bad_key, "unknown key 'learning_rate'"), (bad_type, "--epochs: must be int"),
                         (not_yaml, "not valid YAML")]:
        proc = run_job("--config", str(path))
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_data_exits_2_naming_the_folder_before_ray(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"x")
    proc = run_job("--data-dir", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert str(tmp_path) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "NO-RAY" in proc.stdout


def test_the_readmes_example_yaml_is_a_valid_config():
    from pathlib import Path

    from vae.config import parse_train_args

    path = Path(__file__).resolve().parents[1] / "examples" / "run.yaml"
    cfg, _ = parse_train_args(["--config", str(path), "--num-workers", "2", "--kl-warmup-epochs", "5"])
    assert (cfg.dataset, cfg.model, cfg.decoder_var, cfg.num_workers) == ("gaussian2d", "linear", "1", 2)


@pytest.mark.parametrize("prog", ["jobs.train", "jobs.sweep"])
def test_print_config_gives_yaml_that_config_takes_back_as_is(prog, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    flags = ["--dataset", "gaussian2d", "--epochs", "7", "--name", "p", "--storage", str(tmp_path)]
    first = subprocess.run([sys.executable, "-m", prog, *flags, "--print-config"], cwd=root, capture_output=True,
                           text=True, timeout=60)
    assert first.returncode == 0 and first.stderr == "" and "epochs: 7" in first.stdout
    (tmp_path / "config.yaml").write_text(first.stdout)
    again = subprocess.run([sys.executable, "-m", prog, "--config", str(tmp_path / "config.yaml"), "--print-config"],
                           cwd=root, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout == first.stdout  # the same run, reproduced from its file


def test_a_resolved_config_is_not_resolved_again_on_its_way_into_the_loop(tmp_path, monkeypatch):
    from vae.training import loop
    from vae.training.session import LocalSession

    cfg = resolve(TrainConfig(dataset="gaussian2d", epochs=1, iw_samples=0, storage=str(tmp_path), name="once"))

    def again(c):
        raise AssertionError("resolved a second time")

    monkeypatch.setattr(loop, "resolve", again)
    loop.train_loop(cfg, LocalSession())  # as the CLI, the API and a sweep's trial hand it in
    loop.train_loop(cfg.to_dict(), LocalSession())  # as Ray Train's workers get it
    with pytest.raises(AssertionError, match="second time"):
        loop.train_loop(TrainConfig(dataset="gaussian2d", epochs=1, storage=str(tmp_path), name="raw"),
                        LocalSession())  # a direct caller's unresolved config is resolved there
