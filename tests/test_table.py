"""gist_exp.table on synthetic results.json files: numbers, marks, files, notes and exit codes."""

from __future__ import annotations

import csv
import io
import math

import pytest

from gist_exp.data.tasks import GROUPS, TASKS
from gist_exp.io import atomic_write_json
from gist_exp.table import MD, build_table, format_mean, main, render_csv, render_latex, render_markdown
from gist_exp.results import find_results

GROUP_TASKS = {g: [t.name for t in TASKS.values() if t.group == g] for g in GROUPS}


def record(task="dtd", peft="adapter", gist=False, seed=0, acc=50.0, status="completed", protocol="final",
           params=1000, finished_at="2026-01-01T00:00:00+00:00", **extra) -> dict:
    if status == "failed":  # what a run that failed in training leaves: few fields
        return {"status": "failed", "error": "boom\ntraceback", "task": task, "peft": peft, "gist": gist,
                "seed": seed, "protocol": protocol, "finished_at": finished_at, **extra}
    metrics = {"test_acc": acc} if protocol == "final" else {"val_acc": acc}
    return {"status": "completed", "error": None, "task": task, "group": TASKS[task].group, "peft": peft,
            "gist": gist, "seed": seed, "protocol": protocol, "metrics": metrics,
            "params": {"trainable_excl_head": params, "trainable_total": params + 100},
            "config": {"peft": {"name": peft}}, "backbone": {"name": "vit_tiny"}, "epochs": 2,
            "finished_at": finished_at, **extra}


def write(root, rec: dict, tag: str = "run"):
    """Lay the record out like a sweep job: <root>/<peft>-gist_<on|off>/<task>/seed=<seed>/<tag>/results.json."""
    gist = "on" if rec.get("gist") else "off"
    path = root / f"{rec.get('peft')}-gist_{gist}" / str(rec.get("task")) / f"seed={rec.get('seed')}" / tag
    atomic_write_json(path / "results.json", {**rec, "output_dir": str(path)})
    return path


def table_of(root):
    return build_table(find_results([root]))


def row(table, name: str, kind: str = "method"):
    matches = [r for r in table.rows if r.kind == kind and (r.name == name if kind == "method" else r.peft == name)]
    assert len(matches) == 1, [r.name for r in table.rows]
    return matches[0]


def test_three_seed_cell_is_mean_and_sample_std(tmp_path):
    for seed, acc in enumerate([70.0, 71.0, 73.0]):
        write(tmp_path, record(seed=seed, acc=acc))
    cell = row(table_of(tmp_path), "adapter").cells["dtd"]
    # by hand: mean 214/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9, over n-1 = 2 -> 7/3
    assert cell.mean == pytest.approx(214 / 3)
    assert cell.std == pytest.approx(math.sqrt(7 / 3))
    assert cell.n == 3
    assert "71.33±1.53 (3)" in render_markdown(table_of(tmp_path))


def test_one_seed_has_no_std(tmp_path):
    write(tmp_path, record(acc=71.234))
    text = render_markdown(table_of(tmp_path))
    assert "71.23 (1)" in text and "±" not in text.split("\n")[2]


def test_delta_row_is_gist_minus_baseline(tmp_path):
    write(tmp_path, record(acc=60.0, params=1000))
    write(tmp_path, record(acc=61.2, params=1768, gist=True))
    write(tmp_path, record(task="eurosat", acc=90.0, params=1000))  # baseline only: no Δ for eurosat
    table = table_of(tmp_path)
    delta = row(table, "adapter", "delta")
    assert delta.cells["dtd"].mean == pytest.approx(1.2)
    assert delta.cells["eurosat"].mean is None
    assert delta.params == 768
    names = [r.name for r in table.rows]
    assert names == ["adapter", "adapter+GIST", "Δ GIST"]
    delta_line = render_markdown(table).splitlines()[4]
    assert delta_line.startswith("| Δ GIST") and "+1.20" in delta_line and "+768" in delta_line
    assert "+1.20* (1/7)" in delta_line  # Natural Δ covers one task


def test_mean_of_groups_and_mean_of_tasks_differ_and_are_both_right(tmp_path):
    values = {"Natural": 80.0, "Specialized": 90.0, "Structured": 50.0}
    for group, acc in values.items():
        for task in GROUP_TASKS[group]:
            write(tmp_path, record(task=task, acc=acc))
    r = row(table_of(tmp_path), "adapter")
    assert r.mean_groups.value == pytest.approx((80 + 90 + 50) / 3)  # 73.33
    assert r.mean_tasks.value == pytest.approx((7 * 80 + 4 * 90 + 8 * 50) / 19)  # 69.47
    assert format_mean(r.mean_groups, "method", MD) == "73.33"  # complete: no mark
    assert format_mean(r.mean_tasks, "method", MD) == "69.47"
    assert [format_mean(r.groups[g], "method", MD) for g in GROUPS] == ["80.00", "90.00", "50.00"]


def test_missing_task_marks_the_mean_and_is_not_averaged_as_zero(tmp_path):
    for task in GROUP_TASKS["Natural"][:-1]:  # 6 of 7 Natural tasks
        write(tmp_path, record(task=task, acc=80.0))
    table = table_of(tmp_path)
    r = row(table, "adapter")
    assert r.groups["Natural"].value == pytest.approx(80.0)  # not 6 * 80 / 7
    assert format_mean(r.groups["Natural"], "method", MD) == "80.00* (6/7)"
    assert format_mean(r.mean_tasks, "method", MD) == "80.00* (6/19)"
    assert r.cells[GROUP_TASKS["Natural"][-1]].mean is None
    text = render_markdown(table)
    assert "| — " in text and "`*` (k/n)" in text  # the footnote explains the mark


def test_failed_only_cell_shows_failed(tmp_path):
    write(tmp_path, record(task="dtd", status="failed"))
    write(tmp_path, record(task="eurosat", acc=90.0))
    no_task = tmp_path / "broken"
    atomic_write_json(no_task / "results.json", {"status": "failed", "error": "config did not resolve"})
    table = table_of(tmp_path)
    r = row(table, "adapter")
    assert r.cells["dtd"].mean is None and r.cells["dtd"].failed == 1
    line = render_markdown(table).splitlines()[2]
    assert "| failed " in line and "90.00 (1)" in line
    assert format_mean(r.groups["Natural"], "method", MD) == "—"  # no Natural value at all
    assert r.mean_tasks.k == 1
    notes = "\n".join(table.notes)
    assert "3 results.json: 1 completed, 2 failed" in notes
    assert "1 record(s) without task or peft skipped" in notes
    assert "failed: adapter dtd seed=0: boom" in notes


def test_rows_are_ordered_by_peft_then_gist(tmp_path):
    for peft in ("vpt", "bitfit", "lora", "adapter", "full", "linear", "a_custom"):
        for gist in (True, False):
            write(tmp_path, record(peft=peft, gist=gist))
    names = [r.name for r in table_of(tmp_path).rows if r.kind == "method"]
    assert names == [f"{p}{s}" for p in ("linear", "full", "adapter", "lora", "vpt", "a_custom", "bitfit")
                     for s in ("", "+GIST")]


def test_main_writes_all_files_and_csv_parses_back(tmp_path, capsys):
    for seed, acc in enumerate([70.0, 71.0, 73.0]):
        write(tmp_path, record(seed=seed, acc=acc, params=1000))
        write(tmp_path, record(seed=seed, acc=acc + 2, gist=True, params=1768))
    write(tmp_path, record(peft="my_peft", acc=10.0))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| Method") and "adapter+GIST" in out  # md on stdout by default
    for name in ("table.md", "table.csv", "table.tex"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "gist_gains.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "table.md").read_text() == out

    rows = {r["method"]: r for r in csv.DictReader(io.StringIO((tmp_path / "table.csv").read_text()))}
    base = rows["adapter"]
    assert float(base["dtd_mean"]) == pytest.approx(214 / 3)
    assert float(base["dtd_std"]) == pytest.approx(math.sqrt(7 / 3))
    assert int(base["dtd_n"]) == 3 and int(base["dtd_failed"]) == 0
    assert base["eurosat_mean"] == "" and base["eurosat_n"] == "0"  # missing: empty, not 0
    assert float(base["Natural"]) == pytest.approx(214 / 3) and base["Natural_tasks"] == "1"
    assert base["Specialized"] == "" and float(base["params_excl_head"]) == 1000
    delta = rows["adapter+GIST - adapter"]
    assert delta["row"] == "delta" and float(delta["dtd_mean"]) == pytest.approx(2.0)
    assert float(delta["params_excl_head"]) == 768

    tex = (tmp_path / "table.tex").read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"71.33$\pm$1.53 (3)" in tex and r"my\_peft" in tex and "my_peft" not in tex
    assert r"\quad $\Delta$ GIST & " in tex


def test_format_chooses_stdout_and_out_dir(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write(sweep, record(acc=70.0))
    out = tmp_path / "tables"
    assert main([str(sweep), "--format", "csv", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == (out / "table.csv").read_text() and printed.startswith("row,method,peft,gist,cifar_mean")
    assert main([str(sweep), "--format", "latex", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(r"\begin{tabular}")
    assert not (sweep / "table.md").exists()


def test_no_pair_skips_the_figure_and_says_so(tmp_path, capsys):
    write(tmp_path, record(acc=70.0))
    assert main([str(tmp_path)]) == 0
    assert not (tmp_path / "gist_gains.png").exists()
    assert "no gist_gains.png" in capsys.readouterr().err


def test_results_file_path_writes_next_to_it(tmp_path, capsys):
    path = write(tmp_path, record(acc=70.0))
    assert main([str(path / "results.json")]) == 0
    assert (path / "table.md").exists()


def test_tune_records_are_ignored_with_a_note(tmp_path):
    write(tmp_path, record(acc=70.0))
    write(tmp_path, record(acc=99.0, seed=1, protocol="tune", metrics={"val_acc": 99.0, "test_acc": 99.0}))
    table = table_of(tmp_path)
    cell = row(table, "adapter").cells["dtd"]
    assert cell.n == 1 and cell.mean == 70.0
    assert any("protocol='tune' ignored" in n for n in table.notes)


def test_only_tune_records_exit_2(tmp_path, capsys):
    write(tmp_path, record(protocol="tune"))
    assert main([str(tmp_path)]) == 2
    assert "no table" in capsys.readouterr().err


def test_empty_dir_exits_2_with_a_clear_message(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main([str(tmp_path), str(missing)]) == 2
    err = capsys.readouterr().err
    assert "no results.json found" in err and str(tmp_path) in err and f"{missing} (does not exist)" in err
    assert "outputs/<sweep_name>/" in err
    assert not (tmp_path / "table.md").exists()


@pytest.mark.parametrize("newest_first", [True, False])
def test_duplicates_keep_the_newest(tmp_path, newest_first):
    new = record(acc=20.0, finished_at="2026-03-02T10:00:00+00:00")
    old = record(acc=10.0, finished_at="2026-03-01T10:00:00+00:00")
    a, b = tmp_path / "sweep_a", tmp_path / "sweep_b"
    write(a, new if newest_first else old)
    write(b, old if newest_first else new)
    table = build_table(find_results([a, b]))
    cell = row(table, "adapter").cells["dtd"]
    assert cell.n == 1 and cell.mean == 20.0
    notes = [n for n in table.notes if n.startswith("duplicate adapter dtd seed=0")]
    assert len(notes) == 1 and "2026-03-02" in notes[0].split("dropped")[0]


def test_mixed_settings_are_noted(tmp_path):
    write(tmp_path, record(seed=0, epochs=2))
    write(tmp_path, record(seed=1, epochs=100))
    assert any("adapter mixes runs of different epochs: 100, 2" in n for n in table_of(tmp_path).notes)


def test_render_functions_agree_on_rows(tmp_path):
    write(tmp_path, record(acc=70.0))
    write(tmp_path, record(acc=72.0, gist=True))
    table = table_of(tmp_path)
    assert len(render_csv(table).splitlines()) == 1 + 3
    assert render_latex(table).count(r" \\") == 2 + 3 + 1  # group and task header lines, 3 rows, footnote
