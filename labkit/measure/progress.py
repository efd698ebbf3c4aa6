"""Progress bars, at most one per notebook cell.

A cell that trains two students, or scores three models one after another, drew one bar per call: a
stack of finished bars that says nothing the last one does not. `bar` gives every long loop a tqdm bar
(tqdm.auto: a widget in Jupyter, text elsewhere), with two rules inside a Jupyter cell:

- one after another: a bar asked for after the cell's previous bar was closed reuses that widget
  (`tqdm.reset` with the new total and description), so the cell ends showing one bar, the last work's;
- one inside another: a bar asked for while the cell's bar is running is silent, so a sweep's bar is not
  joined by a bar per point it scores.

    with bar(total=20, desc="train student-ends") as b:   # the cell's bar
        for _ in range(20):
            b.update()

Outside Jupyter (scripts, tests, `labkit` commands) every call is a plain tqdm bar.
Left out: nested bars shown together (tqdm's `position`): they are what this module avoids.
"""

from __future__ import annotations

from typing import Any


class Bar:
    """A tqdm bar whose close() leaves the widget to the cell's next bar (Jupyter) or closes it (elsewhere)."""

    def __init__(self, inner: Any, shared: bool):
        self.inner, self.shared, self.closed = inner, shared, False

    def update(self, n: float = 1) -> None:
        self.inner.update(n)

    def set_postfix_str(self, text: str) -> None:
        self.inner.set_postfix_str(text)

    def set_postfix(self, **values) -> None:
        self.inner.set_postfix(**values)

    def set_description(self, text: str) -> None:
        self.inner.set_description_str(text)

    def write(self, text: str) -> None:
        self.inner.write(text)

    def __iter__(self):
        raise TypeError("iterate with progress.track(items, desc=...)")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.shared:
            self.inner.refresh()
            _cell_bar["running"] = False
        else:
            self.inner.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_cell_bar: dict[str, Any] = {"cell": None, "bar": None, "running": False}


def _cell() -> int | None:
    """The running Jupyter cell's execution count; None outside a Jupyter kernel."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return None
    return shell.execution_count


def bar(total: int | None, desc: str, unit: str = "it", disable: bool = False, **tqdm_kwargs) -> Bar:
    """A progress bar over `total` steps; see the module docstring for the one-bar-per-cell rules."""
    from tqdm.auto import tqdm

    cell = None if disable else _cell()
    if cell is None:
        return Bar(tqdm(total=total, desc=desc, unit=unit, disable=disable, mininterval=2, **tqdm_kwargs), False)
    if _cell_bar["cell"] == cell and _cell_bar["running"]:
        return Bar(tqdm(total=total, disable=True), False)  # inside the cell's running bar: silent
    if _cell_bar["cell"] == cell and _cell_bar["bar"] is not None:
        inner = _cell_bar["bar"]
        inner.unit = unit
        inner.reset(total=total)
        inner.set_description_str(desc)
        inner.set_postfix_str("")
    else:
        inner = tqdm(total=total, desc=desc, unit=unit, mininterval=2, **tqdm_kwargs)
        _cell_bar.update(cell=cell, bar=inner)
    _cell_bar["running"] = True
    return Bar(inner, True)


def track(items, desc: str, unit: str = "it", disable: bool = False):
    """Iterate `items` with a bar (`for batch in track(batches, desc="evaluate")`)."""
    items = list(items)
    with bar(len(items), desc, unit=unit, disable=disable) as b:
        for item in items:
            yield item
            b.update()
