"""Figures from hand-made tables, the HTML report, escaping, and the page in headless Chromium."""

import json
import os
import re
import shutil
import struct
import subprocess

import numpy as np
import pandas as pd
import pytest

from jobs import report as report_job
from vae.figures import plots
from vae.figures.report import build_report
from vae.tables.results import SCHEMAS, Results


def _blank(table: str) -> dict:
    """A row of `table` with every column empty: "" for text, 0 for numbers."""
    return {f.name: "" if str(f.type) == "string" else 0 for f in SCHEMAS[table]}


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def hand_tables(trial_id="t1", latent=2, toy=False, beta=1.0, epochs=3):
    rng = np.random.default_rng(0)
    base = _blank("epochs") | {"dataset": "mnist", "model": "mlp", "decoder_var": "learned", "kernels": "", "lr_schedule": "constant", "until_settled": False, "settled": False}
    ep = pd.DataFrame([{**base, "trial_id": trial_id, "epoch": e, "latent_dim": latent, "beta": beta, "lr": 1e-3,
                        "hidden_dim": 8, "kl_warmup_epochs": 0.0, "free_bits": 0.0,
                        "train_loss": 100.0 - e if e else float("nan"), "train_recon": 90.0 - e, "train_kl": 10.0,
                        "test_loss": 101.0 - e, "test_recon": 91.0 - e, "test_kl": 10.0, "active_units": latent, "units_in_use": latent,
                        "mutual_info": 0.5 * e} for e in range(epochs + 1)])
    dims = pd.DataFrame([{"trial_id": trial_id, "epoch": e, "dim": d, "kl": 0.5 * d + 0.001, "activity": 0.2 * d}
                         for e in range(epochs + 1) for d in range(latent)])
    if toy:
        pts = lambda n: [rng.normal(size=2).astype(np.float32) for _ in range(n)]  # noqa: E731
        images = pd.DataFrame([{"trial_id": trial_id, "epoch": e, "kind": k, "index": i, "pair": -1, "values": v}
                               for e in (0, epochs) for k in ("original", "generated_noisy")
                               if not (k == "original" and e) for i, v in enumerate(pts(300))])
    else:
        img = lambda: rng.random(784).astype(np.float32)  # noqa: E731
        rows = [("original", i, -1) for i in range(16)] + [("reconstruction", i, -1) for i in range(16)] + \
               [("prior_sample", i, -1) for i in range(64)] + [("interpolation", i, p) for p in range(4) for i in range(10)] + \
               [("manifold", i, -1) for i in range(144)]
        images = pd.DataFrame([{"trial_id": trial_id, "epoch": epochs, "kind": k, "index": i, "pair": p,
                                "values": img()} for k, i, p in rows])
    latents = pd.DataFrame([{"trial_id": trial_id, "epoch": epochs, "index": i, "label": i % 10,
                             "mu": rng.normal(size=latent).astype(np.float32)} for i in range(200)])
    return ep, dims, images, latents


@pytest.mark.parametrize("name, draw, size", [
    ("loss", lambda t, p: plots.loss_curves(t[0], p), (1200, 360)),
    ("heat", lambda t, p: plots.kl_heatmap(t[1], p), (800, 250)),
    ("bars", lambda t, p: plots.kl_bars(t[1], p), (800, 340)),
    ("activity", lambda t, p: plots.activity_curves(t[0], p), (700, 340)),
    ("recon", lambda t, p: plots.reconstructions(t[2], p), None),
    ("prior", lambda t, p: plots.prior_samples(t[2], p), None),
    ("interp", lambda t, p: plots.interpolations(t[2], p), None),
    ("manifold", lambda t, p: plots.manifold(t[2], p), None),
    ("latent2d", lambda t, p: plots.latent_space(t[3], p), (520, 440)),
])
def test_trial_figures_write_pngs_of_the_expected_size(tmp_path, name, draw, size):
    path = draw(hand_tables(), str(tmp_path / f"{name}.png"))
    assert path and os.path.getsize(path) > 1000
    w, h = png_size(path)
    if size:
        assert (w, h) == size
    assert w > 100 and h > 50


def test_latent_space_projects_wider_latents_with_pca_and_tsne(tmp_path):
    path = plots.latent_space(hand_tables(latent=6)[3], str(tmp_path / "l.png"))
    assert png_size(path) == (1040, 440)  # two panels: PCA and t-SNE


def test_toy_and_sweep_figures(tmp_path):
    ep, dims, images, _ = hand_tables(toy=True)
    assert png_size(plots.toy_histograms(images, str(tmp_path / "h.png"))) == (1000, 440)
    assert plots.toy_progress(images, str(tmp_path / "p.png"))
    from tests.test_collapse import _tables
    from vae.tables.collapse import collapse_map, final_rows
    cells = [(f"t{i}", z, b, 0, a, [0.5] * a + [0.0] * (z - a), False)
             for i, (z, b, a) in enumerate([(2, 0.1, 2), (2, 1.0, 1), (2, 3.0, 0), (4, 0.1, 4), (4, 1.0, 2), (4, 3.0, 0)])]
    trials, epochs, kl = _tables(cells)
    table = collapse_map(trials, epochs, kl)
    assert png_size(plots.collapse_heatmaps(table, str(tmp_path / "c.png")))[0] > 500
    final = final_rows(trials, epochs, kl).assign(test_recon=3.0)
    assert plots.rate_distortion(final, str(tmp_path / "rd.png"))


def test_missing_tables_are_skipped_not_crashed(tmp_path):
    empty = {t: SCHEMAS[t].empty_table().to_pandas() for t in SCHEMAS}
    assert plots.loss_curves(empty["epochs"], str(tmp_path / "a.png")) is None
    assert plots.latent_space(empty["latents"], str(tmp_path / "b.png")) is None
    assert plots.collapse_heatmaps(empty["collapse_map"], str(tmp_path / "c.png")) is None
    root = tmp_path / "run"
    ep, dims, images, latents = hand_tables()
    res = Results(str(root))
    res.write("epochs", ep, "a.parquet")
    res.write("kl_per_dim", dims, "a.parquet")
    trial = _blank("trials") | {"trial_id": "t1", "status": "finished", "error": "",
                                                       "dataset": "mnist", "model": "mlp", "decoder_var": "learned",
                                                       "lr_schedule": "constant", "end_reason": "", "pack_id": "t1"}
    res.write("trials", [trial], "t1.parquet")
    index = build_report(str(root))  # no images, no latents table
    page = open(index).read()
    assert "Reconstructions: skipped" in page and "Latent space: skipped" in page
    assert "Loss curves." in page


def test_report_escapes_strings_from_tables(tmp_path):
    root = tmp_path / "run"
    res = Results(str(root))
    ep, dims, _, _ = hand_tables(trial_id="t<1>")
    res.write("epochs", ep, "a.parquet")
    evil = '<script>alert("x")</script>'
    trial = _blank("trials") | {"trial_id": "t<1>", "status": "failed", "error": evil,
                                                       "dataset": "mnist", "model": evil, "decoder_var": "learned",
                                                       "lr_schedule": "constant", "end_reason": evil, "pack_id": "t1"}
    res.write("trials", [trial], "t1.parquet")
    res.write_json("run.json", {"command": f"python -m jobs.train --name {evil}", "config": {"name": evil}})
    build_report(str(root))
    html_text = "".join(p.read_text() for p in (root / "report").glob("*.html"))
    assert "<script>" not in html_text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html_text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_sweep_report_loads_every_image_in_headless_chromium(linear_sweep, tmp_path):
    if CHROMIUM is None:  # CI installs Debian's chromium and sets VAE_REQUIRE_BROWSER: there it must not skip
        if os.environ.get("VAE_REQUIRE_BROWSER") == "1":
            pytest.fail("VAE_REQUIRE_BROWSER=1 but no chromium on PATH: the report was never opened in a browser")
        pytest.skip("Debian's chromium is not installed (.ci/run installs it and sets VAE_REQUIRE_BROWSER=1)")
    out = tmp_path / "report"  # the sweep's folder is shared: the report goes here
    assert report_job.main([linear_sweep, "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    for name in ("collapse-map.png", "rate-distortion.png"):
        assert f'src="{name}"' in page
    for link in re.findall(r'href="(trial-[^"]+\.html)"', page):
        assert (out / link).is_file()
    # What the sweep found comes first, from the map's own numbers.
    table = Results(linear_sweep).read("collapse_map")
    assert page.index("What the sweep found") < page.index("What was run")
    assert f"<b>{len(table)} cells</b>" in page and f"{int((table.status == 'healthy').sum())} healthy" in page
    # Measure the real pages in the browser at 1280 px: a copy beside each reports every <img>'s natural
    # width and whether the page scrolls sideways.
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'chrome'}",
             "--virtual-time-budget=5000", "--window-size=1280,900"]
    trial_page = next(out.glob("trial-*.html"))
    for source in (out / "index.html", trial_page):
        probe = out / f"probe-{source.name}"
        probe.write_text(source.read_text().replace(
            "</body>", "<script>window.addEventListener('load', () => {"
            "document.body.setAttribute('data-widths', JSON.stringify("
            "[...document.images].map(i => [i.getAttribute('src'), i.naturalWidth])));"
            "document.body.setAttribute('data-scroll', JSON.stringify("
            "[document.documentElement.scrollWidth, window.innerWidth]));"
            "});</script></body>"))
        dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                             timeout=120).stdout
        widths = json.loads(re.search(r"data-widths=\"([^\"]*)\"", dom).group(1).replace("&quot;", '"'))
        assert len(widths) >= 2 and all(w > 0 for _, w in widths), (source.name, widths)
        assert {src for src, _ in widths} <= set(pngs)
        scroll_width, inner_width = json.loads(re.search(r"data-scroll=\"([^\"]*)\"", dom).group(1))
        assert scroll_width <= inner_width, (source.name, scroll_width, inner_width)  # no sideways scrolling
    artifacts = os.environ.get("TEST_ARTIFACTS", str(tmp_path / "artifacts"))
    os.makedirs(artifacts, exist_ok=True)
    subprocess.run([CHROMIUM, *flags, "--window-size=1280,2000",
                    f"--screenshot={os.path.join(artifacts, 'report-screenshot.png')}", (out / "index.html").as_uri()],
                   capture_output=True, timeout=120)
    assert os.path.getsize(os.path.join(artifacts, "report-screenshot.png")) > 10_000
