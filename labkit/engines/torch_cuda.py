"""The torch GPU rung, no TensorRT needed: fp32 eager -> fp16 -> fp16 with a static cache replayed as a CUDA graph.

    stepper = rung_stepper(model, "torch-fp16-cudagraph", capacity=41)   # on CUDA device 0
    Translator(bundle, stepper, cfg).translate(["我喜欢猫。"])            # the one decoding loop

At batch 1 a GPU decode is launch-bound: each token is a few hundred small kernels, each launched by
Python. A CUDA graph records one decode step's kernels once and replays them with one launch, which
needs every tensor of the step at a fixed address and shape. `StaticStep` is Marian's decoder for one
new token written that way: self-attention K/V in buffers of `capacity` positions written in place at
`pos` (a device tensor, so the step never changes shape), attention over all of them with the unfilled
ones masked, cross-attention K/V computed once per source. The same module runs eagerly on the CPU,
which is how its arithmetic is tested against Hugging Face's decoder here.

Variants (RUNG, in order): torch-fp32-eager and torch-fp16-eager (Hugging Face's decoder with its
growing cache, inputs moved to the device), torch-fp16-cudagraph (StaticStep captured once per batch
shape, replayed every step). Every variant returns fp32 logits on the CPU to the decoding loop. Timing
uses CUDA events (`cuda_times`). Left out: torch.compile (its first compile takes minutes here), batch
shapes bucketed for graph reuse, and sampling.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from labkit.core.decode import TorchState, TorchStepper, cache_kwargs
from labkit.engines.onnx_graphs import attend, feed_forward, last_logits, project_kv, split_heads

RUNG = ("torch-fp32-eager", "torch-fp16-eager", "torch-fp16-cudagraph")
NEEDS_CUDA = {"torch-fp16-eager", "torch-fp16-cudagraph"}  # fp16 matmuls on a CPU are slow or missing
WARMUP_STEPS = 2  # eager runs on a side stream before capture, as torch.cuda.graphs requires


# --------------------------------------------------------------------------- eager, on a device


class DeviceStepper(TorchStepper):
    """TorchStepper on any device: inputs move to the model's device, logits come back as fp32 on the CPU."""

    def __init__(self, model):
        super().__init__(model, cache="dynamic")
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TorchState:
        return super().encode(input_ids.to(self.device), attention_mask.to(self.device))

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, state: TorchState) -> tuple[torch.Tensor, TorchState]:
        from transformers.modeling_outputs import BaseModelOutput

        pos = tokens.shape[1] - 1
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=state.encoder_out),
                         attention_mask=state.mask, decoder_input_ids=tokens[:, -1:].to(self.device),
                         **cache_kwargs(self.model, state.cache), use_cache=True,
                         cache_position=torch.tensor([pos], device=self.device))
        return out.logits[:, -1].float().cpu(), state

    def select(self, state: TorchState, index: torch.Tensor) -> TorchState:
        return super().select(state, index.to(self.device))


# --------------------------------------------------------------------------- the static step


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1/True = attend, 0/False = hide -> 0 / the dtype's most negative value (fp16: -65504, never -inf,
    so a row never becomes all -inf and NaN): [[1, 0]] -> [[0, -65504]] in fp16."""
    return (~keep.bool()).to(dtype) * torch.finfo(dtype).min


class StaticStep:
    """One decoder step of a Marian model at position `self.pos`, over fixed-size buffers (call it).

    Inputs are written into `token` (rows, 1) and `pos` (1,) before calling; the output is logits
    (rows, vocab). Nothing allocated by a call outlives it, so a CUDA graph of one call replays any step.
    Unfilled cache positions hold zeros, not garbage: they are masked, and 0 x a masked probability is
    0, while NaN x 0 would be NaN.
    """

    def __init__(self, model: nn.Module, encoder_out: torch.Tensor, mask: torch.Tensor, capacity: int):
        self.model = model
        decoder = model.model.decoder
        rows, dtype, device = encoder_out.shape[0], encoder_out.dtype, encoder_out.device
        self.capacity = capacity
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.cross = [project_kv(layer.encoder_attn, encoder_out) for layer in decoder.layers]
        self.cross_bias = additive_mask(mask[:, None, None, :], dtype)
        self.k = [encoder_out.new_zeros(rows, layer.self_attn.k_proj.out_features // layer.self_attn.head_dim,
                                        capacity, layer.self_attn.head_dim) for layer in decoder.layers]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.slots = torch.arange(capacity, device=device)

    def __call__(self) -> torch.Tensor:
        decoder = self.model.model.decoder
        x = decoder.embed_tokens(self.token) * decoder.embed_scale + decoder.embed_positions.weight[self.pos]
        bias = additive_mask(self.slots <= self.pos, x.dtype)  # (capacity,): positions written so far
        for i, layer in enumerate(decoder.layers):
            attn = layer.self_attn
            k, v = project_kv(attn, x)
            self.k[i].index_copy_(2, self.pos, k)  # in place, at a device-side position: capturable
            self.v[i].index_copy_(2, self.pos, v)
            q = split_heads(attn.q_proj(x), attn.head_dim)
            x = layer.self_attn_layer_norm(x + attend(attn, q, self.k[i], self.v[i], bias))
            cross = layer.encoder_attn
            q = split_heads(cross.q_proj(x), cross.head_dim)
            x = layer.encoder_attn_layer_norm(x + attend(cross, q, *self.cross[i], self.cross_bias))
            x = feed_forward(layer, x)
        return last_logits(self.model, x)

    def reorder(self, index: torch.Tensor, same_sources: bool) -> None:
        """Beam reorder in place (same buffers, so a captured graph stays valid)."""
        for buffers in (self.k, self.v):
            for t in buffers:
                t.copy_(t.index_select(0, index))
        if not same_sources:
            for k, v in self.cross:
                k.copy_(k.index_select(0, index))
                v.copy_(v.index_select(0, index))
            self.cross_bias.copy_(self.cross_bias.index_select(0, index))


@dataclass
class StaticState:
    step: StaticStep
    sources: torch.Tensor  # source row of each row (CPU)
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    logits: torch.Tensor | None = None  # the captured graph's output buffer
    extra: dict = field(default_factory=dict)


class GraphStepper:
    """Stepper over StaticStep: eager anywhere, replayed as one CUDA graph per batch shape with `graphs`."""

    def __init__(self, model: nn.Module, capacity: int, graphs: bool = True):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.graphs = graphs and self.device.type == "cuda"
        self.capacity = capacity
        cfg = model.config
        self.start_id, self.eos_id, self.pad_id = cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> StaticState:
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
        encoder_out = self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        return StaticState(StaticStep(self.model, encoder_out, mask, self.capacity), torch.arange(len(ids)))

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, state: StaticState) -> tuple[torch.Tensor, StaticState]:
        pos = tokens.shape[1] - 1
        if pos >= self.capacity:
            raise ValueError(f"static cache capacity {self.capacity} exceeded at position {pos}")
        state.step.token.copy_(tokens[:, -1:])
        state.step.pos.fill_(pos)
        if not self.graphs:
            return state.step().float().cpu(), state
        if state.graph is None:
            state.graph, state.logits = capture(state.step)
        state.graph.replay()
        return state.logits.float().cpu(), state

    @torch.inference_mode()
    def select(self, state: StaticState, index: torch.Tensor) -> StaticState:
        rows = len(state.sources)
        if len(index) == rows and torch.equal(index, torch.arange(rows)):
            return state
        sources = state.sources[index]
        if len(index) == rows:
            state.step.reorder(index.to(self.device), torch.equal(sources, state.sources))
            return StaticState(state.step, sources, state.graph, state.logits)
        return StaticState(_resized(state.step, index.to(self.device)), sources)


def _resized(step: StaticStep, index: torch.Tensor) -> StaticStep:
    """A StaticStep with rows `index` of `step` (beam expansion changes the row count: new buffers)."""
    new = copy.copy(step)
    new.token = step.token.index_select(0, index)
    new.pos = step.pos.clone()
    new.cross = [(k.index_select(0, index), v.index_select(0, index)) for k, v in step.cross]
    new.cross_bias = step.cross_bias.index_select(0, index)
    new.k = [t.index_select(0, index) for t in step.k]
    new.v = [t.index_select(0, index) for t in step.v]
    return new


def capture(step: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """Record one call of `step` as a CUDA graph after WARMUP_STEPS eager calls on a side stream.

    The warm-up calls write the current position's K/V, which the replay then writes again, identically.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


# --------------------------------------------------------------------------- the rung


def rung_model(model: nn.Module, variant: str, device: str) -> nn.Module:
    """A copy of `model` on `device` in the variant's dtype (fp16 variants: half precision)."""
    if variant not in RUNG:
        raise ValueError(f"unknown rung variant {variant!r}; known: {RUNG}")
    dtype = torch.float16 if "fp16" in variant else torch.float32
    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()


def rung_stepper(model: nn.Module, variant: str, capacity: int, graphs: bool = True):
    """The stepper of one rung variant over a model already placed by `rung_model`."""
    if variant.endswith("cudagraph"):
        return GraphStepper(model, capacity, graphs=graphs)
    return DeviceStepper(model)


def cuda_times(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` calls of `fn`, timed with CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times
