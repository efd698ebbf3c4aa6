"""Teacher training: tokenizer layout, model shape rules, and that a short run learns."""

from __future__ import annotations

import json

import pytest
import torch

from labkit.compress import training
from labkit.core import data
from labkit.core.bundle import TEACHER_DIR, start_row_norm


def test_training_lowers_loss_and_raises_bleu(tiny_bundle):
    """The session fixture trains the tiny config with three evaluations along the way."""
    history = tiny_bundle.meta["training"]["history"]
    assert len(history) == 3
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    assert history[-1]["dev_bleu"] > history[0]["dev_bleu"]


def test_vocabulary_layout_is_opus_mt_like(tiny_bundle):
    """</s>=0, <unk>=1, <pad> last and decoder_start = pad: what CTranslate2's converter expects."""
    tok, cfg = tiny_bundle.tokenizer, tiny_bundle.model.config
    vocab = tok.get_vocab()
    assert vocab["</s>"] == 0 and vocab["<unk>"] == 1 and vocab["<pad>"] == len(vocab) - 1
    assert cfg.pad_token_id == cfg.decoder_start_token_id == len(vocab) - 1
    assert cfg.scale_embedding and cfg.vocab_size == len(vocab)


def test_sidecar_records_how_it_was_trained(tiny_bundle):
    training = tiny_bundle.meta["training"]
    for key in ("command", "config", "wall_time_s", "final_dev_bleu", "history", "train_pairs"):
        assert key in training
    assert training["config"]["seed"] == 0


@pytest.mark.parametrize("step,expected", [(0, 0.1), (9, 1.0), (10, 1.0), (100, 0.1)])
def test_lr_schedule(step, expected):
    """Warm-up 10 steps to 1.0, cosine to 10 % at step 100."""
    assert training.lr_at(step, 1.0, 10, 100) == pytest.approx(expected)


def test_unknown_config_name():
    with pytest.raises(KeyError, match="known: teacher, tiny"):
        training.TeacherConfig.from_name("huge")


def test_committed_teacher_has_its_provenance():
    """The sidecar says how the teacher was trained (recipe, every stage, steps, wall time, dev scores) and
    on what: the last stage's training-data digest is the committed train split's."""
    from labkit.compress import teacher

    meta = json.loads((TEACHER_DIR / "bundle.json").read_text())
    training = meta["training"]
    assert training["command"].startswith("python -m labkit.compress.teacher export --recipe small")
    recipe = training["recipe"]
    assert recipe["encoder_layers"] == recipe["decoder_layers"] == 6 and recipe["heads"] == 8
    if training["train_digest"] != teacher.data_digest(data.load_split("train")):  # the split changed since: say how
        assert "corpus_changes_since" in training.get("annotations", {}), training["train_digest"]
    assert training["final_dev_bleu"] >= 20 and training["steps"] > 0 and training["wall_time_s"] > 0
    stages = [*training["earlier_stages"], training]
    assert all(s["device"] for s in stages) and sum(s["steps"] for s in stages) >= 2400
    size = sum(p.stat().st_size for p in TEACHER_DIR.iterdir())
    assert size <= 60 * 2**20, size
    assert meta["storage_dtype"] == "torch.float16"


def test_committed_teacher_starts_from_a_zero_vector():
    from labkit.core.bundle import load_teacher

    assert start_row_norm(load_teacher().model) == 0.0


def test_command_line_trains_and_records_its_command(tmp_path):
    """`python -m labkit.compress.training teacher …` (the README's re-creation command) runs end to end."""
    import subprocess
    import sys

    out = tmp_path / "teacher"
    proc = subprocess.run([sys.executable, "-m", "labkit.compress.training", "teacher", "--config", "tiny", "--steps", "10",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["training"]["command"].startswith("python -m labkit.compress.training teacher --config tiny --steps 10")
    assert meta["training"]["config"]["steps"] == 10 and "dev_bleu" in json.loads(proc.stdout.splitlines()[-1])


def test_fit_leaves_the_unsaved_position_tables_alone(tiny_bundle):
    """transformers does not save Marian's sinusoidal tables: training them would make the saved
    model differ from the measured one."""
    from labkit.core import data

    model = tiny_bundle.model
    before = [s.embed_positions.weight.detach().clone() for s in (model.model.encoder, model.model.decoder)]
    training.fit(model, tiny_bundle.tokenizer, data.load_split("train", limit=64), data.load_split("dev", limit=2), steps=3, batch_size=16,
              lr=1e-2, warmup=1, eval_every=10, progress=False)
    after = [s.embed_positions.weight for s in (model.model.encoder, model.model.decoder)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert any(p.requires_grad for p in model.parameters())  # everything else still trains


@pytest.mark.parametrize("loss", ["cross-entropy", "custom"])
def test_fit_pins_the_decoder_start_row_at_zero(tiny_bundle, loss):
    """Marian/CTranslate2 start from a zero vector: the row starts at zero (even from a trained non-zero
    one) and stays there through AdamW steps, with the default loss or a plugged-in one (distillation)."""
    model = tiny_bundle.model
    start = model.config.decoder_start_token_id
    assert start_row_norm(model) == 0.0  # the fixture was trained by fit
    with torch.no_grad():
        model.get_input_embeddings().weight[start] += 0.5
    other = model.get_input_embeddings().weight.detach()[5].clone()
    loss_fn = None if loss == "cross-entropy" else (lambda m, b: m(**b).loss * 2.0)
    training.fit(model, tiny_bundle.tokenizer, data.load_split("train", limit=64), data.load_split("dev", limit=2),
                 steps=3, batch_size=16, lr=1e-2, warmup=1, eval_every=10, progress=False, loss_fn=loss_fn)
    assert start_row_norm(model) == 0.0
    assert not torch.equal(model.get_input_embeddings().weight.detach()[5], other)  # the rest trained


def test_zero_start_finetune_records_itself(tiny_bundle):
    record = training.zero_start_finetune(tiny_bundle, training.ZeroStartTune(steps=2, batch_size=8, warmup=1,
                                                                              eval_sentences=2), progress=False)
    assert start_row_norm(tiny_bundle.model) == 0.0 and record["start_row_norm_after"] == 0.0
    assert tiny_bundle.meta["training"]["fine_tunes"][-1] is record
    assert record["config"]["steps"] == 2 and record["wall_time_s"] >= 0 and "final_dev_bleu" in record
