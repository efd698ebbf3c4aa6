"""The teacher recipe's primitives (labkit.compress.teacher), checked by hand, and resumption of a run."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

from labkit.compress import teacher
from labkit.core import data
from labkit.measure import quality

# --------------------------------------------------------------------------- learning rate


@pytest.mark.parametrize("step,expected", [
    (0, 0.25),   # step 1 of a 4-step warm-up
    (1, 0.5),
    (3, 1.0),    # the peak, at the end of warm-up
    (15, 0.5),   # then peak * sqrt(4 / 16)
    (63, 0.25),  # peak * sqrt(4 / 64)
])
def test_inverse_sqrt_lr_by_hand(step, expected):
    assert teacher.inverse_sqrt_lr(step, 1.0, 4) == pytest.approx(expected)


def test_inverse_sqrt_lr_scales_with_peak_and_never_exceeds_it():
    assert teacher.inverse_sqrt_lr(0, 7e-4, 2000) == pytest.approx(7e-4 / 2000)
    assert teacher.inverse_sqrt_lr(1999, 7e-4, 2000) == pytest.approx(7e-4)
    assert max(teacher.inverse_sqrt_lr(s, 7e-4, 2000) for s in range(10_000)) == pytest.approx(7e-4)


# --------------------------------------------------------------------------- batches


def test_token_batches_by_hand():
    # ten examples of 5 tokens under 20 tokens a batch: 4 + 4 + 2
    batches = teacher.token_batches([5] * 10, 20, random.Random(0))
    assert sorted(len(b) for b in batches) == [2, 4, 4]
    # a 50-token example is a batch of its own; the two 1-token ones go together
    batches = teacher.token_batches([50, 1, 1], 10, random.Random(0))
    assert sorted(sorted(b) for b in batches) == [[0], [1, 2]]
    assert teacher.token_batches([], 10, random.Random(0)) == []


@pytest.mark.parametrize("max_tokens,pool", [(64, 100), (200, 2), (37, 1)])
def test_token_batches_cover_every_index_once_within_the_budget(max_tokens, pool):
    gen = random.Random(1)
    lengths = [gen.randint(2, 60) for _ in range(500)] + [80, 120]  # two longer than some budgets
    batches = teacher.token_batches(lengths, max_tokens, random.Random(7), pool=pool)
    assert sorted(j for b in batches for j in b) == list(range(len(lengths)))
    for b in batches:
        padded = max(lengths[j] for j in b) * len(b)
        assert padded <= max_tokens or len(b) == 1, (b, padded)


def test_token_batches_are_deterministic_for_a_seed():
    lengths = [random.Random(2).randint(2, 60) for _ in range(300)]
    a = teacher.token_batches(lengths, 128, random.Random(5))
    assert a == teacher.token_batches(lengths, 128, random.Random(5))
    assert a != teacher.token_batches(lengths, 128, random.Random(6))  # another epoch, another order


# --------------------------------------------------------------------------- averaging, references


def test_average_states_means_floats_and_takes_the_rest_from_the_last():
    a = {"w": torch.tensor([1.0, 3.0]), "h": torch.tensor([1.0], dtype=torch.float16), "n": torch.tensor(1)}
    b = {"w": torch.tensor([3.0, 5.0]), "h": torch.tensor([2.0], dtype=torch.float16), "n": torch.tensor(7)}
    out = teacher.average_states([a, b])
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0]))
    assert out["h"].dtype == torch.float16 and torch.equal(out["h"], torch.tensor([1.5], dtype=torch.float16))
    assert out["n"] is b["n"]
    assert torch.equal(teacher.average_states([a])["w"], a["w"])


def test_reference_streams_pad_with_none():
    pairs = [data.Pair("甲", "a1", ("a2",)), data.Pair("乙", "b1"), data.Pair("丙", "c1", ("c2", "c3"))]
    assert quality.reference_streams([p.references for p in pairs]) == [["a1", "b1", "c1"], ["a2", None, "c2"], [None, None, "c3"]]
    assert quality.reference_streams([p.references for p in pairs[1:2]]) == [["b1"]]


# --------------------------------------------------------------------------- resumption


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """train[:40] (5 global batches an epoch at the tiny recipe's 512 tokens), dev[:4], and a tokenizer.

    The tokenizer is built on train[:400] with src_vocab 1000: the tiny recipe's 600 source pieces cannot
    hold the ~870 characters sentencepiece must keep at zh_coverage 0.9995 even on 400 pairs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train = data.load_split("train")[:400]
    tok_dir = tmp_path_factory.mktemp("teacher-tok")
    teacher.build_tokenizers(replace(teacher.RECIPES["tiny"], src_vocab=1000), tok_dir, train)
    yield tok_dir, train[:40], data.load_split("dev")[:4]
    torch.set_num_threads(threads)


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _without_wall(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "wall_s"} for e in entries]


@pytest.mark.slow
def test_resuming_matches_one_uninterrupted_run(small_corpus, tmp_path):
    """8 steps in one call vs. 4 then 4 more in a second call on the same work dir.

    The second call reloads model, optimizer and state (step, epoch/batch counters, history, checkpoints,
    running loss) from state.pt and rebuilds the epoch's batch order from seed + epoch, so it draws
    the same batches from where the first stopped (mid-epoch here, and it crosses into epoch 1). With
    dropout 0 and one thread the arithmetic is the same, so everything but wall time is bitwise equal."""
    tok_dir, train, dev = small_corpus
    recipe = replace(teacher.RECIPES["tiny"], eval_every=4, average=2, eval_sentences=len(dev))
    kw = dict(train_pairs=train, dev_pairs=dev, world=teacher.World(), progress=False)
    once = teacher.train(recipe, tok_dir, tmp_path / "once", max_steps=8, **kw)
    half = teacher.train(recipe, tok_dir, tmp_path / "split", max_steps=4, **kw)
    assert (half["step"], half["epoch"], half["batch"]) == (4, 0, 4)  # stopped mid-epoch (5 batches)
    resumed = teacher.train(recipe, tok_dir, tmp_path / "split", max_steps=8, **kw)

    assert resumed["step"] == once["step"] == 8
    assert (resumed["epoch"], resumed["batch"]) == (once["epoch"], once["batch"]) == (1, 3)
    assert resumed["losses"] == once["losses"] and len(once["losses"]) == 8
    assert [e["step"] for e in once["history"]] == [4, 8]
    assert _without_wall(resumed["history"]) == _without_wall(once["history"])
    assert resumed["checkpoints"] == once["checkpoints"] == ["ckpt-4.pt", "ckpt-8.pt"]
    assert (resumed["best"], resumed["since_best"]) == (once["best"], once["since_best"])

    a, b = tmp_path / "once", tmp_path / "split"
    for name in ("ckpt-4.pt", "ckpt-8.pt", "best.pt"):
        assert _tensors_equal(torch.load(a / name), torch.load(b / name)), name
    sa, sb = (torch.load(d / teacher.STATE, weights_only=False) for d in (a, b))
    assert _tensors_equal(sa["model"], sb["model"])
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    for k, st in sa["optimizer"]["state"].items():
        assert _tensors_equal(st, sb["optimizer"]["state"][k]), k
    logs = [[json.loads(line) for line in (d / teacher.LOG).read_text().splitlines()] for d in (a, b)]
    assert _without_wall(logs[0]) == _without_wall(logs[1]) and len(logs[0]) == 2


@pytest.mark.slow
def test_a_time_budget_stop_is_saved_with_the_state(small_corpus, tmp_path):
    """`max_minutes` ends at the first evaluation past it, and state.pt (what `finish` exports) says why."""
    tok_dir, train, dev = small_corpus
    recipe = replace(teacher.RECIPES["tiny"], eval_every=2, average=2, eval_sentences=len(dev))
    state = teacher.train(recipe, tok_dir, tmp_path / "w", max_steps=50, max_minutes=1e-9, train_pairs=train,
                          dev_pairs=dev, world=teacher.World(), progress=False)
    assert state["step"] == 2 and state["stopped"] == "time budget"
    assert torch.load(tmp_path / "w" / teacher.STATE, weights_only=False)["state"]["stopped"] == "time budget"


@pytest.mark.slow
def test_export_averages_as_many_checkpoints_as_asked(small_corpus, tmp_path):
    """Training kept three checkpoints; an export asking for two averages the last two (the override wins)."""
    tok_dir, train, dev = small_corpus
    recipe = replace(teacher.RECIPES["tiny"], eval_every=2, average=3, eval_sentences=len(dev))
    teacher.train(recipe, tok_dir, tmp_path / "w", max_steps=6, train_pairs=train, dev_pairs=dev,
                  world=teacher.World(), progress=False)
    bundle = teacher.finish(replace(recipe, average=2), tok_dir, tmp_path / "w", tmp_path / "out", dev_pairs=dev)
    assert set(bundle.meta["training"]["dev_scores"]) == {"best", "average of last 2"}
    assert (tmp_path / "out" / "bundle.json").exists()
