"""The 19 VTAB-1K tasks: directory names (NOAH layout), aliases used by other repos, classes, expected sizes."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

GROUPS = ("Natural", "Specialized", "Structured")


@dataclass(frozen=True)
class Task:
    name: str  # directory name under the VTAB-1K root
    group: str
    num_classes: int
    test_size: int  # from the literature: an expectation to report against, not an assertion
    aliases: tuple[str, ...] = ()


# SPEC order: this is also the column order of the results table.
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("cifar", "Natural", 100, 10_000, ("cifar100",)),
        Task("caltech101", "Natural", 102, 6_084),
        Task("dtd", "Natural", 47, 1_880),
        Task("oxford_flowers102", "Natural", 102, 6_149, ("flowers102",)),
        Task("oxford_iiit_pet", "Natural", 37, 3_669, ("oxford_pet", "pets", "pet")),
        Task("svhn", "Natural", 10, 26_032),
        Task("sun397", "Natural", 397, 21_750),
        Task("patch_camelyon", "Specialized", 2, 32_768, ("camelyon",)),
        Task("eurosat", "Specialized", 10, 5_400),
        Task("resisc45", "Specialized", 45, 6_300),
        Task("diabetic_retinopathy", "Specialized", 5, 42_670, ("retinopathy",)),
        Task("clevr_count", "Structured", 8, 15_000),
        Task("clevr_dist", "Structured", 6, 15_000, ("clevr_distance",)),
        Task("dmlab", "Structured", 6, 22_735),
        Task("kitti", "Structured", 4, 711),
        Task("dsprites_loc", "Structured", 16, 73_728, ("dsprites_position",)),
        Task("dsprites_ori", "Structured", 16, 73_728, ("dsprites_orientation",)),
        Task("smallnorb_azi", "Structured", 18, 12_150, ("smallnorb_azimuth",)),
        Task("smallnorb_ele", "Structured", 9, 12_150, ("smallnorb_elevation",)),
    )
}

ALIASES: dict[str, str] = {alias: t.name for t in TASKS.values() for alias in t.aliases}

# Expected list sizes of VTAB-1K (test sizes are per task).
EXPECTED_SPLIT_SIZES = {"train800": 800, "val200": 200, "train800val200": 1000}


class UnknownTaskError(ValueError):
    pass


def canonical_task_name(name: str) -> str:
    """Return the directory name for a task name or alias; raise with the valid names otherwise."""
    key = name.strip().lower()
    if key in TASKS:
        return key
    if key in ALIASES:
        return ALIASES[key]
    raise UnknownTaskError(unknown_task_message(name))


def unknown_task_message(name: str) -> str:
    candidates = list(TASKS) + list(ALIASES)
    close = difflib.get_close_matches(name.lower(), candidates, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    listing = ", ".join(
        f"{t.name} ({', '.join(t.aliases)})" if t.aliases else t.name for t in TASKS.values()
    )
    return f"unknown task '{name}'.{hint} Valid tasks (aliases in brackets): {listing}"


def get_task(name: str) -> Task:
    return TASKS[canonical_task_name(name)]
