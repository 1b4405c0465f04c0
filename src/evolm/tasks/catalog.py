"""What tasks and datasets exist, for `evolm datasets`."""

from __future__ import annotations

from typing import Any

from evolm.tasks import BUILTIN, task_class


def describe_tasks() -> list[dict[str, Any]]:
    """One row per built-in task; a task whose module fails to import is listed with the error."""
    rows = []
    for name in BUILTIN:
        row: dict[str, Any] = {"name": name, "description": "", "builtin_data": None, "hub_dataset": None}
        try:
            cls = task_class(name)
        except Exception as exc:  # a broken task module must not hide the others
            row["error"] = str(exc)
        else:
            row.update(description=cls.description, builtin_data=cls.builtin_data, hub_dataset=cls.hub_dataset)
        rows.append(row)
    return rows
