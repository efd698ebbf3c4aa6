"""The workshop's checks teach: each passes the library's reference, names each plausible wrong answer's
mistake, says "not done yet" for a stub, and hands back a function the notebook can go on with."""

from __future__ import annotations

import pytest

from labkit.lab import exercises
from labkit.lab.exercises import EXERCISES, NOT_DONE, PASSED, WRONG, verdict

ALL = list(EXERCISES.values())


def test_there_are_at_least_ten_exercises_across_the_notebooks():
    assert len(ALL) >= 10
    assert {e.notebook for e in ALL} >= {"01", "02", "03", "04", "05", "06", "07", "08", "09"}
    assert all(5 <= e.minutes <= 15 for e in ALL)


@pytest.mark.parametrize("exercise", ALL, ids=lambda e: e.name)
def test_the_reference_passes(exercise):
    v = verdict(exercise, exercise.reference)
    assert v.status == PASSED, v
    assert str(v).startswith(f"exercise {exercise.name}: passed")


@pytest.mark.parametrize("exercise", ALL, ids=lambda e: e.name)
def test_every_plausible_wrong_answer_gets_its_hint(exercise):
    assert len(exercise.wrong) >= 2
    for wrong_fn, hint in exercise.wrong:
        v = verdict(exercise, wrong_fn)
        assert v.status == WRONG and v.message == hint, (hint, v)


@pytest.mark.parametrize("exercise", ALL, ids=lambda e: e.name)
def test_a_stub_is_not_done_yet_and_the_notebook_goes_on_with_the_reference(exercise, capsys):
    def stub(*args):
        raise NotImplementedError(exercise.task)

    assert verdict(exercise, stub).status == NOT_DONE
    assert exercises.check_exercise(exercise, stub) is exercise.reference
    out = capsys.readouterr().out
    assert out.startswith(f"exercise {exercise.name}: not done yet") and "goes on with the library's version" in out


@pytest.mark.parametrize("exercise", ALL, ids=lambda e: e.name)
def test_an_unknown_wrong_answer_shows_the_first_input_where_it_differs(exercise):
    v = verdict(exercise, lambda *args: 0)
    assert v.status == WRONG and "expected" in v.message, v


def test_an_error_in_the_participants_code_is_feedback_not_a_crash():
    v = verdict(exercises.KD_LOSS, lambda s, t, T: s @ t)  # shapes do not match
    assert v.status == WRONG and v.message.startswith("it raised RuntimeError")


def test_a_passing_answer_is_the_one_the_notebook_goes_on_with(capsys):
    def mine(fraction, factor):
        return 1 / (1 - fraction + fraction / factor)

    assert exercises.check_amdahl(mine) is mine
    assert capsys.readouterr().out.startswith("exercise amdahl: passed")


def test_the_kd_hint_says_how_far_off_the_loss_is():
    missing_t2 = exercises.KD_LOSS.wrong[0][0]
    assert "4x at T=2" in verdict(exercises.KD_LOSS, missing_t2).message


def test_checkers_are_named_for_their_exercise():
    for e in ALL:
        checker = getattr(exercises, "check_" + e.name.replace("-", "_"))
        assert checker.__name__ == "check_" + e.name.replace("-", "_") and e.task in checker.__doc__


def test_the_int8_round_trip_error_is_at_most_half_a_step():
    w = exercises._weight(3)
    q, scale = exercises.quantize_int8(w)
    assert exercises.int8_error(w, q, scale) <= scale / 2 + 1e-7
