"""Bundles: save/load round trips, refusals, hub errors offline, the opus-mt shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from labkit.core import bundle as bundles


def logits(bundle, text="他去了北京。"):
    enc = bundle.tokenizer([text], return_tensors="pt")
    with torch.inference_mode():
        return bundle.model(**enc, decoder_input_ids=torch.tensor([[bundle.model.config.decoder_start_token_id]])).logits


def test_round_trip_fp32_is_exact(tiny_bundle, tmp_path):
    tiny_bundle.meta["name"] = "t"
    tiny_bundle.save(tmp_path / "b")
    again = bundles.load_bundle(tmp_path / "b")
    assert torch.equal(logits(tiny_bundle), logits(again))
    assert again.meta["name"] == "t" and again.params == tiny_bundle.params


def test_fp16_storage_halves_the_file_and_stays_close(tiny_bundle, tmp_path):
    tiny_bundle.save(tmp_path / "fp32")
    tiny_bundle.save(tmp_path / "fp16", dtype=torch.float16)
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "fp16") < 0.6 * size(tmp_path / "fp32")
    again = bundles.load_bundle(tmp_path / "fp16")
    assert again.model.dtype == torch.float32
    torch.testing.assert_close(logits(again), logits(tiny_bundle), atol=5e-2, rtol=0)


def test_save_replaces_atomically_and_leaves_no_temp(tiny_bundle, tmp_path):
    tiny_bundle.save(tmp_path / "b")
    tiny_bundle.save(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_load_refuses_non_bundles(tmp_path):
    with pytest.raises(FileNotFoundError, match="bundle.json is missing"):
        bundles.load_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text(json.dumps({"schema": "other/9"}))
    with pytest.raises(ValueError, match="expected 'labkit.bundle/1'"):
        bundles.load_bundle(tmp_path)


def test_hub_model_offline_is_a_clear_error(tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE when it is imported, so the check runs in a fresh
    # process; in this one transformers is already loaded and would retry the network for minutes.
    code = ("from labkit.core import bundle as bundles\n"
            "try:\n    bundles.load_marian('Helsinki-NLP/opus-mt-zh-en')\n"
            "except ConnectionError as exc:\n    print('ConnectionError:', exc)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ConnectionError:" in proc.stdout and "opus-mt-shape" in proc.stdout, proc.stdout


def test_unreachable_hub_fails_fast_without_offline_mode(tmp_path):
    """No HF_HUB_OFFLINE, the endpoint refuses connections: a clear error in seconds, not minutes of retries."""
    code = ("import time\nfrom labkit.core import bundle as bundles\nt = time.perf_counter()\n"
            "try:\n    bundles.load_marian('Helsinki-NLP/opus-mt-zh-en')\n"
            "except ConnectionError as exc:\n    print('ConnectionError:', exc)\n"
            "print(f'took {time.perf_counter() - t:.1f}')\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}  # the discard port: refused
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ConnectionError:" in proc.stdout and "unreachable" in proc.stdout, proc.stdout
    assert float(proc.stdout.split("took ")[-1]) < bundles.HUB_PROBE_TIMEOUT_S + 5, proc.stdout


def test_mistyped_local_path_is_not_a_network_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model directory"):
        bundles.load_marian(str(tmp_path / "no-such-model"))


def test_save_over_an_old_bundle_keeps_a_whole_one_if_the_move_fails(tiny_bundle, tmp_path, monkeypatch):
    """The old bundle is moved aside, not deleted, until the new one is in place."""
    path = tiny_bundle.save(tmp_path / "b")
    real_replace = os.replace

    def failing(src, dst):
        if Path(src).name.startswith(".b.") and not Path(src).name.startswith(".b.old"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        tiny_bundle.save(path)
    monkeypatch.undo()
    assert bundles.load_bundle(path).params == tiny_bundle.params
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_opus_mt_shape_has_the_real_parameter_count():
    """77,943,296 = 65001*512 shared embeddings + 2*512*512 sinusoidal positions
    + 6 encoder layers * 3,152,384 + 6 decoder layers * 4,204,032
    (attention 4*(512*512+512), FFN 512*2048+2048 + 2048*512+512, LayerNorms 1024 each)."""
    bundle = bundles.build_opus_mt_shape()
    assert bundle.params == 77_943_296
    assert bundle.meta["random_weights"] is True
    cfg = bundle.model.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.encoder_attention_heads,
            cfg.encoder_ffn_dim, cfg.activation_function) == (512, 6, 6, 8, 2048, "swish")


def test_teacher_loads():
    bundle = bundles.load_teacher()
    assert bundle.model.config.encoder_layers == bundle.model.config.decoder_layers == 6
    assert bundle.model.config.encoder_attention_heads == 8
