"""Rich progress bars for rounds, clients and evaluation (a no-op when disabled)."""

from __future__ import annotations


class Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._p = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self._p = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=False)
            self._p.__enter__()
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)

    def task(self, description: str, total: int):
        if self._p is None:
            return None
        return self._p.add_task(description, total=total, info="")

    def update(self, task, advance: int = 0, completed: int | None = None, info: str = ""):
        if self._p is not None and task is not None:
            self._p.update(task, advance=advance, completed=completed, info=info)

    def remove(self, task):
        if self._p is not None and task is not None:
            self._p.remove_task(task)
