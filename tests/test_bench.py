"""The benchmark runs end to end (one repetition, no Ray part) and writes the table it prints."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from bench import bench, pages


def test_matmul_limits_are_rates():
    for onednn in (False, True):
        rates = bench.matmul_limit(reps=2, steps=5, onednn=onednn)
        assert len(rates) == 2 and all(r > 0 and math.isfinite(r) for r in rates)


def test_bench_writes_its_table_and_its_page_from_it(data_dir, tmp_path, capsys):
    out, page = tmp_path / "bench.parquet", tmp_path / "performance.md"
    argv = ["--data-dir", data_dir, "--reps", "1", "--quality-epochs", "0", "--skip-ray", "--subset", "6400",
            "--out", str(out), "--page", str(page)]
    assert bench.main(argv) == 0
    table = pd.read_parquet(out).set_index("measure")
    assert list(table.columns) == ["median", "spread", "unit", "n", "note", "cpu"]
    assert table.cpu.iloc[0] == bench.cpu_model() != ""
    m = table["median"]
    for name in ("baseline: seed loop, samples/s", "ours in process: train_loop, samples/s",
                 "matrix products alone (torch.matmul), samples/s",
                 "matrix products alone (oneDNN), samples/s", "peak RSS, one MNIST worker (in process)"):
        assert m[name] > 0, name
    # one repetition: each ratio is the ratio of the two figures printed above it
    assert math.isclose(m["ours / baseline"], m["ours in process: train_loop, samples/s"]
                        / m["baseline: seed loop, samples/s"], rel_tol=1e-9)
    assert math.isclose(m["ours / matrix-product limit"], 100 * m["ours in process: train_loop, samples/s"]
                        / m["matrix products alone (torch.matmul), samples/s"], rel_tol=1e-9)
    assert m["ours in process: wall per epoch (with eval, tables, checkpoint)"] > 0
    assert not any(name.startswith("Ray Train") for name in table.index)  # --skip-ray
    printed = capsys.readouterr().out
    assert "bench: wrote" in printed
    # the page: the command that wrote it, and every measure of the table with its median as the table has it
    text = page.read_text()
    assert f"Written by `python -m bench.bench {' '.join(argv[:-4])}`" in text  # where it wrote: left out
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r[0][2:] for r in rows] == list(table.index)
    for r, (name, median) in zip(rows, m.items()):
        assert r[1] == pages.number(median), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machines without CUDA")
def test_gpu_benches_refuse_in_one_line_without_cuda(tmp_path, capsys):
    from bench import pack

    for main, prog in ((bench.main, "bench.bench"), (pack.main, "bench.pack")):
        assert main(["--gpu", "--out", str(tmp_path / "gpu.parquet")]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"{prog}: --gpu: no CUDA device here (torch.cuda.is_available() is False)\n"
    assert not (tmp_path / "gpu.parquet").exists()


def test_the_eval_subset_section_of_bench_maps_is_refused_beside_others_before_any_run(tmp_path, capsys):
    """It writes a page of its own (docs/eval-subset.md): mixed with the maps page's sections, it would leave
    one of the two pages holding the other's sections."""
    from bench import maps

    page = tmp_path / "page.md"
    for only, needle in (("eval-subset,toy-grid", "a page of its own"), ("nope", "unknown section")):
        with pytest.raises(SystemExit) as stop:
            maps.main(["--only", only, "--page", str(page)])
        assert stop.value.code == 2 and needle in capsys.readouterr().err
    assert not page.exists()


def test_refill_verdicts_are_the_same_moved_within_their_undecided_units_or_disagree():
    from bench.refill import compare_verdicts

    cols = ["units_in_use", "settled", "units_undecided"]
    a = pd.DataFrame([[2, True, 0], [3, False, 2], [5, True, 0]], index=["x", "y", "z"], columns=cols)
    b = pd.DataFrame([[2, True, 0], [4, False, 1], [4, True, 0]], index=["x", "y", "z"], columns=cols)
    text = compare_verdicts(a, b)
    assert text.startswith("**1 of 3** the same")
    assert "1 moved within their undecided units" in text and "y: 3 unsettled against 4 unsettled, 2 undecided" in text
    assert text.endswith("**1** disagree beyond that (z)")  # both settled: a difference is a disagreement


def test_refill_reads_how_long_the_trials_ran_from_tunes_own_result_files(tmp_path):
    import json

    from bench.refill import trial_seconds

    for trial, totals in (("trial_0", [1.0, 2.5]), ("trial_1", [4.0]), ("trial_2", [])):
        (tmp_path / trial).mkdir()
        (tmp_path / trial / "result.json").write_text("".join(json.dumps({"time_total_s": t}) + "\n" for t in totals))
    assert trial_seconds(str(tmp_path)) == 6.5  # each trial's last time_total_s; one that reported nothing: 0
