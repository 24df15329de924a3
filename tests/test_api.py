"""The Python API: the same validation as the CLI, the same run, results and models back in Python."""

from __future__ import annotations

import matplotlib
import pytest
import torch

import vae
import vae.api
from tests.conftest import recorded_run
from vae.config import ConfigError


def test_bad_values_raise_the_clis_one_line_message():
    with pytest.raises(ConfigError, match=r"^--lr: must be a number in \(0, 100\] \(got -1.0\)$"):
        vae.api.train_config(lr=-1)
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        vae.api.train_config(learning_rate=0.1)
    from tune.api import sweep_config

    with pytest.raises(ConfigError, match="--betas: must be a comma-separated list of numbers"):
        sweep_config(betas="1,x")
    assert sweep_config(dataset="gaussian2d", betas=[0.5, 2]).axis("betas") == [0.5, 2.0]


@pytest.mark.slow
def test_train_returns_its_tables_figures_and_a_model_to_use(ray_cluster, tmp_path):
    run = vae.train(dataset="gaussian2d", model="linear", decoder_var=1, epochs=2, lr=0.01, iw_samples=0,
                    storage=str(tmp_path), name="api", quiet=True)
    assert sorted(run.epochs.epoch) == [0, 1, 2] and run.trials.status.tolist() == ["finished"]
    assert run.config["decoder_var"] == "1" and run.info["kind"] == "train"
    assert run.info["versions"]["torch"] == torch.__version__  # read from torch's files, not by importing it
    fig = run.plot("loss_curves")
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 3
    again = vae.open_results(str(tmp_path / "api"))
    assert again.kl_per_dim.equals(run.kl_per_dim)
    model = vae.load_model(str(tmp_path / "api"))
    assert model.epoch == 2 and model.trial_id == "api"
    x = torch.randn(5, 2)
    mu, logvar = model.encode(x)
    mean, var = model.decode(mu)
    assert mu.shape == logvar.shape == (5, 2) and mean.shape == var.shape == (5, 2)
    assert torch.allclose(var, torch.ones_like(var))  # the fixed decoder variance
    assert model.sample(7, seed=0).shape == (7, 2) and torch.equal(model.sample(7, seed=0), model.sample(7, seed=0))
    assert torch.allclose(model.reconstruct(x), mean)
    assert vae.load_model(str(tmp_path / "api"), epoch=1).epoch == 1  # Ray Train keeps the latest two
    with pytest.raises(FileNotFoundError, match="no checkpoint of trial 'api' at epoch 0"):
        vae.load_model(str(tmp_path / "api"), epoch=0)
    with pytest.raises(vae.RunFailed, match=r"was run with other settings \(--beta 1.0 -> 2.0\);"):
        vae.train(dataset="gaussian2d", model="linear", decoder_var=1, epochs=2, lr=0.01, iw_samples=0,
                  storage=str(tmp_path), name="api", beta=2.0, quiet=True)


def test_a_failed_run_raises_with_the_clis_line(tmp_path):
    """A rerun with other settings is refused before Ray starts (no Ray here; the end-to-end test above does the
    same after a real run): run.json as a first run of these settings leaves it."""
    recorded_run(tmp_path / "b", epochs=1)
    with pytest.raises(vae.RunFailed, match=r"was run with other settings \(--beta 1.0 -> 2.0\);"):
        vae.train(dataset="gaussian2d", model="linear", decoder_var=1, epochs=1, iw_samples=0, storage=str(tmp_path),
                  name="b", beta=2.0, quiet=True)


@pytest.mark.slow
def test_the_example_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    """examples/quickstart.ipynb (committed without outputs): a sweep, its map inline, a model sampled."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed clean
    monkeypatch.setenv("VAE_STORAGE", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parents[1])}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # figures drawn inline
    table = next(o["data"]["text/plain"] for o in outputs if "theory_units" in o.get("data", {}).get("text/plain", ""))
    assert "0.3" in table and "TrainedVAE(linear" in str(outputs)
    # the notebook's claim, from the tables it wrote: every cell's units in use are what theory gives (2, 1, 0)
    from vae.tables.results import Results

    (root,) = {p.parents[1] for p in tmp_path.glob("*/collapse_map/*.parquet")}
    cells = Results(str(root)).read("collapse_map").sort_values("beta")
    assert list(cells.beta) == [0.3, 1, 3] and list(cells.theory_units) == [2, 1, 0]
    assert list(cells.units_in_use_min) == list(cells.units_in_use_max) == [2, 1, 0]


def test_tensorboard_tracking_holds_the_parquet_rows(tmp_path):
    """--tracker tensorboard: event files beside the tables whose scalars equal the epochs table."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vae.config import TrainConfig
    from vae.training.loop import train_loop
    from vae.tables.results import Results
    from vae.training.session import LocalSession

    train_loop(TrainConfig(dataset="gaussian2d", model="linear", decoder_var="1", epochs=3, iw_samples=0,
                           tracker="tensorboard", storage=str(tmp_path), name="tb"), LocalSession())
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard" / "tb"))
    events.Reload()
    rows = Results(str(tmp_path / "tb")).read("epochs").set_index("epoch").sort_index()
    for key in ("test_loss", "units_in_use", "mutual_info", "lr_now"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert sorted(logged) == [0, 1, 2, 3]
        assert logged == pytest.approx(rows[key].astype(float).to_dict(), rel=1e-6)
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2, 3]  # epoch 0 has no training


def test_mlflow_tracking_holds_the_parquet_rows_one_run_per_trial(tmp_path, monkeypatch):
    """--tracker mlflow: one MLflow run per trial (here two members of a pack, one resumed), read back with
    MLflow's own client: params are the config, metric histories equal the epochs table."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks readers of a file store too

    from vae.config import TrainConfig
    from vae.training.loop import train_pack
    from vae.tables.results import Results
    from vae.training.session import LocalSession

    kw = dict(dataset="gaussian2d", model="linear", decoder_var="1", iw_samples=0, tracker="mlflow",
              storage=str(tmp_path), name="ml")
    ck = str(tmp_path / "ml" / "checkpoint_0")
    members = [dict(trial_id="a", beta=0.5), dict(trial_id="b", beta=3.0, seed=1)]
    train_pack([TrainConfig(**kw, epochs=2, **m) for m in members], LocalSession(ck))
    train_pack([TrainConfig(**kw, epochs=3, **m) for m in members], LocalSession(ck))  # resumed: same MLflow runs
    client = MlflowClient((tmp_path / "ml" / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("ml").experiment_id])
    assert sorted(r.data.tags["vae.trial_id"] for r in runs) == ["a", "b"]
    rows = Results(str(tmp_path / "ml")).read("epochs")
    for run in runs:
        tid = run.data.tags["vae.trial_id"]
        assert run.info.status == "FINISHED" and float(run.data.params["beta"]) == dict(a=0.5, b=3.0)[tid]
        mine = rows[rows.trial_id == tid].set_index("epoch").sort_index()
        for key in ("test_loss", "units_in_use", "mutual_info", "lr_now"):
            logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            assert sorted(logged) == [0, 1, 2, 3]
            assert logged == pytest.approx(mine[key].astype(float).to_dict(), rel=1e-6)


def test_a_tracker_that_cannot_work_is_refused_in_one_line(monkeypatch):
    from vae.config import TrainConfig

    with pytest.raises(ConfigError, match="--tracker: must be used with a local --storage"):
        vae.api.train_config(dataset="gaussian2d", tracker="tensorboard", storage="s3://bucket/prefix")
    with pytest.raises(ConfigError, match="--tracker: must be given MLFLOW_TRACKING_URI"):
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        vae.api.train_config(dataset="gaussian2d", tracker="mlflow", storage="s3://bucket/prefix")
    with pytest.raises(ConfigError, match="--tracker: must be one of none, tensorboard, mlflow"):
        TrainConfig(tracker="wandb")
