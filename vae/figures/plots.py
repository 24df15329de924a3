"""Figures drawn from the results tables alone (never from live models).

Each function takes DataFrames with the contract's columns (`vae.tables.results`). With a `path` it writes one
PNG, closes the figure and returns the path (the report); without one it returns the matplotlib Figure,
which a notebook draws inline. `ax` draws into an existing axes (its place is split for multi-panel
figures). None means the tables hold nothing to draw (the report then says so).
"""

from __future__ import annotations

import math
from typing import Any

import sys

import matplotlib
import matplotlib.patches
import matplotlib.ticker

if "ipykernel" not in sys.modules:  # a notebook keeps its inline backend, so figures draw in the page
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from vae.config import KL_THRESHOLD  # noqa: E402
from vae.model.sources import GAUSSIAN_COV, GAUSSIAN_MEAN  # noqa: E402

DPI = 100
STYLE = {"axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
         "font.size": 10}


def _subplots(nrows: int = 1, ncols: int = 1, ax=None, squeeze: bool = True, **kwargs):
    """(figure, axes) as `plt.subplots` gives them; given an `ax` (a notebook's, or a panel of a larger
    figure), the panels are drawn in its place instead of in a new figure."""
    if ax is None:  # constrained layout: colour bars and titles without overlaps
        return plt.subplots(nrows, ncols, layout="constrained", squeeze=squeeze, **kwargs)
    fig = ax.figure
    if nrows == ncols == 1 and squeeze:
        return fig, ax
    grid = ax.get_subplotspec().subgridspec(nrows, ncols)
    ax.remove()
    axes = np.array([[fig.add_subplot(grid[i, j]) for j in range(ncols)] for i in range(nrows)])
    return fig, (axes.squeeze() if squeeze and axes.size > 1 else axes[0, 0] if squeeze else axes)


def _plain_log_ticks(axis) -> None:
    """Log-axis labels as plain numbers (0.01, 1, 100), no minor-tick labels like '1.66354 x 10^0'."""
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _finish(fig, path: str | None):
    """With a path: the PNG written and the figure closed (the report); without: the Figure (a notebook)."""
    if path is None:
        return fig
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def loss_curves(epochs: pd.DataFrame, path: str | None = None, ax=None) -> Any:
    """Total, reconstruction and KL per epoch, train and test; epoch 0 is the test before training."""
    if epochs.empty:
        return None
    e = epochs.sort_values("epoch")
    with plt.rc_context(STYLE):
        fig, axes = _subplots(1, 3, figsize=(12, 3.6), ax=ax)
        for ax, (col, title) in zip(axes, [("loss", "negative ELBO"), ("recon", "reconstruction"), ("kl", "KL")]):
            ax.plot(e.epoch, e[f"test_{col}"], "o-", label="test", ms=3)
            ax.plot(e.epoch, e[f"train_{col}"], "s--", label="train", ms=3)
            ax.set(title=title, xlabel="epoch", ylabel="nats per example")
            ax.legend()
        return _finish(fig, path)


def kl_heatmap(kl_per_dim: pd.DataFrame, path: str | None = None, kl_threshold: float = KL_THRESHOLD,
               ax=None) -> Any:
    """KL of each latent dimension over epochs, rows sorted by final KL: units in use on top, the collapsed
    ones grouped below a line at the threshold; its height is capped."""
    if kl_per_dim.empty:
        return None
    grid = kl_per_dim.pivot_table(index="dim", columns="epoch", values="kl")
    grid = grid.loc[grid[grid.columns.max()].sort_values(ascending=False).index]
    used = int((grid[grid.columns.max()] >= kl_threshold).sum())
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, ax = _subplots(figsize=(8, min(6.0, max(2.5, 0.12 * len(grid) + 1.5))), ax=ax)
        im = ax.imshow(np.log10(np.clip(grid.values, 1e-4, None)), aspect="auto", cmap="viridis",
                       interpolation="nearest",
                       extent=(grid.columns.min() - 0.5, grid.columns.max() + 0.5, len(grid) - 0.5, -0.5))
        if 0 < used < len(grid):
            ax.axhline(used - 0.5, color="w", lw=1.5, ls="--")
            ax.text(grid.columns.max() + 0.5, used - 0.5, f" {used} above {kl_threshold:g} nats", color="k",
                    va="center", ha="left", fontsize=8, clip_on=False)
        step = max(1, len(grid) // 25)  # at most about 25 row labels
        ax.set_yticks(range(0, len(grid), step), [str(d) for d in grid.index[::step]], fontsize=7)
        fig.colorbar(im, ax=ax, label="log10 KL (nats)")
        ax.set(xlabel="epoch", ylabel="latent dimension (by final KL)", title="KL per latent dimension")
        return _finish(fig, path)


def kl_bars(kl_per_dim: pd.DataFrame, path: str | None = None, kl_threshold: float = KL_THRESHOLD,
            ax=None) -> Any:
    """Final KL per dimension, sorted, with the collapse threshold."""
    if kl_per_dim.empty:
        return None
    last = kl_per_dim[kl_per_dim.epoch == kl_per_dim.epoch.max()].sort_values("kl", ascending=False)
    with plt.rc_context(STYLE):
        fig, ax = _subplots(figsize=(8, 3.4), ax=ax)
        colors = ["tab:blue" if k >= kl_threshold else "tab:red" for k in last.kl]
        ax.bar(range(len(last)), last.kl, color=colors)
        ax.axhline(kl_threshold, color="k", ls="--", lw=1, label=f"threshold {kl_threshold:g} nats")
        ax.set_xticks(range(len(last)), [str(d) for d in last.dim], fontsize=7)
        ax.set(yscale="symlog", xlabel="latent dimension (sorted)", ylabel="test KL (nats)",
               title=f"KL per dimension at epoch {int(last.epoch.max())}")
        _plain_log_ticks(ax.yaxis)
        ax.legend()
        return _finish(fig, path)


def activity_curves(epochs: pd.DataFrame, path: str | None = None, ax=None) -> Any:
    """Active units, units in use and mutual information I(x; z) over epochs."""
    if epochs.empty:
        return None
    e = epochs.sort_values("epoch")
    with plt.rc_context(STYLE):
        fig, ax = _subplots(figsize=(7, 3.4), ax=ax)
        ax.plot(e.epoch, e.active_units, "o-", color="tab:blue", ms=3, label="active")
        ax.plot(e.epoch, e.units_in_use, "^-", color="tab:green", ms=3, label="in use")
        ax.legend(loc="lower left", fontsize=8)
        ax.set(xlabel="epoch", ylabel="latent units", ylim=(-0.5, e.latent_dim.max() + 0.5))
        ax2 = ax.twinx()
        mi = e.dropna(subset=["mutual_info"])  # measured at snapshot epochs and the last (vae/training/evaluation.py)
        ax2.plot(mi.epoch, mi.mutual_info, "s--", color="tab:orange", ms=3)
        ax2.set_ylabel("mutual information (nats)", color="tab:orange")
        ax.set_title("active units (blue), units in use (green) and I(x; z) (orange)")
        return _finish(fig, path)


def _image_grid(rows: list[np.ndarray], shape: tuple[int, int], path: str | None, title: str,
                row_labels: list[str] | None = None, ax=None) -> Any:
    """Images as one mosaic (a 1-pixel grey gap between them) drawn with a single imshow: a figure of 144
    images costs what one image does, not 144 subplots."""
    h, w = shape
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    mosaic = np.full((n_rows * (h + 1) - 1, n_cols * (w + 1) - 1), 0.5, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, values in enumerate(row):
            mosaic[i * (h + 1):i * (h + 1) + h, j * (w + 1):j * (w + 1) + w] = np.asarray(values).reshape(shape)
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, ax = _subplots(figsize=(0.45 * n_cols + 1.2, 0.45 * n_rows + 0.8), ax=ax)
        ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([(h + 1) * i + h / 2 for i in range(n_rows)] if row_labels else [],
                      row_labels or [], fontsize=8)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(title, fontsize=10)
        return _finish(fig, path)


def _latest(images: pd.DataFrame, kind: str) -> pd.DataFrame:
    rows = images[images.kind == kind]
    return rows[rows.epoch == rows.epoch.max()].sort_values(["pair", "index"]) if len(rows) else rows


def reconstructions(images: pd.DataFrame, path: str | None = None, shape=(28, 28), ax=None) -> Any:
    rec = _latest(images, "reconstruction")
    if rec.empty:
        return None
    orig = images[(images.kind == "original") & (images.epoch == rec.epoch.max())].sort_values("index")
    return _image_grid([list(orig["values"]), list(rec["values"])], shape, path,
                       f"test images (top) and reconstructions (bottom), epoch {int(rec.epoch.max())}",
                       ["original", "recon"], ax=ax)


def prior_samples(images: pd.DataFrame, path: str | None = None, shape=(28, 28), ax=None) -> Any:
    s = _latest(images, "prior_sample")
    if s.empty:
        return None
    vals = list(s["values"])
    cols = 8
    return _image_grid([vals[i:i + cols] for i in range(0, len(vals), cols)], shape, path,
                       f"decoded means of z ~ N(0, I), epoch {int(s.epoch.max())}", ax=ax)


def interpolations(images: pd.DataFrame, path: str | None = None, shape=(28, 28), ax=None) -> Any:
    s = _latest(images, "interpolation")
    if s.empty:
        return None
    rows = [list(g.sort_values("index")["values"]) for _, g in s.groupby("pair")]
    return _image_grid(rows, shape, path, "decoded straight paths between two test codes (holes show as blur)",
                       [f"pair {p}" for p in sorted(s.pair.unique())], ax=ax)


def latent_space(latents: pd.DataFrame, path: str | None = None, tsne: bool = True, ax=None) -> Any:
    """Test-set means in 2-D: as they are for latent size 2, else PCA and (with `tsne`) t-SNE when installed."""
    if latents.empty:
        return None
    mu = np.stack(latents["mu"].to_numpy())
    labels = latents.label.to_numpy()
    views: list[tuple[str, np.ndarray]] = []
    if mu.shape[1] == 2:
        views.append(("latent means (z1, z2)", mu))
    else:
        centred = mu - mu.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        views.append(("PCA of latent means", centred @ vt[:2].T))
        try:
            if not tsne:
                raise ImportError
            from sklearn.manifold import TSNE

            sub = slice(0, min(1000, len(mu)))
            views.append(("t-SNE of latent means (1,000 points)",
                          TSNE(2, init="pca", perplexity=30, random_state=0).fit_transform(mu[sub])))
        except ImportError:
            pass  # PCA alone; the figure's titles say which projections it shows
    with plt.rc_context(STYLE):
        fig, axes = _subplots(1, len(views), figsize=(5.2 * len(views), 4.4), squeeze=False, ax=ax)
        for ax, (title, pts) in zip(axes[0], views):
            lab = labels[: len(pts)]
            sc = ax.scatter(pts[:, 0], pts[:, 1], c=lab, cmap="tab10", s=4, vmin=-0.5, vmax=9.5)
            ax.set(title=title, xlabel="axis 1", ylabel="axis 2")
        if len(np.unique(labels)) > 1:
            fig.colorbar(sc, ax=axes[0].tolist(), label="digit", ticks=range(10))
        return _finish(fig, path)


def manifold(images: pd.DataFrame, path: str | None = None, shape=(28, 28), ax=None) -> Any:
    """Latent size 2: decoded means over a 12 x 12 grid of z in [-2.5, 2.5]^2."""
    s = _latest(images, "manifold")
    if s.empty:
        return None
    vals = list(s.sort_values("index")["values"])
    n = int(round(math.sqrt(len(vals))))
    return _image_grid([vals[i:i + n] for i in range(0, len(vals), n)], shape, path,
                       f"decoded manifold over z1, z2 in [-2.5, 2.5], epoch {int(s.epoch.max())}", ax=ax)


def toy_histograms(images: pd.DataFrame, path: str | None = None, ax=None) -> Any:
    """2-D Gaussian: true test samples and generated samples under the true density's contours."""
    true = images[images.kind == "original"]
    gen = _latest(images, "generated_noisy")
    if true.empty or gen.empty:
        return None
    t, g = np.stack(true["values"].to_numpy()), np.stack(gen["values"].to_numpy())
    mean, cov = np.array(GAUSSIAN_MEAN), np.array(GAUSSIAN_COV)
    xs, ys = np.meshgrid(np.linspace(-3, 5, 120), np.linspace(-3.5, 4.5, 120))
    d = np.stack([xs - mean[0], ys - mean[1]], -1)
    dens = np.exp(-0.5 * np.einsum("...i,ij,...j", d, np.linalg.inv(cov), d)) / (2 * math.pi * math.sqrt(np.linalg.det(cov)))
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, axes = _subplots(1, 2, figsize=(10, 4.4), sharex=True, sharey=True, ax=ax)
        for ax, pts, title in [(axes[0], t, "true test samples"),
                               (axes[1], g, f"generated samples, epoch {int(gen.epoch.max())}")]:
            ax.hist2d(pts[:, 0], pts[:, 1], bins=50, range=[[-3, 5], [-3.5, 4.5]], cmap="Blues")
            ax.contour(xs, ys, dens, levels=5, colors="tab:red", linewidths=0.8)
            ax.set(title=title, xlabel="x1", ylabel="x2")
        return _finish(fig, path)


def toy_progress(images: pd.DataFrame, path: str | None = None, ax=None) -> Any:
    """Generated points at the snapshot epochs: how the model learns the density."""
    gen = images[images.kind == "generated_noisy"]
    if gen.empty:
        return None
    epochs = sorted(gen.epoch.unique())
    with plt.rc_context(STYLE):
        fig, axes = _subplots(1, len(epochs), figsize=(2.6 * len(epochs), 2.8), sharex=True, sharey=True,
                              squeeze=False, ax=ax)
        for ax, ep in zip(axes[0], epochs):
            pts = np.stack(gen[gen.epoch == ep]["values"].to_numpy())
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
            ax.set(title=f"epoch {ep}", xlim=(-3, 5), ylim=(-3.5, 4.5))
        return _finish(fig, path)


def collapse_heatmaps(table: pd.DataFrame, path: str | None = None, ax=None) -> Any:
    """For each learning rate: fraction of units in use over latent size x beta, critical beta on top, diverged marked."""
    if table.empty:
        return None
    lrs = sorted(table.lr.unique())
    with plt.rc_context({**STYLE, "axes.grid": False}):
        dims_all, betas_all = table.latent_dim.nunique(), table.beta.nunique()
        fig, axes = _subplots(1, len(lrs), figsize=(max(6.0, 0.9 * betas_all + 2.5) * len(lrs),
                                                    max(4.2, 0.6 * dims_all + 2)), squeeze=False, ax=ax)
        for ax, lr in zip(axes[0], lrs):
            t = table[table.lr == lr]
            grid = t.pivot_table(index="latent_dim", columns="beta", values="fraction_in_use", aggfunc="mean")
            betas, dims = list(grid.columns), list(grid.index)
            im = ax.imshow(grid.values, origin="lower", aspect="auto", cmap="RdYlGn", vmin=0, vmax=1)
            ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas], rotation=45)
            ax.set_yticks(range(len(dims)), [str(d) for d in dims])
            ax.set(xlabel="beta (KL weight)", ylabel="latent size", title=f"fraction in use, lr {lr:g}")
            used = t.groupby(["latent_dim", "beta"]).units_in_use_mean.mean()
            for (z, b), u in used.items():  # each cell says its count: no guessing from the colour
                if not math.isnan(u):
                    dark = not 0.25 < u / z < 0.8  # RdYlGn is dark at both ends
                    ax.text(betas.index(b), dims.index(z) + 0.18, f"{u:.3g}/{z}", ha="center", va="center",
                            fontsize=9, fontweight="bold", color="white" if dark else "black")
            unsettled = t.groupby(["latent_dim", "beta"]).frac_settled.mean()
            for (z, b), f in unsettled.items():  # hatched: some trial of the cell had not settled
                if f < 1:
                    ax.add_patch(matplotlib.patches.Rectangle((betas.index(b) - 0.5, dims.index(z) - 0.5), 1, 1,
                                                              fill=False, hatch="//", lw=0, color="0.3"))
            if "theory_units" in t and t.theory_units.notna().any():
                theory = t.groupby(["latent_dim", "beta"]).theory_units.first()
                for (z, b), u in theory.items():
                    ax.text(betas.index(b), dims.index(z) - 0.22, f"theory {u:g}", ha="center", va="center",
                            fontsize=7, color="0.25")
            div = t.groupby(["latent_dim", "beta"]).frac_diverged.mean()
            for (z, b), f in div.items():
                if f > 0:
                    ax.text(betas.index(b), dims.index(z), "x", ha="center", va="center", fontsize=14)
            crit = t.groupby("latent_dim").critical_beta.first()
            ys, xs = [], []
            for z, c in crit.items():
                if not math.isnan(c) and len(betas) > 1:
                    xs.append(np.interp(math.log(c), np.log(betas), np.arange(len(betas))))
                    ys.append(dims.index(z))
            if xs:
                ax.plot(xs, ys, "k-o", lw=2, ms=4, label="critical beta")
                ax.legend(loc="upper right", fontsize=8)
        fig.colorbar(im, ax=axes[0].tolist(), label="units in use / latent size")
        return _finish(fig, path)


def rate_distortion(final: pd.DataFrame, path: str | None = None, ax=None) -> Any:
    """Test KL (rate) against reconstruction (distortion) for every trial, coloured by beta."""
    ok = final[np.isfinite(final.test_recon) & np.isfinite(final.test_kl)] if not final.empty else final
    if ok.empty:
        return None
    with plt.rc_context(STYLE):
        fig, ax = _subplots(figsize=(6.5, 4.4), ax=ax)
        collapsed = ok.status == "collapsed"
        sc = ax.scatter(ok.test_kl[~collapsed], ok.test_recon[~collapsed], c=np.log10(ok.beta[~collapsed]),
                        cmap="plasma", s=30, label="not collapsed", vmin=np.log10(ok.beta.min()),
                        vmax=np.log10(ok.beta.max()) + 1e-9)
        ax.scatter(ok.test_kl[collapsed], ok.test_recon[collapsed], marker="x", c="k", s=40, label="collapsed")
        fig.colorbar(sc, ax=ax, label="log10 beta")
        ax.set(xscale="symlog", xlabel="rate: test KL (nats)", ylabel="distortion: test reconstruction (nats)",
               title="rate-distortion over trials")
        ax.legend()
        return _finish(fig, path)


def fraction_curves(table: pd.DataFrame, path: str | None = None, ax=None) -> Any:
    """Grid and random searches: one panel per learning rate, a line per latent size, fraction in use over
    beta, with each latent size's critical beta marked."""
    if table.empty:
        return None
    lrs = sorted(table.lr.unique())
    with plt.rc_context(STYLE):
        fig, axes = _subplots(1, len(lrs), figsize=(5.2 * len(lrs), 3.6), squeeze=False, sharey=True, ax=ax)
        for ax, lr in zip(axes[0], lrs):
            t = table[table.lr == lr]
            for z, cell in t.groupby("latent_dim"):
                cell = cell.sort_values("beta")
                line, = ax.plot(cell.beta, cell.fraction_in_use, "o-", ms=3, label=f"latent {z}")
                crit = cell.critical_beta.iloc[0]
                if not math.isnan(crit):
                    ax.axvline(crit, color=line.get_color(), lw=0.8, ls=":")
            ax.axhline(0.5, color="k", lw=0.8, ls="--")
            ax.set(xscale="log", ylim=(-0.05, 1.05), xlabel="beta", title=f"lr {lr:g}")
            _plain_log_ticks(ax.xaxis)
            ax.legend(fontsize=8)
        axes[0][0].set_ylabel("fraction of units in use")
        return _finish(fig, path)


def brackets(table: pd.DataFrame, path: str | None = None, ax=None) -> Any:
    """Each cell's tried betas and their fractions of units in use, with the final critical-beta bracket shaded."""
    if table.empty:
        return None
    cells = list(table.groupby(["latent_dim", "lr"]))
    cols = min(3, len(cells))
    rows = -(-len(cells) // cols)
    with plt.rc_context(STYLE):
        fig, axes = _subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False, ax=ax)
        for ax in axes.flat[len(cells):]:
            ax.axis("off")
        for ax, ((z, lr), cell) in zip(axes.flat, cells):
            cell = cell.sort_values("beta")
            ok = cell[cell.frac_diverged < 1]
            ax.plot(ok.beta, ok.fraction_in_use, "o-", ms=4)
            bad = cell[cell.frac_diverged >= 1]
            ax.plot(bad.beta, [0.5] * len(bad), "kx", ms=8, label="diverged" if len(bad) else None)
            lo, hi = cell.critical_beta_lower.iloc[0], cell.critical_beta_upper.iloc[0]
            if not (math.isnan(lo) or math.isnan(hi)):
                ax.axvspan(lo, hi, color="tab:red", alpha=0.25, label=f"bracket {lo:.3g}-{hi:.3g}")
            ax.axhline(0.5, color="k", lw=0.8, ls="--")
            title = f"latent {z}, lr {lr:g}: {len(cell)} betas"
            if not bool(cell.monotone.iloc[0]):
                title += " (not monotone)"
            ax.set(xscale="log", ylim=(-0.05, 1.05), xlabel="beta", ylabel="fraction in use", title=title)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        return _finish(fig, path)


def decoder_strength(table: pd.DataFrame, path: str | None = None, ax=None) -> Any:
    """Units in use and test KL over the autoregressive decoder's context W x beta (from `collapse_map/`, the
    plain method's cells): where collapse sets in as the decoder gets stronger."""
    t = table[(table.get("mitigation", "none") == "none")] if "mitigation" in table else table
    if t.empty or t.decoder_context.nunique() < 2:
        return None
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, axes = _subplots(1, 2, figsize=(11, 4.2), squeeze=False, ax=ax)
        for ax, (value, label, cmap) in zip(axes[0], (("units_in_use_mean", "units in use", "RdYlGn"),
                                                      ("total_kl", "test KL (nats)", "viridis"))):
            grid = t.pivot_table(index="decoder_context", columns="beta", values=value, aggfunc="mean")
            im = ax.imshow(grid.values, origin="lower", aspect="auto", cmap=cmap)
            ax.set_xticks(range(grid.shape[1]), [f"{b:g}" for b in grid.columns])
            ax.set_yticks(range(grid.shape[0]), [str(w) for w in grid.index])
            ax.set(xlabel="beta (KL weight)", ylabel="decoder context W (pixels)", title=label)
            for (r, c), v in np.ndenumerate(grid.values):
                if not math.isnan(v):
                    ax.text(c, r, f"{v:.3g}", ha="center", va="center", fontsize=9, fontweight="bold",
                            color="black", bbox={"facecolor": "white", "alpha": 0.6, "lw": 0})
            fig.colorbar(im, ax=ax)
        return _finish(fig, path)
