"""VTAB-1K data: task registry, tree validation, decode-once cache and loaders."""

from .datamodule import VTabDataModule
from .tasks import GROUPS, TASKS, Task, canonical_task_name, get_task

__all__ = ["GROUPS", "TASKS", "Task", "VTabDataModule", "canonical_task_name", "get_task"]
