"""Reading and validating a VTAB-1K tree in the NOAH layout.

    <root>/<task>/{train800,val200,train800val200,test}.txt
    <root>/<task>/images/<split>/000000.jpg ...

Each list line is `<path relative to <root>/<task>> <0-based label>`.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .tasks import EXPECTED_SPLIT_SIZES, Task

log = logging.getLogger(__name__)

# protocol -> (train split, evaluation split)
PROTOCOLS = {"final": ("train800val200", "test"), "tune": ("train800", "val200")}
MAX_LISTED = 10  # problems named in one error unless the user asks for all of them

HOW_TO_SUPPLY = (
    "VTAB-1K is expected in the NOAH layout: <root>/<task>/{train800,val200,train800val200,test}.txt and "
    "<root>/<task>/images/... (see data/README.md). Set data.root=/path/to/vtab-1k, or make a demo tree with "
    "`python -m gist_exp.data.fake --root DIR`."
)


@dataclass(frozen=True)
class SplitList:
    task: Task
    split: str
    list_file: Path
    paths: tuple[Path, ...]  # absolute image paths
    labels: tuple[int, ...]
    line_numbers: tuple[int, ...]  # where each entry is listed, for error messages

    def __len__(self) -> int:
        return len(self.paths)

    def where(self, index: int) -> str:
        return f"{self.list_file} line {self.line_numbers[index]}"


def format_problems(problems: list[str], list_all: bool) -> str:
    shown = problems if list_all else problems[:MAX_LISTED]
    text = "\n".join(f"  - {p}" for p in shown)
    if len(shown) < len(problems):
        text += f"\n  ... and {len(problems) - len(shown)} more (data.list_all_errors=true lists every one)"
    return text


def task_dir(root: Path, task: Task) -> Path:
    """The task's directory; a missing one is an error that suggests close names found under root."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root '{root}' is not a directory. {HOW_TO_SUPPLY}")
    directory = root / task.name
    if directory.is_dir():
        return directory
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    aliased = [name for name in present if name.lower() in task.aliases]
    close = difflib.get_close_matches(task.name, present, n=3, cutoff=0.6)
    hint = ""
    if aliased or close:
        found = aliased[0] if aliased else close[0]
        hint = (
            f" Found '{found}' instead; if it holds {task.name}, rename it "
            f"(mv '{root / found}' '{directory}') or link it (ln -s '{found}' '{directory}')."
        )
    aliases = f" (aliases: {', '.join(task.aliases)})" if task.aliases else ""
    raise DataError(
        f"task directory '{directory}' for task {task.name}{aliases} does not exist.{hint} "
        f"Directories under {root}: {', '.join(present) if present else 'none'}. {HOW_TO_SUPPLY}"
    )


def read_split_list(directory: Path, task: Task, split: str, list_all: bool = False) -> SplitList:
    """Parse `<split>.txt`; every malformed line, bad label or escaping path is named with its line number."""
    list_file = directory / f"{split}.txt"
    if not list_file.is_file():
        raise DataError(f"split list '{list_file}' is missing for task {task.name}. {HOW_TO_SUPPLY}")
    try:
        text = list_file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{list_file}: not UTF-8 text ({e}); each line must be '<relative path> <label>'") from None

    base = Path(os.path.abspath(directory))
    paths, labels, line_numbers, problems = [], [], [], []
    for number, line in enumerate(text.splitlines(), start=1):  # splitlines() also drops CR of CRLF
        fields = line.split()
        if not fields:
            continue  # blank lines and trailing whitespace are tolerated
        where = f"{list_file} line {number}"
        if len(fields) != 2:
            problems.append(f"{where}: expected '<relative path> <label>', got {line.strip()!r}")
            continue
        rel, label_text = fields
        try:
            label = int(label_text)
        except ValueError:
            problems.append(f"{where}: label {label_text!r} is not an integer")
            continue
        if not 0 <= label < task.num_classes:
            problems.append(
                f"{where}: label {label} is outside [0, {task.num_classes}) for {task.name} "
                f"({task.num_classes} classes)"
            )
            continue
        # lexical check, so that a symlinked images/ folder stays allowed
        path = Path(os.path.normpath(base / rel))
        if Path(rel).is_absolute() or not path.is_relative_to(base):
            problems.append(f"{where}: image path {rel!r} escapes the task directory {base}")
            continue
        paths.append(path)
        labels.append(label)
        line_numbers.append(number)
    if problems:
        raise DataError(
            f"{len(problems)} bad line(s) in {list_file}:\n{format_problems(problems, list_all)}"
        )
    if not paths:
        raise DataError(f"split list '{list_file}' lists no images; each line must be '<relative path> <label>'")
    expected = EXPECTED_SPLIT_SIZES.get(split, task.test_size)
    if len(paths) != expected:
        log.info("%s/%s lists %d images (VTAB-1K has %d)", task.name, split, len(paths), expected)
    return SplitList(task, split, list_file, tuple(paths), tuple(labels), tuple(line_numbers))


def check_image_files(split: SplitList, list_all: bool = False) -> None:
    """Every listed image exists and is not empty (decoding problems surface when images are decoded)."""
    problems = []
    for i, path in enumerate(split.paths):
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path}: missing (listed in {split.where(i)})")
            continue
        if size == 0:
            problems.append(f"{path}: empty file (listed in {split.where(i)})")
    if problems:
        raise DataError(
            f"{len(problems)} bad image file(s) in {split.task.name}/{split.split}:\n"
            f"{format_problems(problems, list_all)}\nRestore the files or fix the list."
        )


def load_protocol(root: Path, task: Task, protocol: str, list_all: bool = False) -> tuple[SplitList, SplitList]:
    """Validate and return (train, eval) split lists for `protocol` ('final' or 'tune')."""
    if protocol not in PROTOCOLS:
        raise DataError(f"protocol={protocol!r} is not one of {sorted(PROTOCOLS)}")
    directory = task_dir(root, task)
    splits = tuple(read_split_list(directory, task, name, list_all) for name in PROTOCOLS[protocol])
    for split in splits:
        check_image_files(split, list_all)
    return splits
