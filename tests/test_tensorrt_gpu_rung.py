"""The torch GPU rung and `labkit gpu-check`: the static-cache step against Hugging Face's decoder on the CPU,
the command's CPU-side dry run, notebook 06's Part 2 records; the CUDA runs carry the `cuda` marker."""

from __future__ import annotations

import json

import pytest
import torch

from labkit.cli import main as cli_main
from labkit.config import Preset
from labkit.core.bundle import load_bundle
from labkit.core.data import load_split
from labkit.core.decode import DecodeConfig, TorchStepper, decode
from labkit.engines import torch_cuda as C
from labkit.lab import gpu_check
from labkit.lab import nb06_tensorrt as nb06


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir):
    torch.set_num_threads(1)
    return load_bundle(tiny_bundle_dir)


@pytest.fixture(scope="module")
def batch(bundle):
    return bundle.tokenizer([p.zh for p in load_split("test", limit=6)], padding=True, return_tensors="pt")


@pytest.mark.parametrize("cfg", [DecodeConfig(max_new_tokens=24), DecodeConfig(max_new_tokens=24, num_beams=3),
                                 DecodeConfig(max_new_tokens=24, forced_length=12)], ids=["greedy", "beam3", "forced"])
def test_static_step_decodes_like_hf(bundle, batch, cfg):
    """Oracle: Hugging Face's decoder with its own cache (TorchStepper). The static step (fixed-capacity K/V
    written at a device-side position, masked attention over all slots) must give the same tokens."""
    want = decode(TorchStepper(bundle.model), batch["input_ids"], batch["attention_mask"], cfg)
    model = C.rung_model(bundle.model, "torch-fp32-eager", "cpu")
    got = decode(C.GraphStepper(model, capacity=25, graphs=True), batch["input_ids"], batch["attention_mask"], cfg)
    assert got == want  # graphs=True is ignored off CUDA: the same step runs eagerly


def test_static_step_refuses_to_run_past_its_capacity(bundle, batch):
    stepper = C.GraphStepper(C.rung_model(bundle.model, "torch-fp32-eager", "cpu"), capacity=4)
    with pytest.raises(ValueError, match="capacity 4 exceeded"):
        decode(stepper, batch["input_ids"], batch["attention_mask"], DecodeConfig(forced_length=8))


def test_device_stepper_on_the_cpu_is_the_torch_stepper(bundle, batch):
    cfg = DecodeConfig(max_new_tokens=24, num_beams=2)
    model = C.rung_model(bundle.model, "torch-fp32-eager", "cpu")
    assert decode(C.DeviceStepper(model), batch["input_ids"], batch["attention_mask"], cfg) == \
        decode(TorchStepper(bundle.model), batch["input_ids"], batch["attention_mask"], cfg)


def test_additive_mask_never_reaches_minus_infinity():
    mask = C.additive_mask(torch.tensor([[1, 0]]), torch.float16)
    assert mask.tolist() == [[0.0, -65504.0]] and torch.isfinite(mask).all()


def test_rung_model_rejects_unknown_variants(bundle):
    with pytest.raises(ValueError, match="unknown rung variant"):
        C.rung_model(bundle.model, "torch-int4", "cpu")


# --------------------------------------------------------------------------- labkit gpu-check, dry run


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """`labkit gpu-check --dry-run` on ci through the real command line, into a fresh artifacts root."""
    out = tmp_path_factory.mktemp("gpu") / "gpu-check.json"
    mp = pytest.MonkeyPatch()
    mp.setenv("LABKIT_ARTIFACTS", str(out.parent))
    try:
        code = cli_main(["gpu-check", "--dry-run", "--preset", "ci", "--sentences", "1", "--gate-sentences", "6",
                         "--out", str(out)])
    finally:
        mp.undo()
    return code, gpu_check.read_report(out)


def test_dry_run_gates_and_times_what_needs_no_cuda(dry_run):
    code, report = dry_run
    rows = {r["variant"]: r for r in report["rows"]}
    assert code == 0 and not report["errors"] and report["device"] == "cpu" and report["dry_run"]
    for name in ("torch-cuda-fp32-eager", gpu_check.STATIC_DRY_RUN):
        r = rows[name]
        assert r["status"] == "ok" and r["gate"]["passed"] and r["device"] == "cpu", r
        assert r["latency_ms"]["n"] == report["sentences_timed"] * Preset.from_name("ci").trt.gpu_repeats
        assert r["agreement"] == 1.0  # fp32 on the CPU reproduces the CPU fp32 model exactly


def test_dry_run_skips_the_cuda_parts_with_reasons_and_no_numbers(dry_run):
    _, report = dry_run
    skipped = [r for r in report["rows"] if r["status"] == "skipped"]
    assert {r["variant"] for r in skipped} == {"torch-cuda-fp16-eager", "torch-cuda-fp16-cudagraph",
                                               "trt-engine-fp16", "trt-engine-int8"}
    for r in skipped:
        assert "no CUDA device" in r["reason"] and "latency_ms" not in r and "speedup_vs_fp32_eager" not in r
    assert all(t["measured_x"] is None for t in report["targets"].values())  # never a number for what did not run


def test_a_spent_budget_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_ARTIFACTS", str(tmp_path))
    out = tmp_path / "x.json"
    assert cli_main(["gpu-check", "--dry-run", "--preset", "ci", "--budget-s", "0", "--gate-sentences", "2",
                     "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["torch-cuda-fp32-eager"]["status"] == "skipped"
    assert "time budget of 0 s" in rows["torch-cuda-fp32-eager"]["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_bench_on_cuda_without_a_device_is_a_clear_error(capsys):
    assert cli_main(["bench", "--preset", "ci", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


# --------------------------------------------------------------------------- notebook 06's Part 2 records


def test_part2_records_skip_with_reason_and_carry_gates_when_run(bundle):
    rows = [{"variant": "trt-engine-int8", "status": "skipped", "reason": "tensorrt is not installed"},
            {"variant": "torch-cuda-fp16-cudagraph", "status": "failed", "reason": "BLEU drop 1.3",
             "gate": {"name": "bleu-drop<=1.0", "passed": False, "detail": "BLEU drop 1.3"}, "bleu": 97.0,
             "agreement": 0.9, "latency_ms": None},
            {"variant": "torch-cuda-fp32-eager", "status": "ok", "reason": None, "device": "cuda",
             "gate": {"name": "agreement>=0.95", "passed": True, "detail": "48/48"}, "bleu": 99.0, "agreement": 1.0,
             "latency_ms": {"p50": 50.0, "p95": 60.0, "n": 40}, "speedup_vs_fp32_eager": 1.0}]
    skipped, failed, ok = nb06.part2_records(rows, bundle)
    assert (skipped["status"], skipped["reason"], skipped["metrics"]) == ("skipped", "tensorrt is not installed", None)
    assert (skipped["backend"], skipped["precision"], skipped["parent"]) == ("tensorrt", "int8", "onnx-trt-int8")
    assert failed["status"] == "failed" and "latency_ms" not in failed["metrics"] and failed["precision"] == "fp16"
    assert ok["metrics"]["latency_ms"]["p50"] == 50.0
    assert (ok["backend"], ok["technique"]) == ("torch-cuda", "tensorrt")


# --------------------------------------------------------------------------- on a CUDA device


@pytest.mark.cuda
def test_cuda_graph_replay_decodes_like_eager_static(bundle, batch):
    """The captured graph replays the very step the eager path runs: same tokens, greedy and beam."""
    model = C.rung_model(bundle.model, "torch-fp32-eager", "cuda")
    for cfg in (DecodeConfig(max_new_tokens=24), DecodeConfig(max_new_tokens=24, num_beams=3)):
        eager = decode(C.GraphStepper(model, 25, graphs=False), batch["input_ids"], batch["attention_mask"], cfg)
        graph = decode(C.GraphStepper(model, 25, graphs=True), batch["input_ids"], batch["attention_mask"], cfg)
        assert graph == eager == decode(TorchStepper(bundle.model), batch["input_ids"], batch["attention_mask"], cfg)


@pytest.mark.cuda
def test_cuda_times_are_positive_and_counted(bundle, batch):
    model = C.rung_model(bundle.model, "torch-fp16-eager", "cuda")
    stepper = C.DeviceStepper(model)
    times = C.cuda_times(lambda: decode(stepper, batch["input_ids"][:1], batch["attention_mask"][:1],
                                        DecodeConfig(forced_length=8)), warmup=1, repeats=3)
    assert len(times) == 3 and all(t > 0 for t in times)
