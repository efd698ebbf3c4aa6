"""Row steppers for continuous batching (labkit.core.continuous), and the gate that proves them exact.

    stepper = TorchRowStepper(bundle.model)                         # PyTorch
    stepper = OrtRowStepper.from_dir(ort_dir, ensure_rows(ort_dir, bundle), threads=2)   # ONNX Runtime
    gate = identity_gate(stepper, TorchStepper(bundle.model), rows)  # staggered arrivals vs batch-1 decodes
    gate["passed"], gate["detail"]                                   # True, '48/48 sentences identical ...'

Both run the same decoder step: `DecoderRowsGraph` (labkit.engines.onnx_graphs), one token per row at
the row's own position over a left-padded self-attention cache. PyTorch calls the module directly; for
ONNX Runtime it is exported once per ONNX directory (`ensure_rows`, a sibling directory `<dir>-rows`
with its own sidecar) and, for a dynamically quantized directory, quantized with that directory's
recipe. New sentences start with the directory's own encoder and first-step decoder graphs, which
also give their cross-attention K/V.

A shortlisted directory (labkit.engines.shortlist_ort) gets its parent's rows graph without the LM head;
`ShortlistRowStepper` computes the head over the running rows' candidates and keeps each row to its own.

Left out: static-QDQ and in-engine-loop directories (their graphs differ: `ensure_rows` refuses them by
name), and GPU providers.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from labkit.core.artifacts import digest, ensure, read_json, write_json_atomic
from labkit.core.continuous import ContinuousDecoder, RowState, run_staggered, staggered_arrivals
from labkit.core.decode import DecodeConfig, Stepper, greedy
from labkit.engines.onnx_export import export_one
from labkit.engines.onnx_graphs import (
    DecoderGraph,
    DecoderRowsGraph,
    EncoderGraph,
    example_inputs,
    io_names,
    read_sidecar,
)
from labkit.engines.ort import OrtStepper, load_session
from labkit.engines.ort_int8 import per_token_activations, quantize_dynamic_file, sidecar_digest
from labkit.engines.shortlist import SIDECAR as SHORTLIST_FILE
from labkit.engines.shortlist import load_shortlist
from labkit.engines.shortlist_ort import HEAD_FILE, CandidateHead, LmHead, ShortlistStepper, split_lm_head

ROWS_SIDECAR = "rows.json"
ROWS_FILE = "decoder_rows_model.onnx"
ROWS_SCHEMA = "labkit.rows/1"
PARITY_ATOL = 1e-4  # fp32 ORT vs PyTorch on random inputs (the export's own parity uses 1e-5 on smaller graphs)


def _first_state(out: list[torch.Tensor], n_layers: int, mask: torch.Tensor,
                 allowed: torch.Tensor | None = None) -> RowState:
    """The state after the first decoder step: `out` is (logits, presents..., crosses...) of the `decoder` graph."""
    rows, n = mask.shape[0], 2 * n_layers
    return RowState(torch.ones(rows, dtype=torch.long), torch.ones(rows, 1, dtype=torch.long),
                    list(out[1:1 + n]), list(out[1 + n:]), mask.long(), allowed)


# --------------------------------------------------------------------------- PyTorch


class TorchRowStepper:
    """A MarianMTModel as a RowStepper (exact: the same modules as the ONNX graphs)."""

    def __init__(self, model):
        self.model = model.eval()
        cfg = model.config
        self.start_id, self.eos_id, self.pad_id = cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id
        self.n_layers = len(model.model.decoder.layers)
        self._encoder, self._first, self._rows = EncoderGraph(model), DecoderGraph(model), DecoderRowsGraph(model)

    @torch.inference_mode()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, RowState]:
        hidden = self._encoder(input_ids, attention_mask)
        start = torch.full((input_ids.shape[0], 1), self.start_id, dtype=torch.long)
        out = self._first(start, attention_mask, hidden)
        return out[0].float(), _first_state(out, self.n_layers, attention_mask)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, state: RowState) -> tuple[torch.Tensor, RowState]:
        out = self._rows(tokens[:, None], state.lengths, state.self_mask, state.cross_mask, *state.past, *state.cross)
        return out[0].float(), _stepped(state, list(out[1:]))


def _stepped(state: RowState, presents: list[torch.Tensor]) -> RowState:
    ones = torch.ones_like(state.self_mask[:, :1])
    return RowState(state.lengths + 1, torch.cat([state.self_mask, ones], 1), presents, state.cross,
                    state.cross_mask, state.allowed)


# --------------------------------------------------------------------------- ONNX Runtime


class OrtRowStepper:
    """An ONNX directory's encoder and first-step graphs (run by its OrtStepper) plus its `decoder_rows` graph,
    as a RowStepper."""

    def __init__(self, sessions: dict, meta: dict, first: OrtStepper | None = None):
        self.first = first or OrtStepper(sessions, meta)  # encode + the first step, which also gives the cross K/V
        self.rows = sessions["decoder_rows"]
        self.start_id, self.eos_id, self.pad_id = self.first.start_id, self.first.eos_id, self.first.pad_id
        self.n_layers = self.first.n_layers
        self._rows_inputs = io_names("decoder_rows", self.n_layers)[0]

    @classmethod
    def from_dir(cls, directory: Path | str, rows_dir: Path | str, threads: int = 1,
                 spin: bool = True) -> OrtRowStepper:
        directory = Path(directory)
        meta = read_sidecar(directory)
        sessions = {g: load_session(directory / meta["files"][g], threads, "all", spin=spin)
                    for g in ("encoder", "decoder")}
        sessions["decoder_rows"] = load_session(Path(rows_dir) / ROWS_FILE, threads, "all", spin=spin)
        return cls(sessions, meta, cls.first_stepper(directory, sessions, meta))

    @classmethod
    def first_stepper(cls, directory: Path, sessions: dict, meta: dict) -> OrtStepper:
        """What starts new rows (encoder + first decoder step) for the directory's graphs."""
        return OrtStepper(sessions, meta)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, RowState]:
        logits, _, rows = self._start(input_ids, attention_mask)
        return logits, rows

    def _start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(logits, the first stepper's state after the first step, the rows' RowState)."""
        state = self.first.encode(input_ids, attention_mask)
        logits, state = self.first.step(torch.full((input_ids.shape[0], 1), self.start_id), state)
        out = [logits, *(torch.from_numpy(t) for t in state.past + state.cross)]
        return logits, state, _first_state(out, self.n_layers, attention_mask)

    def step(self, tokens: torch.Tensor, state: RowState) -> tuple[torch.Tensor, RowState]:
        values = [tokens[:, None], state.lengths, state.self_mask, state.cross_mask, *state.past, *state.cross]
        # ascontiguousarray: trimming (keep_rows) leaves views of the cache
        out = self.rows.run(None, {name: np.ascontiguousarray(v.numpy()) for name, v in zip(self._rows_inputs, values)})
        return torch.from_numpy(out[0]).float(), _stepped(state, [torch.from_numpy(o) for o in out[1:]])


class ShortlistRowStepper(OrtRowStepper):
    """A shortlisted ONNX directory as a RowStepper: head-less decoders, and each row decoding over its own
    shortlist candidates (`RowState.allowed`), so a sentence's tokens do not depend on its batch mates.

    Every step computes the head only over the union of the running rows' candidates (gathered again when
    the rows change) and gives each row -inf outside its own."""

    def __init__(self, sessions: dict, meta: dict, first: ShortlistStepper):
        super().__init__(sessions, meta, first)
        first.per_row = True  # each row over its own candidates from its first token on
        self.head, self.vocab = first.head, meta["model"]["vocab_size"]
        self._gathered: tuple[bytes, CandidateHead] | None = None

    @classmethod
    def first_stepper(cls, directory: Path, sessions: dict, meta: dict) -> ShortlistStepper:
        return ShortlistStepper(sessions, meta, LmHead.load(directory / HEAD_FILE),
                                load_shortlist(directory / SHORTLIST_FILE))

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, RowState]:
        logits, first, rows = self._start(input_ids, attention_mask)  # each row's own candidates: first.allowed
        allowed = torch.zeros(rows.rows, self.vocab, dtype=torch.bool)
        allowed[:, torch.from_numpy(first.head.ids)] = torch.from_numpy(first.allowed)
        return logits, replace(rows, allowed=allowed)

    def _head(self, allowed: torch.Tensor) -> CandidateHead:
        ids = allowed.any(0).nonzero().squeeze(1).numpy()
        key = ids.tobytes()
        if self._gathered is None or self._gathered[0] != key:
            self._gathered = (key, self.head.gather(ids))
        return self._gathered[1]

    def step(self, tokens: torch.Tensor, state: RowState) -> tuple[torch.Tensor, RowState]:
        hidden, state = super().step(tokens, state)
        head = self._head(state.allowed)
        logits = head.logits(self.first.head_session, hidden.numpy())
        own = state.allowed[:, torch.from_numpy(head.ids)].numpy()
        full = np.full((logits.shape[0], self.vocab), -np.inf, dtype=np.float32)
        full[:, head.ids] = np.where(own, logits, np.float32(-np.inf))
        return torch.from_numpy(full), state


def row_stepper_from_dir(directory: Path | str, rows_dir: Path | str, threads: int = 1,
                         spin: bool = True) -> OrtRowStepper:
    """The RowStepper for an ONNX directory: ShortlistRowStepper for a shortlisted one, else OrtRowStepper."""
    kind = ShortlistRowStepper if read_sidecar(directory).get("shortlist") else OrtRowStepper
    return kind.from_dir(directory, rows_dir, threads, spin)


# --------------------------------------------------------------------------- the rows graph artifact


def rows_dir(directory: Path | str) -> Path:
    directory = Path(directory)
    return directory.with_name(directory.name + "-rows")


def _supported(meta: dict) -> str | None:
    """Why this ONNX directory cannot get a rows graph, or None."""
    recipe = meta.get("quantization")
    if "loop" in meta.get("files", {}):
        return "an in-engine-loop directory runs the whole decode in one graph"
    if recipe and recipe.get("kind") != "dynamic":
        return f"a {recipe.get('kind')} quantized directory needs calibrated scales for the new graph"
    return None


def write_rows(model, meta: dict, tmp: Path) -> None:
    """Export DecoderRowsGraph into tmp (quantized as the directory of sidecar `meta` was), check fp32 parity,
    write the sidecar."""
    recipe = meta.get("quantization")
    start = time.perf_counter()
    fp32 = tmp / ("fp32-" + ROWS_FILE if recipe else ROWS_FILE)
    exporter = export_one(model, "decoder_rows", fp32)
    parity = rows_parity(model, fp32)
    if not parity["passed"]:
        raise RuntimeError(f"the exported decoder_rows graph disagrees with PyTorch: {parity['detail']}")
    nodes = None
    if recipe:
        nodes = quantize_dynamic_file(fp32, tmp / ROWS_FILE, recipe["blocks"], meta["model"],
                                      recipe.get("ort_optimizer", True))
        fp32.unlink()
        if recipe.get("per_token"):  # as the directory's graphs: one activation scale per token
            per_token_activations(tmp / ROWS_FILE, tmp / ROWS_FILE)
    write_json_atomic(tmp / ROWS_SIDECAR, {"schema": ROWS_SCHEMA, "file": ROWS_FILE, "exporter": exporter,
                                           "parity_fp32": parity, "nodes_quantized": nodes,
                                           "seconds": round(time.perf_counter() - start, 1)})


def strip_rows(parent_rows: Path, meta: dict, tmp: Path) -> None:
    """The parent directory's rows graph without its LM head (as the shortlisted directory's decoders are)."""
    import onnx

    model, _ = split_lm_head(onnx.load(str(parent_rows / ROWS_FILE)), meta["model"]["vocab_size"],
                             meta["model"]["d_model"])
    onnx.save(model, str(tmp / ROWS_FILE))
    write_json_atomic(tmp / ROWS_SIDECAR, {"schema": ROWS_SCHEMA, "file": ROWS_FILE, "head_stripped_from":
                                           str(parent_rows), "parity_fp32": read_json(parent_rows / ROWS_SIDECAR)
                                           .get("parity_fp32")})


def ensure_rows(directory: Path | str, bundle) -> Path:
    """The `decoder_rows` graph of an ONNX directory (fp32 or dynamic int8; for a shortlisted one, its parent's
    without the head), built when missing or stale."""
    directory = Path(directory)
    meta = read_sidecar(directory)
    why = _supported(meta)
    if why is not None:
        raise ValueError(f"no continuous batching for {directory.name}: {why}")
    if meta.get("shortlist"):
        parent_rows = ensure_rows(meta["shortlist"]["parent"], bundle)
        recipe = {"parent_sidecar_sha256": sidecar_digest(directory),
                  "parent_rows_sha256": digest(parent_rows / ROWS_SIDECAR), "graph": "decoder_rows-sl/1"}
        return ensure(rows_dir(directory), ROWS_SIDECAR, recipe, lambda tmp: strip_rows(parent_rows, meta, tmp),
                      valid=lambda out: (out / ROWS_FILE).exists() and read_json(out / ROWS_SIDECAR) is not None)
    recipe = {"parent_sidecar_sha256": sidecar_digest(directory), "quantization": meta.get("quantization"),
              "graph": "decoder_rows/1"}
    return ensure(rows_dir(directory), ROWS_SIDECAR, recipe, lambda tmp: write_rows(bundle.model, meta, tmp),
                  valid=lambda out: (out / ROWS_FILE).exists() and read_json(out / ROWS_SIDECAR) is not None)


def rows_parity(model, path: Path, seeds: tuple[int, ...] = (0, 1)) -> dict:
    """Max |ORT - PyTorch| over the outputs of the rows graph on random inputs with left padding."""
    session = load_session(path, 1, "all")
    names = [i.name for i in session.get_inputs()]
    module = DecoderRowsGraph(model).eval()
    worst = 0.0
    for seed in seeds:
        args = example_inputs("decoder_rows", model, batch=3, source=6, past=4, seed=seed)
        with torch.inference_mode():
            want = module(*args)
        got = session.run(None, {n: a.numpy() for n, a in zip(names, args)})
        worst = max(worst, max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want)))
    return {"passed": worst <= PARITY_ATOL, "max_abs_diff": worst,
            "detail": f"max |ORT - PyTorch| {worst:.2e} (limit {PARITY_ATOL:g})"}


# --------------------------------------------------------------------------- the gate


def batch1_reference(stepper: Stepper, rows: list[list[int]], cfg: DecodeConfig) -> list[list[int]]:
    """Each sentence decoded alone (batch 1) with the static greedy loop."""
    out = []
    for r in rows:
        ids = torch.tensor([r], dtype=torch.long)
        out.append(greedy(stepper, ids, torch.ones_like(ids), cfg)[0])
    return out


def identity_gate(row_stepper, reference: list[list[int]] | Stepper, rows: list[list[int]],
                  cfg: DecodeConfig | None = None, max_rows: int = 8, every: int = 2, seed: int = 0) -> dict:
    """Continuous batching with staggered arrivals must give every sentence its batch-1 tokens.

    `reference` is the batch-1 outputs or a Stepper to compute them with. The dict says how many
    sentences were identical, the first that was not, and the useful work of the run.
    """
    cfg = cfg or DecodeConfig()
    want = reference if isinstance(reference, list) else batch1_reference(reference, rows, cfg)
    decoder = ContinuousDecoder(row_stepper, cfg, max_rows)
    arrivals = staggered_arrivals(len(rows), every, seed)
    got = run_staggered(decoder, rows, arrivals)
    same = [g == w for g, w in zip(got, want)]
    first = next((i for i, s in enumerate(same) if not s), None)
    c = decoder.counters
    detail = f"{sum(same)}/{len(rows)} sentences identical to their batch-1 decode"
    if first is not None:
        detail += f"; first difference: sentence {first}"
    return {"passed": all(same), "identical": sum(same), "sentences": len(rows), "first_difference": first,
            "max_rows": max_rows, "mean_rows": c.row_steps / max(c.steps, 1), "steps": c.steps, "detail": detail,
            "outputs": got}
