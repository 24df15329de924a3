"""The HTML report: figures from `vae.figures.plots` plus tables, all read from the Parquet tables.

`<root>/report/index.html` explains what was run and what it found; each
trial gets `trial-<id>.html`. Images sit beside the pages (no network). Every
string that came from a table or a config is HTML-escaped.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import html
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd
import pyarrow.dataset as ds

from vae.figures import plots
from vae.axes import CELL_AXES
from vae.tables.collapse import (METHOD_KEYS, Thresholds, collapse_map, final_rows, method_table, recorded_thresholds,
                                 theory_agreement)
from vae.tables.results import SAFE_KEY, Results, pack_utilisation, slot_utilisation

AUTO_TRIAL_PAGES = 24  # trial pages drawn with the index; others with --trial


@dataclass
class Figure:
    file: str | None
    title: str
    caption: str


@dataclass
class Page:
    title: str
    sections: list[str] = field(default_factory=list)

    def html(self) -> str:
        body = "\n".join(self.sections)
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }}
figure {{ margin: 1.5em 0; }} figure img {{ max-width: 100%; height: auto; border: 1px solid #ddd; }}
figcaption {{ color: #444; font-size: 0.95em; }} .missing {{ color: #a33; font-style: italic; }}
.scroll {{ overflow-x: auto; max-width: 100%; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; }} th {{ background: #f4f4f4; }}
pre {{ background: #f6f6f6; padding: 0.8em; white-space: pre-wrap; overflow-wrap: anywhere; }}
dl.settings {{ display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: 2px 1em; font-size: 0.9em; }}
dl.settings dt {{ color: #555; }} dl.settings dd {{ margin: 0; overflow-wrap: anywhere; }}
.summary {{ background: #f4f8f4; border: 1px solid #cdc; padding: 0.6em 1em; }}
</style></head><body>
<h1>{html.escape(self.title)}</h1>
{body}
</body></html>
"""


def figure_html(fig: Figure) -> str:
    if fig.file is None:
        return f'<p class="missing">{html.escape(fig.title)}: skipped ({html.escape(fig.caption)}).</p>'
    return (f'<figure><img src="{html.escape(os.path.basename(fig.file))}" alt="{html.escape(fig.title)}">'
            f"<figcaption><b>{html.escape(fig.title)}.</b> {html.escape(fig.caption)}</figcaption></figure>")


def settings_html(values: dict) -> str:
    """A run's settings as a key/value list (long values wrap; no sideways scrolling)."""
    items = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in values.items())
    return f'<dl class="settings">{items}</dl>'


def table_html(df: pd.DataFrame, links: dict[str, str] | None = None, digits: int = 3) -> str:
    if df.empty:
        return '<p class="missing">no rows</p>'
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for rec in df.to_dict("records"):
        cells = []
        for col, val in rec.items():
            text = f"{val:.{digits}g}" if isinstance(val, float) else str(val)
            text = html.escape(text)
            if links and col == "trial_id" and str(val) in links:
                text = f'<a href="{html.escape(links[str(val)])}">{text}</a>'
            cells.append(f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(rows)}</table></div>'


def _draw(out: str, name: str, fn: Callable[..., str | None], *args, title: str, caption: str) -> Figure:
    try:
        path = fn(*args, os.path.join(out, name))
    except Exception as e:  # a figure that cannot be drawn must not sink the report
        return Figure(None, title, f"not drawn: {type(e).__name__}: {e}")
    return Figure(path, title, caption) if path else Figure(None, title, "the tables hold no data for it")


# (file suffix, table it reads, figure function, title, caption); a function takes (table, path) -> PNG or None.
SCALAR_FIGURES = [
    ("loss", "epochs", plots.loss_curves, "Loss curves",
     "Negative ELBO, reconstruction and KL per epoch (epoch 0: before training). "
     "KL often rises first, then settles; a KL that falls to zero is collapse."),
    ("kl-heatmap", "kl_per_dim", plots.kl_heatmap, "KL per latent dimension over epochs",
     "Rows sorted by final KL: units in use on top, collapsed ones (dark) below the dashed line at the KL "
     "threshold. KL near zero in a dimension means the decoder ignores it."),
    ("kl-bars", "kl_per_dim", plots.kl_bars, "Final KL per dimension",
     "Sorted; red bars fall under the KL threshold ({kl:g} nats) and carry no information about x."),
    ("activity", "epochs", plots.activity_curves, "Active units, units in use and mutual information",
     "Active: units whose mean varies with x (Var > {active:g}); in use: active and with test KL of at least "
     "{kl:g} nats; and I(x; z). All at zero is full collapse."),
]
IMAGE_FIGURES = [
    ("recon", "images", plots.reconstructions, "Reconstructions",
     "Originals above reconstructions: blur is the VAE's known trait; identical "
     "reconstructions for different digits mean collapse."),
    ("prior", "images", plots.prior_samples, "Prior samples",
     "Decoded means of z ~ N(0, I): digits where the prior has mass the decoder learned."),
    ("interp", "images", plots.interpolations, "Interpolations",
     "Straight paths between two test codes; non-digits along the way are holes in the latent space."),
    ("manifold", "images", plots.manifold, "Decoded manifold",
     "Latent size 2 only: decoded means over a grid of z; smooth change means a well-used latent space."),
    ("latents", "latents", plots.latent_space, "Latent space",
     "Test-set means coloured by digit: PCA, and t-SNE when scikit-learn is installed; "
     "digits in separate clusters mean z carries the class."),
]
TOY_FIGURES = [
    ("toy-hist", "images", plots.toy_histograms, "True and generated densities",
     "2-D histograms under the true density's contours: a good model fills the same ellipses."),
    ("toy-progress", "images", plots.toy_progress, "Generated samples over training",
     "Samples at epochs spread over training: how the model learns the density."),
]


def trial_figures(res: Results, trial_id: str, out: str, thresholds: Thresholds, tsne: bool = True) -> list[Figure]:
    only = ds.field("trial_id") == trial_id
    tables = {t: res.read(t, only) for t in ("epochs", "kl_per_dim", "images", "latents")}
    toy = (tables["images"].kind == "generated").any()  # else images (MNIST), or nothing: those say skipped
    key = SAFE_KEY.sub("_", trial_id)
    figs = []
    for suffix, table, fn, title, caption in SCALAR_FIGURES + (TOY_FIGURES if toy else IMAGE_FIGURES):
        if fn is plots.latent_space:
            fn = functools.partial(plots.latent_space, tsne=tsne)
        if fn in (plots.kl_bars, plots.kl_heatmap):
            fn = functools.partial(fn, kl_threshold=thresholds.kl)
        caption = caption.format(active=thresholds.active, kl=thresholds.kl)
        figs.append(_draw(out, f"{key}-{suffix}.png", fn, tables[table], title=title, caption=caption))
    return figs


def trial_page(res: Results, trial: pd.Series, out: str, thresholds: Thresholds,
               tsne: bool = True) -> tuple[str, list[Figure]]:
    """Write `trial-<id>.html`; returns its file name and its figures."""
    tid = str(trial.trial_id)
    page = Page(f"Trial {tid}")
    page.sections.append('<p><a href="index.html">back to the report</a></p>')
    page.sections.append(settings_html({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                        for k, v in trial.to_dict().items()}))
    figs = trial_figures(res, tid, out, thresholds, tsne)
    page.sections += [figure_html(fig) for fig in figs]
    name = f"trial-{SAFE_KEY.sub('_', tid)}.html"
    with open(os.path.join(out, name), "w", encoding="utf-8") as fh:
        fh.write(page.html())
    return name, figs


def _page_job(args: tuple) -> tuple[str, str, list[Figure]]:
    root, trial, out, thresholds, tsne = args
    name, figs = trial_page(Results(root), trial, out, thresholds, tsne)
    return str(trial.trial_id), name, figs


def trial_pages(root: str, trials: pd.DataFrame, out: str, thresholds: Thresholds, tsne: bool,
                progress: Callable[[str], None] | None = None, processes: int = 1) -> tuple[dict[str, str], list[Figure]]:
    """Every trial page, drawn in up to `processes` spawned processes; a progress line per page. Returns
    {trial_id: page} and the figures of the last page (a single run shows them inline). Spawned processes
    re-import the caller's main module, so a script calling this with processes > 1 needs the usual
    `if __name__ == "__main__":` guard (`jobs.report` has it and uses one process per CPU)."""
    jobs = [(root, trial, out, thresholds, tsne) for _, trial in trials.iterrows()]
    pages: dict[str, str] = {}
    figures: list[Figure] = []
    workers = min(len(jobs), max(1, processes))
    if workers > 1:
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = pool.map(_page_job, jobs)
            for i, (tid, name, figures) in enumerate(done, 1):
                pages[tid] = name
                if progress:
                    progress(f"page {i}/{len(jobs)}: {name}")
        return pages, figures
    for i, job in enumerate(jobs, 1):
        tid, name, figures = _page_job(job)
        pages[tid] = name
        if progress:
            progress(f"page {i}/{len(jobs)}: {name}")
    return pages, figures


def summary_html(table: pd.DataFrame, info: dict) -> str:
    """What the sweep found, in a few sentences and a small table, every number from `collapse_map/`."""
    counts = table.status.value_counts()
    n = len(table)
    unsettled = int((table.frac_settled < 1).sum())
    parts = [f"{int(counts.get(c, 0))} {c}" for c in ("healthy", "partial", "collapsed", "diverged")]
    text = [f"<b>{n} cells</b>: {', '.join(parts)}; <b>{unsettled} unsettled</b> (a trial's count could still "
            "change)."]
    crit = table.groupby(CELL_AXES, dropna=False).first().reset_index()
    found = crit[crit.critical_beta.notna()]
    if len(found):
        text.append("Critical beta (half the units gone): " + "; ".join(
            f"latent {int(r.latent_dim)}, lr {r.lr:g}: <b>{r.critical_beta:.3g}</b> (between "
            f"{r.critical_beta_lower:g} and {r.critical_beta_upper:g})" for r in found.itertuples()) + ".")
    else:
        text.append("No (latent size, learning rate) pair lost half its units within the betas tried.")
    wiggly = crit[~crit.monotone]
    if len(wiggly):
        text.append("Not monotone in beta (units come back at a larger beta): " + ", ".join(
            f"latent {int(r.latent_dim)}, lr {r.lr:g}" for r in wiggly.itertuples()) + ".")
    agree = theory_agreement(table)
    if agree["cells"]:
        text.append(f"Against the linear VAE's theory: {agree['match']} cells match, {agree['off']} off, "
                    f"{agree['too_close']} too close to an eigenvalue to judge.")
    cfg = info.get("config", {})
    budget = (f"until settled, {cfg.get('epochs')} to {cfg.get('max_epochs') or 10 * int(cfg.get('epochs', 0))} "
              "epochs" if cfg.get("until_settled") else f"a fixed {cfg.get('epochs', '?')} epochs")
    examples = "all" if not cfg.get("subset") else cfg.get("subset")
    text.append(html.escape(f"Budget: {budget} per trial, {examples} training examples, {cfg.get('search', '?')} "
                            f"search, {int(table.n_trials.sum())} trials."))
    small = pd.DataFrame([{"status": c, "cells": int(counts.get(c, 0))}
                          for c in ("healthy", "partial", "collapsed", "diverged")]
                         + [{"status": "unsettled", "cells": unsettled}])
    return ('<div class="summary"><h2>What the sweep found</h2><p>' + " ".join(text) + "</p>"  # numbers only,
            + table_html(small) + "</div>")  # and the budget line escaped


def cells_html(table: pd.DataFrame, final: pd.DataFrame, pages: dict[str, str]) -> str:
    """The map as a table: a row per (latent size, lr), a column per beta, each cell 'in use / latent size',
    linked to a trial page of that cell where one was drawn."""
    betas = sorted(table.beta.unique())
    head = "<th>latent</th><th>lr</th>" + "".join(f"<th>beta {b:g}</th>" for b in betas)
    rows = []
    for (z, lr), part in table.groupby(["latent_dim", "lr"]):
        cells = []
        for b in betas:
            row = part[part.beta == b]
            if row.empty:
                cells.append("<td></td>")
                continue
            r = row.iloc[0]
            text = "x" if r.status == "diverged" else f"{r.units_in_use_mean:.3g}/{int(z)}"
            text += "" if r.frac_settled >= 1 else "*"
            tids = [] if final.empty else final[(final.latent_dim == z) & (final.lr == lr) & (final.beta == b)].trial_id
            link = next((pages[t] for t in tids if t in pages), None)
            cells.append(f'<td><a href="{html.escape(link)}">{html.escape(text)}</a></td>' if link
                         else f"<td>{html.escape(text)}</td>")
        rows.append(f"<tr><td>{int(z)}</td><td>{lr:g}</td>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table><tr>{head}</tr>{"".join(rows)}</table></div>'
            "<p>* not settled; x diverged. Units in use over latent size, mean over repeats.</p>")


def build_report(root: str, out: str | None = None, trial_id: str | None = None,
                 thresholds: Thresholds | None = None, progress: Callable[[str], None] | None = None,
                 processes: int = 1) -> str:
    """Write the report for `root` (a run or a sweep); returns the page written.

    Units in use are counted with the thresholds the run recorded, unless `thresholds` overrides them
    (the page then says so).
    """
    res = Results(root)
    recorded = recorded_thresholds(res)
    overridden = thresholds is not None and thresholds != recorded
    thresholds = thresholds or recorded
    if not out:  # beside the tables when they are local; in the current folder when they are in a bucket
        out = os.path.join(root, "report") if "://" not in root else os.path.basename(root.rstrip("/")) + "-report"
    os.makedirs(out, exist_ok=True)
    trials, epochs, dims = res.read("trials"), res.read("epochs"), res.read("kl_per_dim")
    if trial_id is not None:
        match = trials[trials.trial_id == trial_id]
        if match.empty:
            raise KeyError(trial_id)
        return os.path.join(out, trial_page(res, match.iloc[0], out, thresholds, tsne=True)[0])

    info = res.read_json("run.json") or {}
    page = Page(f"VAE collapse report: {os.path.basename(root.rstrip('/'))}")
    page.sections.append(
        f"<p>Results folder <code>{html.escape(root)}</code>; report drawn "
        f"{html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}. {len(trials)} trial(s), {len(epochs)} epoch rows. A unit is "
        f"<i>in use</i> when its activity Var_x E_q[z_j] exceeds {thresholds.active:g} and its test KL is at least "
        f"{thresholds.kl:g} nats ("
        + ("<b>thresholds overridden</b>; the run recorded "
           f"{recorded.active:g} and {recorded.kl:g}" if overridden else "the run's own thresholds") + ").</p>")
    summary_at = len(page.sections)  # the summary goes first, once the map is known
    if info:
        page.sections.append("<h2>What was run</h2><pre>" + html.escape(info.get("command", "")) + "</pre>")
        page.sections.append(settings_html(info.get("config", {})))
        page.sections.append("<p>Started " + html.escape(str(info.get("started", "?"))) + "; software: "
                             + html.escape(", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items()))
                             + "</p>")
    final = final_rows(trials, epochs, dims, thresholds) if not epochs.empty else pd.DataFrame()
    ranked = trials.sort_values("test_loss") if not trials.empty else trials
    pages, figures = trial_pages(root, ranked.head(AUTO_TRIAL_PAGES), out, thresholds, tsne=len(trials) == 1,
                                 progress=progress, processes=processes)

    table = pd.DataFrame()
    if len(trials) > 1:
        table = res.read("collapse_map")
        stale = not table.empty and not ((table.active_threshold == thresholds.active)
                                         & (table.kl_threshold == thresholds.kl)).all()
        if (table.empty or stale) and not final.empty:  # drawn with other thresholds (or never): recompute
            table = collapse_map(trials, epochs, dims, thresholds, res.read("spectrum"))
        page.sections.append("<h2>The collapse map</h2>")
        if not table.empty:
            unsettled = int((table.frac_settled < 1).sum())
            budget = ("trained until settled" if bool(info.get("config", {}).get("until_settled")) else
                      f"a fixed budget of {info.get('config', {}).get('epochs', '?')} epochs")
            words = (f"<p>The map used {html.escape(budget)}. {len(table) - unsettled} of {len(table)} cells had "
                     f"settled (every trial's units clearly in use or unused, the count steady); "
                     f"<b>{unsettled} unsettled</b> (hatched in the figure: their counts may still change).")
            agree = theory_agreement(table)
            if agree["cells"]:
                words += (f" Against the linear VAE's theory (units with a data-covariance eigenvalue above beta "
                          f"times the decoder variance): {agree['match']} cells match, {agree['off']} are off, "
                          f"{agree['too_close']} lie too close to an eigenvalue to judge.")
            page.sections.append(words + "</p>")
        page.sections.append(figure_html(_draw(
            out, "collapse-map.png", plots.collapse_heatmaps, table, title="Collapse map",
            caption="Hatched cells had not settled. Share of latent units in use for each latent size and beta (green: all, red: none); the black "
                    "line is the critical beta where half the units are gone; x marks diverged cells.")))
        if not table.empty:
            page.sections.append("<h3>Cells, with links to their trial pages</h3>" + cells_html(table, final, pages))
        if info.get("config", {}).get("search") == "boundary":
            page.sections.append(figure_html(_draw(
                out, "brackets.png", plots.brackets, table, title="Where the boundary lies",
                caption="Each cell's betas tried (placed adaptively by the boundary search) and their fractions of "
                        "units in use; the shaded band is the bracket around the critical beta, where half the "
                        "units are gone.")))
        else:
            page.sections.append(figure_html(_draw(
                out, "boundary.png", plots.fraction_curves, table, title="Where the boundary lies",
                caption="Fraction of units in use against beta, one panel per learning rate and a line per latent "
                        "size; dotted lines mark each latent size's critical beta, where the line crosses one "
                        "half.")))
        if not table.empty and "decoder_context" in table and table.decoder_context.nunique() > 1:
            page.sections.append(figure_html(_draw(
                out, "decoder-strength.png", plots.decoder_strength, table, title="Decoder strength",
                caption="Units in use and test KL of the plain VAE over the autoregressive decoder's context W (the "
                        "previous pixels each pixel's Bernoulli sees; 0: the factorised decoder) and beta: "
                        "where a decoder strong enough to model the data without z makes the posterior collapse.")))
        methods = method_table(trials) if set(METHOD_KEYS) <= set(trials.columns) else pd.DataFrame()
        if not methods.empty and methods.mitigation.nunique() > 1:
            page.sections.append(
                "<h2>Mitigations compared (in the form of He et al. 2019, Table 1)</h2><p>NLL: the importance-"
                "weighted bound with each run's --iw-samples; KL: test-set KL; MI: I(x; z) by He et al.'s estimator "
                "on 2,000 test images (the aggregate posterior as the mixture of their q(z|x), so at most "
                "log 2000 = 7.6 nats; He et al.'s is per minibatch, at most log of its size); cost: wall time "
                "relative to the plain VAE (none) of the same decoder, context and beta.</p>" + table_html(
                    methods[METHOD_KEYS + ["n_trials", "iw_nll", "kl", "mutual_info", "units_in_use",
                                           "relative_cost"]]))
        page.sections.append(figure_html(_draw(
            out, "rate-distortion.png", plots.rate_distortion, final, title="Rate and distortion",
            caption="Each trial's test KL (rate) against reconstruction (distortion); collapsed trials (x) sit at "
                    "zero rate with the worst reconstructions.")))
        show = ["trial_id", "latent_dim", "lr", "beta", "seed", "status", "test_loss", "iw_nll", "units_in_use",
                "active_units"]
        if not final.empty:
            page.sections.append("<h2>Best trials by test loss</h2>"
                                 + table_html(final.sort_values("test_loss")[show].head(10), pages))
            page.sections.append("<h2>Best trials by IW NLL</h2>"
                                 + table_html(final.sort_values("iw_nll")[show].head(10), pages))
        if not table.empty:
            bad = table[table.status.isin(["collapsed", "diverged"])]
            page.sections.append("<h2>Collapsed and diverged cells</h2>" + table_html(
                bad[["latent_dim", "lr", "beta", "n_trials", "fraction_in_use", "total_kl", "status", "frac_settled"]]))
            if table.theory_units.notna().any():
                page.sections.append("<h2>Measured against theory (linear VAE)</h2>" + table_html(
                    table[table.theory_units.notna()][["latent_dim", "lr", "beta", "units_in_use_min",
                                                       "units_in_use_max", "theory_units", "theory_close",
                                                       "frac_settled"]]))
            crit = table.groupby(CELL_AXES, dropna=False).first().reset_index()
            page.sections.append("<h2>Critical beta per (latent size, learning rate)</h2>" + table_html(
                crit[["latent_dim", "lr", "critical_beta", "critical_beta_lower", "critical_beta_upper",
                      "monotone"]]))
        packs = pack_utilisation(trials) if "pack_slots" in trials else pd.DataFrame()
        if len(packs) and (packs.slots > 1).any():
            page.sections.append(
                f"<h2>How full the packs ran</h2><p>Slot utilisation over all packs: {100 * slot_utilisation(packs):.0f}% "
                "(member-epochs "
                "trained / slot-steps the packs trained; a slot is refilled from its pack's queue when its member "
                "ends, and once the queue is empty the pack gives up its ended slots).</p>" + table_html(packs))
    elif len(trials) == 1:  # a single training run: its figures on the index too
        page.sections += [figure_html(fig) for fig in figures]
    show_all = [c for c in ["trial_id", "latent_dim", "lr", "beta", "seed", "status", "error", "epochs_done",
                            "test_loss", "iw_nll", "units_in_use", "active_units", "settled", "end_reason"]
                if c in trials.columns]
    page.sections.append("<h2>All trials</h2>" + table_html(trials[show_all], pages))
    if len(trials) > len(pages):
        page.sections.append(f"<p>Pages were drawn for the {len(pages)} best trials; draw any other with "
                             "<code>python -m jobs.report ROOT --trial TRIAL_ID</code>.</p>")
    if len(trials) > 1 and not table.empty:
        page.sections.insert(summary_at, summary_html(table, info))
    index = os.path.join(out, "index.html")
    with open(index, "w", encoding="utf-8") as fh:
        fh.write(page.html())
    return index
