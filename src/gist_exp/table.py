"""The VTAB-1K paper table of a sweep, from its results.json files only.

    python -m gist_exp.table PATHS... [--format md|csv|latex] [--out DIR]

One row per method (peft, with and without GIST), one column per task in SPEC order, then the group
means, both overall-mean conventions and the trainable parameters excluding the head. Under each
+GIST row whose baseline exists, a Δ GIST row. Writes table.md, table.csv, table.tex and
gist_gains.png into --out and prints the table (in --format) on stdout, notes on stderr.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .data.tasks import GROUPS, TASKS, UnknownTaskError, canonical_task_name
from .io import atomic_write_bytes
from .results import RESULTS_FILE, find_results

PEFT_ORDER = ("linear", "full", "adapter", "lora", "vpt")  # then any other peft, alphabetically
MEAN_GROUPS = "Mean (3 groups)"
MEAN_TASKS = "Mean (19 tasks)"
PARAMS = "Params (excl. head)"
DELTA = "Δ GIST"
FIGURE_FILE = "gist_gains.png"
FORMATS = ("md", "csv", "latex")

# Display headers; CSV keeps the canonical task names.
SHORT = {
    "cifar": "CIFAR-100", "caltech101": "Caltech101", "dtd": "DTD", "oxford_flowers102": "Flowers102",
    "oxford_iiit_pet": "Pets", "svhn": "SVHN", "sun397": "Sun397", "patch_camelyon": "Camelyon",
    "eurosat": "EuroSAT", "resisc45": "Resisc45", "diabetic_retinopathy": "Retinopathy",
    "clevr_count": "Clevr-Count", "clevr_dist": "Clevr-Dist", "dmlab": "DMLab", "kitti": "KITTI-Dist",
    "dsprites_loc": "dSpr-Loc", "dsprites_ori": "dSpr-Ori", "smallnorb_azi": "sNORB-Azim",
    "smallnorb_ele": "sNORB-Elev",
}
GROUP_TASKS = {g: [t.name for t in TASKS.values() if t.group == g] for g in GROUPS}


# ---- the table -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One (method, task): seeds of the last-epoch test accuracy. For a Δ row, mean is the difference."""
    mean: float | None = None  # None: no completed run
    std: float | None = None  # sample std (ddof=1); None when n < 2
    n: int = 0  # completed seeds
    failed: int = 0  # failed seeds


@dataclass(frozen=True)
class Mean:
    """A mean over the tasks that have a value: k of total. Incomplete means are marked, never hidden."""
    value: float | None
    k: int
    total: int

    @property
    def complete(self) -> bool:
        return self.k == self.total


@dataclass(frozen=True)
class Row:
    name: str  # "adapter+GIST", or DELTA for a Δ row
    kind: str  # "method" | "delta"
    peft: str
    gist: bool
    cells: dict[str, Cell]  # canonical task name -> cell, every task of TASKS
    groups: dict[str, Mean]
    mean_groups: Mean  # mean of the three group means (VPT / adapter_plus convention)
    mean_tasks: Mean  # mean over the tasks (VTAB / NOAH convention)
    params: float | None  # trainable parameters excluding the head, mean over completed tasks


@dataclass(frozen=True)
class Table:
    rows: list[Row]
    notes: list[str]


def method_name(peft: str, gist: bool) -> str:
    return f"{peft}+GIST" if gist else peft


def method_order(method: tuple[str, bool]) -> tuple:
    peft, gist = method
    rank = PEFT_ORDER.index(peft) if peft in PEFT_ORDER else len(PEFT_ORDER)
    return rank, peft, gist


def mean_of(values: list[float | None]) -> Mean:
    present = [v for v in values if v is not None]
    return Mean(statistics.fmean(present) if present else None, len(present), len(values))


def group_means(cells: dict[str, Cell]) -> tuple[dict[str, Mean], Mean, Mean]:
    """Group means of task means, the mean of the group means and the mean over all tasks."""
    groups = {g: mean_of([cells[t].mean for t in GROUP_TASKS[g]]) for g in GROUPS}
    of_groups = mean_of([m.value for m in groups.values()])
    # k counts tasks, not groups: the mark says how many of the 19 tasks are behind the number.
    mean_groups = Mean(of_groups.value, sum(m.k for m in groups.values()), len(TASKS))
    return groups, mean_groups, mean_of([cells[t].mean for t in TASKS])


def seed_cell(records: list[dict]) -> Cell:
    accs = [r["metrics"]["test_acc"] for r in records if r["status"] == "completed"]
    failed = sum(r["status"] != "completed" for r in records)
    if not accs:
        return Cell(failed=failed)
    std = statistics.stdev(accs) if len(accs) >= 2 else None
    return Cell(statistics.fmean(accs), std, len(accs), failed)


def method_row(peft: str, gist: bool, records: list[dict]) -> Row:
    by_task = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    cells = {t: seed_cell(by_task[t]) for t in TASKS}
    groups, mean_groups, mean_tasks = group_means(cells)
    return Row(method_name(peft, gist), "method", peft, gist, cells, groups, mean_groups, mean_tasks,
               mean_params(by_task))


def mean_params(by_task: dict[str, list[dict]]) -> float | None:
    """trainable_excl_head: per-task mean first, so a task with more seeds does not weigh more."""
    per_task = []
    for records in by_task.values():
        counts = [(r.get("params") or {}).get("trainable_excl_head") for r in records if r["status"] == "completed"]
        counts = [c for c in counts if isinstance(c, (int, float))]
        if counts:
            per_task.append(statistics.fmean(counts))
    return statistics.fmean(per_task) if per_task else None


def delta_row(base: Row, gist: Row) -> Row:
    """+GIST minus baseline per task; the group and overall Δ are means of the per-task Δ over tasks with both."""
    cells = {t: Cell(gist.cells[t].mean - base.cells[t].mean)
             if gist.cells[t].mean is not None and base.cells[t].mean is not None else Cell()
             for t in TASKS}
    groups, mean_groups, mean_tasks = group_means(cells)
    params = gist.params - base.params if gist.params is not None and base.params is not None else None
    return Row(DELTA, "delta", gist.peft, True, cells, groups, mean_groups, mean_tasks, params)


def build_table(records: list[dict]) -> Table:
    used, notes = select_records(records)
    by_method = defaultdict(list)
    for r in used:
        by_method[(r["peft"], r["gist"])].append(r)
    rows, baselines = [], {}
    for peft, gist in sorted(by_method, key=method_order):
        row = method_row(peft, gist, by_method[(peft, gist)])
        rows.append(row)
        if not gist:
            baselines[peft] = row
        elif peft in baselines:
            rows.append(delta_row(baselines[peft], row))
    notes += mixed_settings_notes(by_method)
    return Table(rows, notes)


# ---- which records the table uses -----------------------------------------------------------------
def finished_at(record: dict) -> datetime:
    try:
        stamp = datetime.fromisoformat(str(record.get("finished_at")))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)  # unknown: older than any dated record
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def select_records(records: list[dict]) -> tuple[list[dict], list[str]]:
    """The final-protocol records, one per (peft, gist, task, seed), and notes on everything left out."""
    failed = sum(r.get("status") != "completed" for r in records)
    notes = [f"read {len(records)} results.json: {len(records) - failed} completed, {failed} failed"]
    no_task, unknown, tune, no_acc, kept = [], [], [], [], {}
    duplicates = []
    for r in records:
        if not r.get("task") or not r.get("peft"):
            no_task.append(r)
            continue
        try:
            r = {**r, "task": canonical_task_name(str(r["task"])), "gist": bool(r.get("gist"))}
        except UnknownTaskError:
            unknown.append(r)
            continue
        if r.get("protocol", "final") != "final":
            tune.append(r)
            continue
        if r["status"] == "completed" and not isinstance((r.get("metrics") or {}).get("test_acc"), (int, float)):
            no_acc.append(r)
            continue
        key = (r["peft"], r["gist"], r["task"], r.get("seed"))
        if key in kept:
            newer, older = sorted((kept[key], r), key=lambda x: (finished_at(x), str(x.get("output_dir"))))[::-1]
            duplicates.append((key, newer, older))
            r = newer
        kept[key] = r
    if no_task:
        notes.append(f"{len(no_task)} record(s) without task or peft skipped (a run that failed before its "
                     f"config resolved): " + ", ".join(str(r.get("output_dir")) for r in no_task))
    if unknown:
        notes.append(f"{len(unknown)} record(s) of unknown tasks skipped: "
                     + ", ".join(sorted({str(r["task"]) for r in unknown})))
    if tune:
        notes.append(f"{len(tune)} record(s) of protocol={tune[0].get('protocol')!r} ignored: the table uses "
                     f"protocol=final (train800val200 -> test) only")
    if no_acc:
        notes.append(f"{len(no_acc)} completed record(s) without metrics.test_acc skipped: "
                     + ", ".join(str(r.get("output_dir")) for r in no_acc))
    for (peft, gist, task, seed), newer, older in duplicates:
        same = newer.get("config_hash") == older.get("config_hash")
        notes.append(f"duplicate {method_name(peft, gist)} {task} seed={seed}: kept the newest "
                     f"{newer.get('output_dir')} ({newer.get('finished_at')}), dropped {older.get('output_dir')} "
                     f"({older.get('finished_at')})"
                     + ("" if same else "; their config_hash differs: compare the config of both"))
    used = list(kept.values())
    for r in used:
        if r["status"] != "completed":
            error = (r.get("error") or "").strip().splitlines()
            notes.append(f"failed: {method_name(r['peft'], r['gist'])} {r['task']} seed={r.get('seed')}: "
                         f"{error[0][:200] if error else 'no error message'} ({r.get('output_dir')})")
    return used, notes


PER_TASK_PEFT_KEYS = ("num_prompts", "per_task")  # differ between tasks by design (VPT's prompt lengths)


def mixed_settings_notes(by_method: dict[tuple[str, bool], list[dict]]) -> list[str]:
    """A row averages whatever it is given: say so when its runs differ in what they compute."""
    notes = []
    settings = {
        "backbone": lambda r: (r.get("backbone") or {}).get("name"),
        "epochs": lambda r: r.get("epochs"),
        "config.peft": lambda r: json.dumps({k: v for k, v in ((r.get("config") or {}).get("peft") or {}).items()
                                             if k not in PER_TASK_PEFT_KEYS}, sort_keys=True),
    }
    for method, records in sorted(by_method.items(), key=lambda item: method_order(item[0])):
        done = [r for r in records if r["status"] == "completed"]
        for name, get in settings.items():
            values = sorted({str(get(r)) for r in done})
            if len(values) > 1:
                notes.append(f"{method_name(*method)} mixes runs of different {name}: {', '.join(values)}")
    return notes


# ---- formatting ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Style:
    pm: str
    star: str
    missing: str


MD = Style(pm="±", star="*", missing="—")
LATEX = Style(pm=r"$\pm$", star=r"$^*$", missing="--")


def format_cell(cell: Cell, kind: str, style: Style) -> str:
    if kind == "delta":
        return style.missing if cell.mean is None else f"{cell.mean:+.2f}"
    if cell.mean is None:
        return "failed" if cell.failed else style.missing
    spread = f"{style.pm}{cell.std:.2f}" if cell.std is not None else ""
    return f"{cell.mean:.2f}{spread} ({cell.n})"


def format_mean(mean: Mean, kind: str, style: Style) -> str:
    if mean.value is None:
        return style.missing
    number = f"{mean.value:+.2f}" if kind == "delta" else f"{mean.value:.2f}"
    return number if mean.complete else f"{number}{style.star} ({mean.k}/{mean.total})"


def format_params(params: float | None, kind: str, style: Style) -> str:
    if params is None:
        return style.missing
    return f"{params:+.0f}" if kind == "delta" else f"{params / 1e6:.3f}M"


def headers() -> list[str]:
    return ["Method", *(SHORT.get(t, t) for t in TASKS), *GROUPS, MEAN_GROUPS, MEAN_TASKS, PARAMS]


def row_texts(row: Row, style: Style) -> list[str]:
    return [row.name,
            *(format_cell(row.cells[t], row.kind, style) for t in TASKS),
            *(format_mean(row.groups[g], row.kind, style) for g in GROUPS),
            format_mean(row.mean_groups, row.kind, style), format_mean(row.mean_tasks, row.kind, style),
            format_params(row.params, row.kind, style)]


FOOTNOTES = [
    "Cells: mean±std over seeds of the last-epoch test accuracy (%), seed count in brackets; std is the "
    "sample std (n-1), left out for one seed. `—`: no run; `failed`: only failed runs.",
    "`*` (k/n): the mean covers only the k of n tasks that have a value (the others are missing or failed); "
    "it is not comparable with a complete mean.",
    f"{MEAN_GROUPS}: mean of the Natural, Specialized and Structured means (VPT, adapter_plus convention). "
    f"{MEAN_TASKS}: mean over the tasks (VTAB, NOAH convention). Group means are means of per-task seed means.",
    f"{DELTA}: +GIST minus the baseline above it, in percentage points; group and overall Δ are means of "
    "the per-task Δ over the tasks both rows have; parameters as a count.",
    f"{PARAMS}: trainable parameters excluding the classification head, mean over the method's completed "
    "tasks, in millions.",
    "Groups: " + "; ".join(f"{g}: {', '.join(SHORT[t] for t in GROUP_TASKS[g])}" for g in GROUPS) + ".",
]


def render_markdown(table: Table) -> str:
    lines = [headers(), *(row_texts(r, MD) for r in table.rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]

    def md_line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [md_line(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(md_line, lines[1:])]
    return "\n".join(out + [""] + [f"- {note}" for note in FOOTNOTES]) + "\n"


def csv_header() -> list[str]:
    per_task = [f"{t}_{part}" for t in TASKS for part in ("mean", "std", "n", "failed")]
    per_group = [f"{g}{part}" for g in GROUPS for part in ("", "_tasks")]
    return ["row", "method", "peft", "gist", *per_task, *per_group,
            "mean_3_groups", "mean_19_tasks", "tasks_with_value", "params_excl_head"]


def csv_values(row: Row) -> list:
    def blank(value):
        return "" if value is None else value

    method = f"{row.peft}+GIST - {row.peft}" if row.kind == "delta" else row.name
    values = ["delta" if row.kind == "delta" else "method", method, row.peft,
              "" if row.kind == "delta" else str(row.gist).lower()]
    for t in TASKS:
        cell = row.cells[t]
        counts = ("", "") if row.kind == "delta" else (cell.n, cell.failed)
        values += [blank(cell.mean), blank(cell.std), *counts]
    for g in GROUPS:
        values += [blank(row.groups[g].value), row.groups[g].k]
    return values + [blank(row.mean_groups.value), blank(row.mean_tasks.value), row.mean_tasks.k,
                     blank(row.params)]


def render_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_header())
    writer.writerows(csv_values(r) for r in table.rows)
    return buffer.getvalue()


def latex_escape(text: str) -> str:
    specials = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(specials.get(c, c) for c in text)


def render_latex(table: Table) -> str:
    heads = [latex_escape(h) for h in headers()]
    ncols = len(heads)
    spans, start = [], 2
    for g in GROUPS:
        spans.append((g, start, start + len(GROUP_TASKS[g]) - 1))
        start += len(GROUP_TASKS[g])
    lines = [
        r"\begin{tabular}{l" + "c" * (ncols - 1) + "}",
        r"\toprule",
        " & " + " & ".join(rf"\multicolumn{{{b - a + 1}}}{{c}}{{{g}}}" for g, a, b in spans)
        + " & " * (ncols - start + 1) + r" \\",
        "".join(rf"\cmidrule(lr){{{a}-{b}}}" for _, a, b in spans),
        " & ".join(heads) + r" \\",
        r"\midrule",
    ]
    for row in table.rows:
        texts = row_texts(row, LATEX)
        texts[0] = r"\quad $\Delta$ GIST" if row.kind == "delta" else latex_escape(texts[0])
        lines.append(" & ".join(texts) + r" \\")
    footnote = (r"$^*$ (k/n): mean over the k of n tasks that have a value. "
                rf"{latex_escape(MEAN_GROUPS)}: mean of the group means; {latex_escape(MEAN_TASKS)}: mean over tasks. "
                r"Cells: mean$\pm$std over seeds (count). $\Delta$ GIST: +GIST minus baseline.")
    lines += [r"\bottomrule", rf"\multicolumn{{{ncols}}}{{l}}{{\footnotesize {footnote}}} \\", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def render_figure(table: Table) -> bytes | None:
    """PNG bar chart of the per-task GIST gain for each peft with both rows; None when there is no pair."""
    deltas = [r for r in table.rows if r.kind == "delta" and any(c.mean is not None for c in r.cells.values())]
    if not deltas:
        return None
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    gap = 0.8  # extra space between task groups
    x = {}
    for gi, g in enumerate(GROUPS):
        for t in GROUP_TASKS[g]:
            x[t] = len(x) + gi * gap
    fig = Figure(figsize=(13, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(deltas)
    for i, row in enumerate(deltas):
        offset = (i - (len(deltas) - 1) / 2) * width
        heights = [row.cells[t].mean if row.cells[t].mean is not None else float("nan") for t in TASKS]
        ax.bar([x[t] + offset for t in TASKS], heights, width, label=row.peft)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlim(min(x.values()) - 0.6, max(x.values()) + 0.6)
    for gi, g in enumerate(GROUPS):
        first, last = x[GROUP_TASKS[g][0]], x[GROUP_TASKS[g][-1]]
        ax.text((first + last) / 2, 1.01, g, ha="center", va="bottom", transform=ax.get_xaxis_transform())
        if gi:
            ax.axvline(first - (1 + gap) / 2, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks([x[t] for t in TASKS], [SHORT.get(t, t) for t in TASKS], rotation=45, ha="right")
    ax.set_ylabel("GIST gain (percentage points)")
    ax.set_title("+GIST minus baseline, last-epoch test accuracy (mean over seeds)", pad=22)
    ax.legend(title="peft")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


# ---- command line --------------------------------------------------------------------------------
def no_results_message(paths: list[str]) -> str:
    searched = ", ".join(p if Path(p).exists() else f"{p} (does not exist)" for p in paths)
    return (f"error: no {RESULTS_FILE} found under {searched}. A sweep (python -m gist_exp.train -m ...) writes "
            f"one {RESULTS_FILE} per job under outputs/<sweep_name>/; pass that directory.")


def default_out(path: str) -> Path:
    path = Path(path)
    return path if path.is_dir() else path.parent


def write_outputs(table: Table, texts: dict[str, str], out: Path) -> list[str]:
    """Write the three tables and the figure; return what to tell the user."""
    written = []
    for name, fmt in (("table.md", "md"), ("table.csv", "csv"), ("table.tex", "latex")):
        atomic_write_bytes(out / name, texts[fmt].encode())
        written.append(str(out / name))
    try:
        figure = render_figure(table)
    except ImportError as e:  # matplotlib is a declared dependency, but the tables do not need it
        return [f"wrote {', '.join(written)}", f"no {FIGURE_FILE}: {e}; pip install -e . installs matplotlib"]
    if figure is None:
        (out / FIGURE_FILE).unlink(missing_ok=True)  # a stale figure would contradict the new table
        return [f"wrote {', '.join(written)}", f"no {FIGURE_FILE}: no +GIST row with a baseline to compare"]
    atomic_write_bytes(out / FIGURE_FILE, figure)
    return [f"wrote {', '.join(written + [str(out / FIGURE_FILE)])}"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gist_exp.table", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="sweep directories (e.g. outputs/<sweep_name>) or results.json files")
    parser.add_argument("--format", choices=FORMATS, default="md", help="what to print on stdout (default: md)")
    parser.add_argument("--out", type=Path, help="where to write the tables (default: the first PATH, or its parent)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    records = find_results(args.paths)
    if not records:
        print(no_results_message(args.paths), file=sys.stderr)
        return 2
    table = build_table(records)
    if not table.rows:
        print("\n".join(f"note: {n}" for n in table.notes), file=sys.stderr)
        print(f"error: none of the {len(records)} {RESULTS_FILE} under {', '.join(args.paths)} is a "
              f"protocol=final run with a task: no table", file=sys.stderr)
        return 2
    texts = {"md": render_markdown(table), "csv": render_csv(table), "latex": render_latex(table)}
    messages = write_outputs(table, texts, args.out or default_out(args.paths[0]))
    print(texts[args.format], end="")
    # Notes on stderr: stdout stays exactly the chosen format, safe to redirect.
    print("\n".join(f"note: {n}" for n in table.notes + messages), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
