"""At most one progress bar per notebook cell: bars in a row reuse the cell's widget, bars inside it are silent."""

import pytest

from labkit.measure import progress


@pytest.fixture
def cell(monkeypatch):
    """Pretend to run inside Jupyter cell number `n` (tqdm.auto draws text bars here, the same class logic)."""
    state = {"n": 1}
    monkeypatch.setattr(progress, "_cell", lambda: state["n"])
    monkeypatch.setattr(progress, "_cell_bar", {"cell": None, "bar": None, "running": False})
    return state


def test_bars_one_after_another_in_a_cell_reuse_one_bar(cell):
    with progress.bar(20, "train student-ends") as first:
        first.update(20)
    with progress.bar(30, "train student-alternate") as second:
        second.update(5)
    assert second.inner is first.inner  # one widget for the cell
    assert (second.inner.total, second.inner.n, second.inner.desc) == (30, 5, "train student-alternate")


def test_a_bar_inside_the_cells_running_bar_is_silent(cell):
    with progress.bar(3, "pruning sweep") as outer:
        for _ in progress.track(range(5), "evaluate"):
            pass
        outer.update()
        assert outer.inner.n == 1 and outer.inner.desc == "pruning sweep"
    assert list(progress.track(range(3), "evaluate")) == [0, 1, 2]  # after it: reuses the cell's bar
    assert progress._cell_bar["bar"] is outer.inner and outer.inner.desc == "evaluate"


def test_a_new_cell_gets_a_new_bar(cell):
    with progress.bar(2, "a") as first:
        pass
    cell["n"] = 2
    with progress.bar(2, "b") as second:
        pass
    assert second.inner is not first.inner


def test_outside_jupyter_every_bar_is_its_own(monkeypatch):
    monkeypatch.setattr(progress, "_cell", lambda: None)
    with progress.bar(2, "a") as first, progress.bar(2, "b") as second:
        assert first.inner is not second.inner and not first.inner.disable and not second.inner.disable
