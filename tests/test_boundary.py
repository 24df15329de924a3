"""The boundary searcher against fake trainables with known thresholds, then a small real search."""

import glob
import json
import math

import pytest

from tune.boundary import BoundarySearcher, log_points
from tune.points import trial_key

LO, HI, TOL = 0.01, 100.0, 1.15
BISECTION = 2 + math.ceil(math.log2(math.log(HI / LO) / math.log(TOL)))  # endpoints + halvings: 9


def fake_result(fraction: float, latent: int = 4) -> dict:
    used = round(fraction * latent)
    return {"status": "finished", "units_in_use": used, "kl_per_dim": [1.0] * used + [0.0] * (latent - used),
            "activity": [1.0] * used + [0.0] * (latent - used)}


def drive(searcher: BoundarySearcher, outcome, concurrent: int = 1, stop_after: int | None = None) -> list[dict]:
    """Run the searcher as Tune would, `concurrent` trials at a time; returns every config it proposed.

    Unpacked (a pack of one), `outcome` sees the trial's one point and returns its report, which reaches the
    searcher under `members` as the loop reports it; packed, `outcome` sees and answers the whole pack."""
    proposed, live, n = [], [], 0
    if searcher.pack == 1:
        plain = outcome

        def outcome(cfg):
            return {"members": {trial_key(cfg["members"][0]): plain(cfg)}}
    while True:
        while len(live) < concurrent:
            cfg = searcher.suggest(f"t{n}")
            if cfg is None or cfg == BoundarySearcher.FINISHED:
                break
            if searcher.pack == 1:
                (member,) = cfg["members"]
                cfg = {**cfg, **member}
            proposed.append(cfg)
            live.append((f"t{n}", cfg))
            n += 1
        if not live:
            assert searcher.suggest(f"t{n}") == BoundarySearcher.FINISHED
            return proposed
        tid, cfg = live.pop(0)
        searcher.on_trial_complete(tid, outcome(cfg))
        if stop_after is not None and len(proposed) >= stop_after and not live:
            return proposed


def final_bracket(searcher: BoundarySearcher, cell: int = 0):
    pairs, monotone = searcher.brackets(cell)
    return pairs, monotone


def test_log_points_split_in_equal_log_parts():
    assert log_points(1.0, 100.0, 1) == pytest.approx([10.0])
    assert log_points(1.0, 1000.0, 2) == pytest.approx([10.0, 100.0])


@pytest.mark.parametrize("threshold", [0.037, 1.5, 42.0])
def test_step_threshold_is_bracketed_with_bisection_trials(threshold):
    s = BoundarySearcher([(4, 1e-3)], (LO, HI), TOL)
    proposed = drive(s, lambda c: fake_result(1.0 if c["beta"] < threshold else 0.0))
    (pairs, monotone) = final_bracket(s)
    assert monotone and len(pairs) == 1
    lower, upper = pairs[0]
    assert lower <= threshold < upper and upper / lower <= TOL
    assert len(proposed) <= BISECTION


def test_parallel_rounds_split_brackets_into_k_plus_one_parts():
    s = BoundarySearcher([(4, 1e-3)], (LO, HI), TOL, max_concurrent=3)
    proposed = drive(s, lambda c: fake_result(1.0 if c["beta"] < 2.0 else 0.0), concurrent=3)
    lower, upper = final_bracket(s)[0][0]
    assert lower <= 2.0 < upper and upper / lower <= TOL
    rounds_needed = 1 + math.ceil(math.log(math.log(HI / LO) / math.log(TOL)) / math.log(4))
    assert len(proposed) <= 2 + 1 + 3 * rounds_needed  # the first round brings both ends and one interior point
    assert proposed[0]["beta"] == LO and proposed[1]["beta"] == HI
    assert proposed[2]["beta"] == pytest.approx(1.0)  # 3 slots: the first round already splits the range


def test_noisy_repeats_are_averaged_before_deciding():
    s = BoundarySearcher([(4, 1e-3)], (LO, HI), TOL, repeats=3)

    def noisy(c):  # each seed sees its own threshold near 1.0; the averaged fraction crosses 1/2 at 1.0
        t = 1.0 * math.exp({0: -0.02, 1: 0.0, 2: 0.02}[c["seed"]])
        return fake_result(1.0 if c["beta"] < t else 0.0)

    proposed = drive(s, noisy)
    lower, upper = final_bracket(s)[0][0]
    assert lower <= 1.0 * math.exp(0.02) and upper >= 1.0 * math.exp(-0.02) and upper / lower <= TOL
    assert len(proposed) <= 3 * BISECTION
    assert {c["seed"] for c in proposed} == {0, 1, 2}


def test_non_monotone_results_are_flagged_and_every_crossing_refined():
    def outcome(c):  # healthy, collapsed between 0.1 and 1, healthy again up to 10, collapsed above
        b = c["beta"]
        return fake_result(1.0 if b < 0.1 or 1.0 <= b < 10.0 else 0.0)

    s = BoundarySearcher([(4, 1e-3)], (LO, HI), TOL)
    s.cells[0]["outcomes"] = {repr(b): [outcome({"beta": b})["kl_per_dim"].count(1.0) / 4]  # a coarse first look
                              for b in (LO, 0.3, 3.0, HI)}
    drive(s, outcome)
    pairs, monotone = final_bracket(s)
    assert not monotone and len(pairs) == 3
    for (lo, hi), t in zip(pairs, [0.1, 1.0, 10.0]):
        assert lo <= t <= hi and hi / lo <= TOL


def test_diverged_trials_are_their_own_outcome_not_collapse():
    s = BoundarySearcher([(4, 1e-3)], (LO, HI), TOL)

    def outcome(c):
        if 5.0 < c["beta"] < 20.0:
            return {"status": "diverged"}
        return fake_result(1.0 if c["beta"] < 1.5 else 0.0)

    drive(s, outcome)
    lower, upper = final_bracket(s)[0][0]
    assert lower <= 1.5 < upper and upper / lower <= TOL
    assert any(math.isnan(f) for f in s.fractions(s.cells[0]).values())


def test_state_round_trips_through_json_and_continues_the_same_brackets(tmp_path):
    outcome = lambda c: fake_result(1.0 if c["beta"] < 0.7 else 0.0)  # noqa: E731
    whole = BoundarySearcher([(4, 1e-3), (2, 1e-2)], (LO, HI), TOL)
    drive(whole, outcome)
    part = BoundarySearcher([(4, 1e-3), (2, 1e-2)], (LO, HI), TOL)
    drive(part, outcome, stop_after=5)
    part.save(str(tmp_path / "state.json"))
    json.loads((tmp_path / "state.json").read_text())  # plain data, no pickle
    resumed = BoundarySearcher([], (1, 2), 2.0)
    resumed.restore(str(tmp_path / "state.json"))
    drive(resumed, outcome)
    assert [c["brackets"] for c in resumed.summary()] == [c["brackets"] for c in whole.summary()]
    assert sum(c["trials"] for c in resumed.summary()) == sum(c["trials"] for c in whole.summary())


def _search_args(storage, name, extra=()):
    return ["--dataset", "gaussian2d", "--model", "linear", "--decoder-var", "1", "--latent-dims", "2",
            "--lrs", "1e-2", "--search", "boundary", "--beta-range", "0.1,10", "--beta-tolerance", "1.3",
            "--epochs", "6", "--iw-samples", "0", "--storage", str(storage), "--name", name, *extra]


@pytest.fixture(scope="module")
def whole_search(ray_cluster, tmp_path_factory) -> str:
    """One real search, one trial at a time (as the resume test's cut search runs), run once for both tests."""
    from jobs import sweep as sweep_job

    storage = tmp_path_factory.mktemp("boundary")
    assert sweep_job.main(["--max-concurrent", "1", *_search_args(storage, "whole")]) == 0
    return f"{storage}/whole"


@pytest.mark.slow
def test_a_real_boundary_search_fills_the_collapse_map_within_tolerance(whole_search):
    from vae.tables.results import Results

    res = Results(whole_search)
    table = res.read("collapse_map")
    lower, upper = table.critical_beta_lower.iloc[0], table.critical_beta_upper.iloc[0]
    assert upper / lower <= 1.3 and table.monotone.all()
    assert 0.5 < lower < upper < 3.0  # around the analytic 1.5 of this model (eigenvalue 1.5, variance 1)
    trials = res.read("trials")
    assert len(trials) == len(table) and set(trials.status) == {"finished"}
    assert len(trials) < 2 + math.ceil(math.log2(math.log(100) / math.log(1.3))) + 2
    assert len(res.read("epochs")) == len(trials) * 7


@pytest.mark.slow
def test_resume_mid_search_gives_the_same_brackets(whole_search, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT, watch_torch
    from vae.tables.results import Results

    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "jobs.sweep", "--max-concurrent", "1"]
    driver = subprocess.Popen(cmd + _search_args(tmp_path, "cut"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    res = Results(f"{tmp_path}/cut")
    deadline = time.time() + 300
    while time.time() < deadline and (res.read("trials").status == "finished").sum() < 3:
        time.sleep(0.5)
    third = time.time()
    # the event, not a delay: Tune has saved its experiment state (the searcher's brackets in it) since then
    while time.time() < deadline and not any(os.path.getmtime(p) > third for p in
                                             glob.glob(f"{tmp_path}/cut/experiment_state-*.json")):
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done = res.read("trials")
    n_whole = len(Results(whole_search).read("trials"))
    assert 3 <= (done.status == "finished").sum() < n_whole  # it died before the search ended
    finished = done[done.status == "finished"].trial_id
    before = {p: os.path.getmtime(p) for t in finished for p in glob.glob(f"{tmp_path}/cut/epochs/{t}.e*.parquet")}
    imported_torch = watch_torch(env, tmp_path / "watch")
    resumed = subprocess.run(cmd + _search_args(tmp_path, "cut", ["--resume"]), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert not imported_torch.exists()  # the driver, searcher and Tune's restore included, never needed torch
    assert {p: os.path.getmtime(p) for p in before} == before  # finished trials were not trained again
    a = Results(whole_search).read("collapse_map")
    b = Results(f"{tmp_path}/cut").read("collapse_map")
    assert sorted(a.beta.round(9)) == sorted(b.beta.round(9))  # the same betas tried, none twice
    assert (a.critical_beta_lower.iloc[0], a.critical_beta_upper.iloc[0]) == \
        (b.critical_beta_lower.iloc[0], b.critical_beta_upper.iloc[0])
    assert not res.read("epochs").duplicated(["trial_id", "epoch"]).any()


def test_packed_rounds_train_a_cells_points_together_and_read_each_members_outcome():
    threshold = 1.5
    s = BoundarySearcher([(4, 1e-3), (4, 1e-2)], (LO, HI), TOL, max_concurrent=8, pack=4)

    def packed(c):  # a pack's report: each member's outcome under its trial id
        return {"members": {trial_key(m): fake_result(1.0 if m["beta"] < threshold else 0.0) for m in c["members"]}}

    proposed = drive(s, packed)
    assert all(1 <= len(c["members"]) <= 4 for c in proposed)
    assert all(len({(m["latent_dim"], m["lr"]) for m in c["members"]}) == 1 for c in proposed)  # one cell a pack
    assert max(len(c["members"]) for c in proposed) == 4
    for cell in (0, 1):
        lower, upper = final_bracket(s, cell)[0][0]
        assert lower <= threshold < upper and upper / lower <= TOL
    state = json.loads(json.dumps(s.get_state()))
    again = BoundarySearcher([(4, 1e-3)], (LO, HI), TOL)
    again.set_state(state)
    assert again.pack == 4


def test_the_searcher_reads_members_from_results_as_tune_hands_them_flattened():
    """Tune gives searchers `flatten_dict(result)` ('members/<tid>/units_in_use'): the outcome must still count."""
    from ray.tune.utils import flatten_dict

    s = BoundarySearcher([(4, 1e-3)], (LO, HI), TOL, max_concurrent=1)
    flat = drive(s, lambda c: fake_result(1.0 if c["beta"] < 1.0 else 0.0), stop_after=2)
    assert len(flat) == 2
    cfg = s.suggest("flat")
    (member,) = cfg["members"]
    s.on_trial_complete("flat", flatten_dict({"members": {trial_key(member): fake_result(0.0)}}))
    outcomes = [f for c in s.cells for fs in c["outcomes"].values() for f in fs]
    assert len(outcomes) == 3 and not any(math.isnan(f) for f in outcomes)
