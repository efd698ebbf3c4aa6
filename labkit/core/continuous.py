"""Continuous (iteration-level) batching: sentences join and leave the running batch at every decode step.

    decoder = ContinuousDecoder(TorchRowStepper(model), DecodeConfig(max_new_tokens=64), max_rows=16)
    decoder.add("a", [52, 7, 0])                 # source ids of one sentence, under any key
    while decoder.busy:
        for key, ids in decoder.step():          # sentences that ended at this step, at once
            ...
    decoder.add("b", [9, 0])                     # may come at any time, even mid-decode

A static batch decodes until its longest sentence ends: rows that finished keep being computed
(padding), and a sentence that arrives meanwhile waits for the whole batch. Here every step first
admits waiting sentences (their encoder and first decoder step run as a small batch of their own, so
their cross-attention K/V and self-attention cache exist), merges them into the running batch, then
runs one decoder step for every running row; a row that emits </s> (or reaches the length limit)
leaves with its answer. Rows sit at different positions, so each carries its own position and the
self-attention cache is left-padded to a common length with a mask (`RowState`); trimming drops the
columns no remaining row uses. With exact arithmetic every sentence gets the tokens of its batch-1
greedy decode; `identity_gate` checks that on a backend with staggered arrivals.

A backend is a `RowStepper` (labkit.engines.rows: PyTorch and ONNX Runtime). Left out: beam
search (its rows are not independent: a finished beam does not free a slot), sampling, paged
caches (the cache here is re-packed on merge and trim, which is cheap next to a decoder step on CPU).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from labkit.core.decode import DecodeConfig, constrain


@dataclass
class RowState:
    """What the running rows carry between steps; every tensor has one row per sentence.

    lengths (B,) tokens already fed per row (start token included), i.e. the position of the next token.
    self_mask (B, L): 1 where the left-padded self-attention cache holds a real position.
    past: self-attention K/V per layer (k0, v0, k1, v1, ...), each (B, H_i, L, d).
    cross: cross-attention K/V per layer, each (B, H_i, S, d); cross_mask (B, S) marks real source tokens.
    allowed (B, V) bool: the tokens each row may emit (its own shortlist candidates), or None: every token.
    """

    lengths: torch.Tensor
    self_mask: torch.Tensor
    past: list[torch.Tensor]
    cross: list[torch.Tensor]
    cross_mask: torch.Tensor
    allowed: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])


class RowStepper(Protocol):
    start_id: int
    eos_id: int
    pad_id: int

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, RowState]:
        """Encode new sentences and run their first decoder step -> (logits (B, V), state with lengths 1)."""

    def step(self, tokens: torch.Tensor, state: RowState) -> tuple[torch.Tensor, RowState]:
        """tokens (B,): each row's last token, fed at position state.lengths -> (logits, state one longer)."""


# --------------------------------------------------------------------------- cache bookkeeping


def _pad_dim(t: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    """Zeros added along `dim`: (2, 3) padded on dim 1 by (1, 0) -> (2, 4)."""
    if before == 0 and after == 0:
        return t
    parts = []
    for n in (before, after):
        shape = list(t.shape)
        shape[dim] = n
        parts.append(t.new_zeros(shape))
    return torch.cat([parts[0], t, parts[1]], dim=dim)


def merge_rows(a: RowState | None, b: RowState) -> RowState:
    """Rows of `a` then rows of `b`; self caches left-padded and sources right-padded to common lengths."""
    if a is None or a.rows == 0:
        return b
    la, lb = a.self_mask.shape[1], b.self_mask.shape[1]
    sa, sb = a.cross_mask.shape[1], b.cross_mask.shape[1]
    L, S = max(la, lb), max(sa, sb)
    past = [torch.cat([_pad_dim(x, 2, L - la, 0), _pad_dim(y, 2, L - lb, 0)]) for x, y in zip(a.past, b.past)]
    cross = [torch.cat([_pad_dim(x, 2, 0, S - sa), _pad_dim(y, 2, 0, S - sb)]) for x, y in zip(a.cross, b.cross)]
    if (a.allowed is None) != (b.allowed is None):
        raise ValueError("rows with and without a shortlist cannot share a batch")
    return RowState(torch.cat([a.lengths, b.lengths]),
                    torch.cat([_pad_dim(a.self_mask, 1, L - la, 0), _pad_dim(b.self_mask, 1, L - lb, 0)]),
                    past, cross,
                    torch.cat([_pad_dim(a.cross_mask, 1, 0, S - sa), _pad_dim(b.cross_mask, 1, 0, S - sb)]),
                    None if a.allowed is None else torch.cat([a.allowed, b.allowed]))


def keep_rows(state: RowState, index: torch.Tensor) -> RowState:
    """Rows `index`, with the cache columns and source positions no kept row uses trimmed away."""
    mask = state.self_mask.index_select(0, index)
    used = mask.any(0).nonzero()
    first = int(used[0]) if len(used) else mask.shape[1]
    src = state.cross_mask.index_select(0, index)
    used_src = src.any(0).nonzero()
    last = int(used_src[-1]) + 1 if len(used_src) else 0
    return RowState(state.lengths.index_select(0, index), mask[:, first:],
                    [p.index_select(0, index)[:, :, first:] for p in state.past],
                    [c.index_select(0, index)[:, :, :last] for c in state.cross], src[:, :last],
                    None if state.allowed is None else state.allowed.index_select(0, index))


def pad_sources(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask: [[5, 6, 0], [7, 0]] -> ids [[5, 6, 0], [7, 0, pad]], mask [[1, 1, 1], [1, 1, 0]]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


# --------------------------------------------------------------------------- the scheduler


@dataclass
class _Row:
    key: Hashable
    out: list[int] = field(default_factory=list)


@dataclass
class Counters:
    """Decoder work done: every running row is a useful step (finished rows leave at once)."""

    steps: int = 0  # decoder calls over the running batch (admissions' first steps included)
    row_steps: int = 0  # rows computed, summed over calls
    admitted: int = 0
    finished: int = 0
    last_calls: list[int] = field(default_factory=list)  # rows of each decoder call of the latest step


class ContinuousDecoder:
    """Greedy decoding of a changing set of sentences; see the module docstring."""

    def __init__(self, stepper: RowStepper, cfg: DecodeConfig | None = None, max_rows: int = 16,
                 admit_min: int | None = None):
        cfg = cfg or DecodeConfig()
        if cfg.num_beams != 1:
            raise ValueError("continuous batching decodes greedily (num_beams=1); use static batching for beams")
        if cfg.forced_length is not None:
            raise ValueError("continuous batching ends rows at </s>; forced_length is for static speed runs")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.stepper, self.cfg, self.max_rows = stepper, cfg, max_rows
        # An admission is a model call of its own (encoder + first step): under a long queue, wait until this
        # many rows are free rather than admitting one or two at every step (measured: at 32 clients the
        # one-by-one admissions made continuous batching slower than static). An idle or light load
        # (fewer waiting than this) is admitted at once.
        self.admit_min = admit_min if admit_min is not None else max(1, max_rows // 4)
        self.waiting: deque[tuple[Hashable, list[int]]] = deque()
        self.running: list[_Row] = []
        self.state: RowState | None = None
        self.last = torch.empty(0, dtype=torch.long)  # (B,) each running row's last token
        self.counters = Counters()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, key: Hashable, ids: list[int]) -> None:
        if not ids:
            raise ValueError(f"sentence {key!r} has no source ids (it needs at least </s>)")
        self.waiting.append((key, list(ids)))

    @torch.inference_mode()
    def step(self) -> list[tuple[Hashable, list[int]]]:
        """Advance every running row by one token, then admit what fits; the sentences that ended."""
        finished = []
        self.counters.last_calls = []
        if self.running:
            logits, state = self.stepper.step(self.last, self.state)
            self._count(state.rows)
            nxt = self._choose(logits, state.lengths - 1)
            keep, finished = self._settle(self.running, nxt)
            if len(keep) == len(self.running):  # nobody left: no copy
                self.state, self.last = state, nxt
            else:
                index = torch.tensor(keep, dtype=torch.long)
                self.state = keep_rows(state, index) if keep else None
                self.running = [self.running[i] for i in keep]
                self.last = nxt[index]
        return finished + self._admit()

    def _admit(self) -> list[tuple[Hashable, list[int]]]:
        """Encode and start the waiting sentences that fit; their first tokens are chosen here, and from
        the next step on they run with the others (appended after the rows already running)."""
        room = self.max_rows - len(self.running)
        if room <= 0 or not self.waiting:
            return []
        if self.running and room < min(self.admit_min, len(self.waiting)):
            return []
        batch = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        ids, mask = pad_sources([ids for _, ids in batch], self.stepper.pad_id)
        logits, fresh = self.stepper.start(ids, mask)
        self._count(fresh.rows)
        self.counters.admitted += len(batch)
        rows = [_Row(key) for key, _ in batch]
        nxt = self._choose(logits, fresh.lengths - 1)
        keep, finished = self._settle(rows, nxt)
        if keep:
            index = torch.tensor(keep, dtype=torch.long)
            self.state = merge_rows(self.state, keep_rows(fresh, index))
            self.running += [rows[i] for i in keep]
            self.last = torch.cat([self.last, nxt[index]])
        return finished

    def _choose(self, logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """Greedy choice under Marian's constraints (decode.constrain, per row); `generated` counts the tokens
        each row produced before this one. The logits are the stepper's fresh output, changed in place."""
        return constrain(logits.float(), self.stepper, generated + 1, self.cfg).argmax(-1)

    def _settle(self, rows: list[_Row], nxt: torch.Tensor) -> tuple[list[int], list[tuple[Hashable, list[int]]]]:
        keep, finished = [], []
        for i, (row, token) in enumerate(zip(rows, nxt.tolist())):
            if token == self.stepper.eos_id:
                finished.append((row.key, row.out))
            else:
                row.out.append(token)
                keep.append(i)
        self.counters.finished += len(finished)
        return keep, finished

    def _count(self, rows: int) -> None:
        self.counters.steps += 1
        self.counters.row_steps += rows
        self.counters.last_calls.append(rows)


def run_staggered(decoder: ContinuousDecoder, rows: list[list[int]], arrivals: list[int]) -> list[list[int]]:
    """Decode `rows`, sentence i joining at step arrivals[i]; outputs in input order.

    run_staggered(d, [[5, 0], [6, 0]], [0, 3]) adds the second sentence while the first is 3 tokens in.
    """
    if len(rows) != len(arrivals):
        raise ValueError(f"{len(rows)} rows but {len(arrivals)} arrival steps")
    order = sorted(range(len(rows)), key=lambda i: arrivals[i])
    out: dict[int, list[int]] = {}
    step, nxt = 0, 0
    while len(out) < len(rows):
        while nxt < len(order) and (arrivals[order[nxt]] <= step or not decoder.busy):
            decoder.add(order[nxt], rows[order[nxt]])
            nxt += 1
        out.update(decoder.step())
        step += 1
    return [out[i] for i in range(len(rows))]


def staggered_arrivals(n: int, every: int = 2, seed: int = 0) -> list[int]:
    """Arrival steps for n sentences: about one every `every` steps, jittered, reproducible."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.randint(0, 2 * every + 1, (n,), generator=g)
    return torch.cumsum(gaps, 0).sub(gaps[0]).tolist()
