"""One decoding loop, greedy and beam, for every backend.

A backend only has to be a `Stepper`: encode the source once, then turn the
token prefix into next-token logits, keeping whatever cache it likes in the
state it returns. The loops here reproduce Hugging Face `generate` token for
token (greedy, and beam search with its length penalty and stopping rule), which
the tests check; so any backend that matches PyTorch logits matches `generate`.

    stepper = TorchStepper(model, cache="dynamic")
    ids = greedy(stepper, input_ids, attention_mask, max_new_tokens=64)

Cache modes of the PyTorch stepper: "none" recomputes the whole prefix at every
step (O(n) per token), "dynamic" grows a KV cache. Left out: sampling, and constraints other than Marian's
(never emit <pad>; end with </s> at the length limit).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

NEG_INF = -1.0e9  # what HF uses for "impossible" beam scores


@functools.cache
def _cache_argument(model_class: type) -> str:
    forward = inspect.signature(model_class.forward).parameters  # follows the deprecation wrappers
    return "cache" if "cache" in forward else "past_key_values"


def cache_kwargs(model, cache) -> dict[str, Any]:
    """The KV cache under the keyword this transformers takes: `cache` where the model has it
    (`past_key_values` is deprecated there, to be removed in 5.40), else `past_key_values`."""
    return {_cache_argument(type(model)): cache}


def output_cache(out) -> Any:
    """The KV cache a forward returned, read without the deprecated `past_key_values` alias."""
    return out["cache"] if "cache" in out else out["past_key_values"]


@dataclass
class DecodeConfig:
    max_new_tokens: int = 64
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    forced_length: int | None = None  # emit exactly this many tokens, never </s> (speed runs)
    # beam stopping bound: "running" (transformers 5: the best running beam) or "candidates" (transformers
    # 4.x and ONNX Runtime's BeamSearch operator: the best of the step's 2K candidates, </s> ones included)
    stop_rule: str = "running"


class Stepper(Protocol):
    """What a backend provides to the decoding loops."""

    start_id: int  # decoder start token (Marian: <pad>)
    eos_id: int
    pad_id: int

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any: ...

    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """tokens: (rows, t) full prefix -> (logits (rows, vocab) for position t, new state)."""

    def select(self, state: Any, index: torch.Tensor) -> Any:
        """Keep/reorder/repeat batch rows of the state (beam expansion and reordering)."""


# --------------------------------------------------------------------------- torch backend


@dataclass
class TorchState:
    encoder_out: torch.Tensor
    mask: torch.Tensor
    cache: Any = None
    extra: dict = field(default_factory=dict)


class TorchStepper:
    """A MarianMTModel behind the Stepper interface."""

    MODES = ("none", "dynamic")

    def __init__(self, model, cache: str = "dynamic"):
        if cache not in self.MODES:
            raise ValueError(f"cache must be one of {self.MODES}, got {cache!r}")
        self.model = model.eval()
        self.cache_mode = cache
        cfg = model.config
        self.start_id = cfg.decoder_start_token_id
        self.eos_id = cfg.eos_token_id
        self.pad_id = cfg.pad_token_id

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TorchState:
        out = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
        return TorchState(out.last_hidden_state, attention_mask, self._new_cache())

    def _new_cache(self):
        from transformers import DynamicCache, EncoderDecoderCache

        if self.cache_mode == "none":
            return None
        return EncoderDecoderCache(DynamicCache(), DynamicCache())

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, state: TorchState) -> tuple[torch.Tensor, TorchState]:
        from transformers.modeling_outputs import BaseModelOutput

        enc = BaseModelOutput(last_hidden_state=state.encoder_out)
        if state.cache is None:
            out = self.model(encoder_outputs=enc, attention_mask=state.mask,
                             decoder_input_ids=tokens, use_cache=False)
        else:
            pos = tokens.shape[1] - 1
            out = self.model(encoder_outputs=enc, attention_mask=state.mask,
                             decoder_input_ids=tokens[:, -1:], **cache_kwargs(self.model, state.cache),
                             use_cache=True, cache_position=torch.tensor([pos]))
        return out.logits[:, -1].float(), state

    def select(self, state: TorchState, index: torch.Tensor) -> TorchState:
        if state.cache is not None:
            state.cache.reorder_cache(index)
        return TorchState(state.encoder_out.index_select(0, index), state.mask.index_select(0, index),
                          state.cache, state.extra)


# --------------------------------------------------------------------------- logits processing


def constrain(logits: torch.Tensor, stepper: Stepper, cur_len: int | torch.Tensor, cfg: DecodeConfig) -> torch.Tensor:
    """Marian's generate constraints, in place: never <pad>; </s> forced at the limit.

    cur_len counts the decoder start token, as HF does: the first step has cur_len 1. One int for
    every row, or a (rows,) tensor when rows are at different lengths (labkit.core.continuous).
    With `forced_length`, </s> is banned so every row runs the full length.
    """
    logits[:, stepper.pad_id] = -float("inf")
    if cfg.forced_length is not None:
        logits[:, stepper.eos_id] = -float("inf")
        return logits
    at_limit = cur_len == cfg.max_new_tokens  # HF ForcedEOS: cur_len == max_length - 1
    rows = at_limit if isinstance(at_limit, torch.Tensor) else slice(None) if at_limit else None
    if rows is not None:
        logits[rows] = -float("inf")
        logits[rows, stepper.eos_id] = 0.0
    return logits


def _limit(cfg: DecodeConfig) -> int:
    return cfg.forced_length if cfg.forced_length is not None else cfg.max_new_tokens


# --------------------------------------------------------------------------- greedy


@torch.inference_mode()
def greedy(stepper: Stepper, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           cfg: DecodeConfig | None = None, state: Any = None) -> list[list[int]]:
    """Greedy decoding; returns the generated ids per row, without start token and </s>.

    Rows that finished keep receiving <pad> (as in generate) until all are done.
    """
    cfg = cfg or DecodeConfig()
    state = stepper.encode(input_ids, attention_mask) if state is None else state
    rows = input_ids.shape[0]
    tokens = torch.full((rows, 1), stepper.start_id, dtype=torch.long)
    done = torch.zeros(rows, dtype=torch.bool)
    for t in range(_limit(cfg)):
        logits, state = stepper.step(tokens, state)
        nxt = constrain(logits, stepper, t + 1, cfg).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, stepper.pad_id), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= nxt == stepper.eos_id
        if bool(done.all()):
            break
    return [strip(row, stepper) for row in tokens[:, 1:].tolist()]


def strip(ids: list[int], stepper: Stepper) -> list[int]:
    """Cut at the first </s> and drop padding: [5, 7, eos, pad] -> [5, 7]."""
    out = []
    for i in ids:
        if i == stepper.eos_id:
            break
        if i != stepper.pad_id:
            out.append(i)
    return out


# --------------------------------------------------------------------------- beam search


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B, K, ...) gathered along dim 1 by idx (B, J) -> (B, J, ...)."""
    view = idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:])
    return torch.gather(t, 1, view)


@torch.inference_mode()
def beam_search(stepper: Stepper, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                cfg: DecodeConfig, state: Any = None) -> list[list[int]]:
    """Beam search with HF generate's exact bookkeeping (transformers 5 `_beam_search`).

    Keeps 2K candidates per step so K beams stay alive after some hit </s>;
    finished hypotheses are scored sum(logprob) / generated_len ** length_penalty;
    decoding stops when no running beam can beat the worst finished one (cfg.stop_rule="candidates":
    when the step's best candidate cannot, as transformers 4.x and ONNX Runtime's BeamSearch decide).
    """
    B, K = input_ids.shape[0], cfg.num_beams
    if cfg.stop_rule not in ("running", "candidates"):
        raise ValueError(f"stop_rule must be 'running' or 'candidates', got {cfg.stop_rule!r}")
    limit = _limit(cfg)
    max_len = limit + 1  # + decoder start token
    state = stepper.encode(input_ids, attention_mask) if state is None else state
    state = stepper.select(state, torch.arange(B).repeat_interleave(K))
    seqs = torch.full((B, K, max_len), stepper.pad_id, dtype=torch.long)
    seqs[:, :, 0] = stepper.start_id
    run_scores = torch.zeros(B, K)
    run_scores[:, 1:] = NEG_INF
    fin_seqs, fin_scores = seqs.clone(), torch.full((B, K), NEG_INF)
    fin_flags = torch.zeros(B, K, dtype=torch.bool)
    improvable = torch.ones(B, 1, dtype=torch.bool)
    top_mask = torch.arange(2 * K) < K
    cur_len = 1
    while True:
        logits, state = stepper.step(seqs.view(B * K, max_len)[:, :cur_len], state)
        logp = torch.log_softmax(logits.float(), dim=-1)
        logp = constrain(logp, stepper, cur_len, cfg)
        vocab = logp.shape[-1]
        acc = (logp.view(B, K, vocab) + run_scores[:, :, None]).view(B, K * vocab)
        top_scores, top_idx = torch.topk(acc, 2 * K)
        origin, token = top_idx // vocab, top_idx % vocab
        cand = _gather(seqs, origin)
        cand[:, :, cur_len] = token
        hits = (token == stepper.eos_id) | (cur_len + 1 >= max_len)
        if cfg.forced_length is not None:
            hits = torch.full_like(hits, cur_len + 1 >= max_len)

        alive = torch.topk(top_scores + hits.float() * NEG_INF, K)[1]
        seqs, run_scores = _gather(cand, alive), _gather(top_scores, alive)
        beam_origin = _gather(origin, alive)

        just_done = hits & top_mask[None, :]
        norm = top_scores / (cur_len ** cfg.length_penalty)
        if cfg.early_stopping:
            norm = norm + (fin_flags.all(-1, keepdim=True)).float() * NEG_INF
        norm = norm + (~improvable).float() * NEG_INF + (~just_done).float() * NEG_INF
        merged_scores = torch.cat([fin_scores, norm], 1)
        keep = torch.topk(merged_scores, K)[1]
        fin_seqs = _gather(torch.cat([fin_seqs, cand], 1), keep)
        fin_scores = _gather(merged_scores, keep)
        fin_flags = _gather(torch.cat([fin_flags, just_done], 1), keep)

        flat_origin = (beam_origin + torch.arange(B)[:, None] * K).view(-1)
        state = stepper.select(state, flat_origin)
        cur_len += 1
        best = run_scores[:, :1] if cfg.stop_rule == "running" else top_scores.max(1, keepdim=True)[0]
        best_running = best / ((cur_len - 1) ** cfg.length_penalty)
        worst_done = torch.where(fin_flags, fin_scores.min(1, keepdim=True)[0], torch.full_like(fin_scores, NEG_INF))
        improvable = improvable & (best_running > worst_done).any(-1, keepdim=True)
        all_full = bool(fin_flags.all()) and cfg.early_stopping
        if not bool(improvable.any()) or all_full or bool(hits.all()):
            break
    return [strip(row, stepper) for row in fin_seqs[:, 0, 1:].tolist()]


def decode(stepper: Stepper, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           cfg: DecodeConfig | None = None, state: Any = None) -> list[list[int]]:
    """Greedy when num_beams == 1, else beam search; `state` skips encoding (already done)."""
    cfg = cfg or DecodeConfig()
    if cfg.num_beams == 1:
        return greedy(stepper, input_ids, attention_mask, cfg, state)
    return beam_search(stepper, input_ids, attention_mask, cfg, state)
