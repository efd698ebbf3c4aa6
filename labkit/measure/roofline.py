"""The memory-bandwidth limit of greedy decoding: bytes of weights per token against what the machine streams.

    bw = bandwidth(threads=2)                        # Bandwidth(median_gbps≈36, spread, threads=2) on this machine
    sb = step_bytes("artifacts/opus-mt-shape/onnx-teacher-int8-dynamic")   # what one decode step reads
    sb.mb, sb.by_part()["lm_head"]                   # MB/token, and the LM head's share in bytes
    limit(sb.total, bw.median_gbps, measured_ms=3.0) # {"bound_ms": 1.5, "achieved_gbps": 18.0, "pct_of_limit": 50.0}

At batch 1 every decode step multiplies one row vector by every weight matrix the step uses, so
each step streams those weights from memory once (they do not fit in cache: the opus-mt shape's
LM head alone is 512 x 65 001). The fastest a step can be is bytes / bandwidth: `limit` turns a
measured ms/token into achieved GB/s and % of that bound. A variant *below* its bound means the
bytes were miscounted (or the weights stayed in cache), never that it beat physics.

What is counted (`StepBytes`), from what a variant actually runs, never from its name:
- ONNX (`onnx_step_bytes`): the initializers of the decoder-with-past graph (the graph that runs
  every step after the first), at their stored dtype (fp32 4 bytes, int8/uint8 1 byte, with their
  scales and zero points). An initializer read only by Gather/GatherND (an embedding lookup) costs
  one row per token; one also read by a MatMul/Gemm (a tied LM head) costs its whole size. Parts:
  `layer.i` (name, exporter scope metadata, or the nearest named bias/norm downstream of the weight's
  reader), `lm_head` (named so, or nothing named downstream: the head and its final bias),
  `embeddings` (lookups), `other`. Cross-attention K/V projections are not in that graph (they run
  once per sentence), so they are not counted.
- PyTorch (`torch_step_bytes`): the decoder's parameters and buffers at their dtype, minus the
  cross-attention k/v projections (cached per sentence), embedding tables at one row per token
  unless tied to the LM head (then counted once, whole).
- CTranslate2 (`ct2_step_bytes`): the variables of `model.bin` as stored (its header gives each
  variable's shape, dtype and byte size; the ctranslate2 package has no API for them), decoder only,
  minus `attention/linear_1` (the memory K/V projection, computed once per batch), embeddings and
  position encodings one row per token, aliases (tied weights) not counted twice.

Left out on purpose: the KV cache and activations. At batch 1 and 40 tokens the self-attention
cache of the opus-mt shape is < 1 MB per step (and the cross K/V a few hundred kB) against tens of
MB of weights; activations are one row per layer. Counting them would need the sequence position,
so the bound stays a weights-only lower bound. Also left out: the encoder (it runs once per
sentence), compute limits (at batch 1 these matrix-vector products are far from the FLOP roof), and
caches (a model whose weights fit in L2/L3 is not bandwidth-bound: the ci teacher).

How `bandwidth` measures: `torch.sum` over a 256 MB float32 tensor (too big for any cache) with
`threads` intra-op threads, after warm-up, repeated; GB/s = bytes / time (10^9 bytes), median and
p5-p95 spread, and the share of its threads' CPU time it got: on shared cores (other jobs running)
a read is preempted and the number is the busy machine's, not the memory's; it says so. `bandwidth_in_process` runs it in a child process with the thread env pinned, as the
bench runs its workers (`python -m labkit.measure.roofline --threads N`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit.measure import timing

LOOKUP_OPS = ("Gather", "GatherND")  # read one row of the table per looked-up index
LAYER_RE = re.compile(r"layers?[._/](\d+)")
CT2_CACHED = ("/attention/linear_1/",)  # the memory (cross-attention) K/V projection: once per batch
TORCH_CACHED = ("encoder_attn.k_proj.", "encoder_attn.v_proj.")  # computed once per sentence, then cached
# CTranslate2 model.bin dtype ids (ctranslate2/specs/model_spec.py _dtype_to_type_id, include/ctranslate2/types.h)
CT2_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}


# --------------------------------------------------------------------------- bandwidth


@dataclass(frozen=True)
class Bandwidth:
    """Streaming-read bandwidth samples (GB/s = 10^9 bytes/s) at a thread count."""

    gbps: tuple[float, ...]  # one per timed read of the whole buffer
    threads: int  # intra-op threads while reading
    buffer_mb: float  # size of the buffer read (MB = 2^20 bytes)
    cpu_share: float | None = None  # process CPU time / (wall time x threads) while timed: < ~0.9 = cores shared

    @property
    def median_gbps(self) -> float:
        return timing.percentile(self.gbps, 0.5)

    @property
    def spread(self) -> tuple[float, float]:
        """(p5, p95) of the samples."""
        return timing.percentile(self.gbps, 0.05), timing.percentile(self.gbps, 0.95)

    def as_dict(self) -> dict[str, Any]:
        lo, hi = self.spread
        return {"median_gbps": self.median_gbps, "p5_gbps": lo, "p95_gbps": hi, "n": len(self.gbps),
                "threads": self.threads, "buffer_mb": self.buffer_mb, "cpu_share": self.cpu_share}

    def __str__(self) -> str:
        lo, hi = self.spread
        busy = "" if self.cpu_share is None else f"; it got {100 * self.cpu_share:.0f} % of its {self.threads} threads' CPU"
        if self.cpu_share is not None and self.cpu_share < 0.8:
            busy += ": the cores were shared, so this is a busy machine's bandwidth, not the memory's"
        return (f"memory bandwidth {self.median_gbps:.1f} GB/s (p5-p95 {lo:.1f}-{hi:.1f}, n={len(self.gbps)}, "
                f"{self.threads} threads, torch.sum over {self.buffer_mb:.0f} MB float32{busy})")


def bandwidth(threads: int, buffer_mb: float = 256, warmup: int = 3, repeats: int = 15) -> Bandwidth:
    """Sustainable streaming-read bandwidth with `threads` threads (this process's torch pool, restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(int(buffer_mb * 2**20) // 4, dtype=torch.float32)  # touched: every page is resident
        for _ in range(warmup):
            float(x.sum())
        cpu = time.process_time()
        m = timing.measure(lambda: float(x.sum()), warmup=0, repeats=repeats)
        share = (time.process_time() - cpu) / (sum(m.times_ms) / 1e3 * threads)
    finally:
        torch.set_num_threads(before)
    nbytes = x.numel() * 4
    return Bandwidth(tuple(nbytes / (t / 1e3) / 1e9 for t in m.times_ms), threads, buffer_mb, round(share, 3))


def bandwidth_in_process(threads: int, buffer_mb: float = 256, timeout: float = 300) -> Bandwidth:
    """`bandwidth` in a fresh child process with OMP/MKL threads pinned, like a bench worker."""
    env = dict(os.environ) | {var: str(threads) for var in timing.THREAD_ENV_VARS}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    out = timing.time_command([sys.executable, "-m", "labkit.measure.roofline", "--threads", threads,
                               "--buffer-mb", buffer_mb], timeout=timeout, env=env)
    return Bandwidth(tuple(out["gbps"]), int(out["threads"]), float(out["buffer_mb"]), out.get("cpu_share"))


# --------------------------------------------------------------------------- bytes per decode step


@dataclass(frozen=True)
class StepBytes:
    """Bytes of weights one decode step reads: part (layer.i, lm_head, embeddings, other) -> dtype -> bytes."""

    parts: Mapping[str, Mapping[str, int]]
    source: str  # what was counted, e.g. "onnx decoder_with_past_model.onnx"
    note: str = ""  # how, where it matters (e.g. lookups at one row per token)
    excluded: Mapping[str, int] = field(default_factory=dict)  # name -> bytes deliberately not counted

    @property
    def total(self) -> int:
        return sum(self.by_part().values())

    @property
    def mb(self) -> float:
        return self.total / 1e6

    def by_part(self) -> dict[str, int]:
        return {p: sum(d.values()) for p, d in self.parts.items()}

    def by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for dtypes in self.parts.values():
            for dt, n in dtypes.items():
                out[dt] = out.get(dt, 0) + n
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"bytes": self.total, "by_part": self.by_part(), "by_dtype": self.by_dtype(), "source": self.source}


def _add(parts: dict, part: str, dtype: str, nbytes: int) -> None:
    parts.setdefault(part, {})
    parts[part][dtype] = parts[part].get(dtype, 0) + int(nbytes)


def layer_part(text: str) -> str | None:
    """'model.model.decoder.layers.3.fc1' -> 'layer.3'; 'decoder/layer_0/ffn' -> 'layer.0'; else None."""
    m = LAYER_RE.search(text)
    return f"layer.{int(m.group(1))}" if m else None


def _sort_parts(parts: dict) -> dict:
    """layer.0, layer.1, ..., then lm_head, embeddings, other."""
    def key(p):
        return (0, int(p.split(".")[1])) if p.startswith("layer.") else (1, ("lm_head", "embeddings", "other").index(p))
    return {p: parts[p] for p in sorted(parts, key=key)}


# ONNX ------------------------------------------------------------------------


def _node_text(node, named) -> str:
    """Everything on a node that can name its module: name, exporter scope metadata, initializer inputs.

    `named` holds the initializers whose name may label their reader: ORT's optimizer merges identical
    constants (the all-ones norms of a random-weight model), so a shared 'layers.0...' name says nothing.
    """
    meta = " ".join(p.value for p in node.metadata_props)
    return " ".join([node.name, meta, *(i for i in node.input if i in named)])


def _own_part(node, named) -> str | None:
    """'lm_head' or 'layer.i' when the node's name, scope or (unshared) weights say so, else None."""
    text = _node_text(node, named)
    return "lm_head" if "lm_head" in text else layer_part(text)


def _downstream_part(node, consumers: dict, own: dict, fallback: str, limit: int = 64) -> str:
    """The part of the nearest node downstream of `node` (breadth-first over data edges) that names its own
    part: a layer's MatMul feeds its named bias, norm or residual add. Optimizers reorder nodes, so the
    graph's node order alone does not say which layer a weight belongs to."""
    frontier, seen = [node], {id(node)}
    for _ in range(limit):
        nxt = []
        for n in frontier:
            for c in (c for o in n.output for c in consumers.get(o, []) if id(c) not in seen):
                if own[id(c)]:
                    return own[id(c)]
                seen.add(id(c))
                nxt.append(c)
        if not nxt:
            break
        frontier = nxt
    return fallback


def _final_consumers(name: str, consumers: dict, inits, depth: int = 4) -> list:
    """The nodes that use initializer `name`, looking through constant-only nodes (DequantizeLinear, Transpose
    of a weight) to the op that reads the result: a QDQ weight's real reader is the MatMul after its DQ."""
    out = []
    for node in consumers.get(name, []):
        if depth and all(i in inits or not i for i in node.input):
            out += [c for o in node.output for c in _final_consumers(o, consumers, inits, depth - 1)] or [node]
        else:
            out.append(node)
    return out


def onnx_step_bytes(model, gathered_rows: Mapping[str, int] | None = None, source: str = "onnx") -> StepBytes:
    """Bytes one step of an ONNX graph reads from its initializers (a ModelProto, GraphProto or path).

    Load paths with `load_external_data=False`: sizes come from dims x dtype, not the data. A lookup-only
    initializer costs `gathered_rows.get(name, 1)` rows (a shortlist's gathered LM head: pass its mean size).
    Tiny worked example: W fp32 [4, 8] read by MatMul -> 128 bytes; E fp32 [100, 8] read by Gather -> 32.
    """
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    if isinstance(model, str | Path):
        source = f"{source} {Path(model).name}"
        model = onnx.load(str(model), load_external_data=False)
    graph = getattr(model, "graph", model)
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    named = {i for i in inits if len(consumers.get(i, [])) == 1}
    own = {id(n): _own_part(n, named) for n in graph.node}
    # Weights downstream of no named node come after the last layer: the LM head and its bias.
    fallback = "lm_head" if any(p and p.startswith("layer.") for p in own.values()) else "other"
    parts: dict[str, dict[str, int]] = {}
    for name, init in inits.items():
        dtype = tensor_dtype_to_np_dtype(init.data_type)
        nbytes = math.prod(init.dims) * dtype.itemsize
        readers = _final_consumers(name, consumers, inits)
        if not readers:
            continue  # unused initializer: nothing reads it
        if all(r.op_type in LOOKUP_OPS for r in readers) and init.dims:
            part, nbytes = "embeddings", nbytes // init.dims[0] * (gathered_rows or {}).get(name, 1)
        elif "lm_head" in name:
            part = "lm_head"
        else:
            reader = readers[0]
            part = layer_part(name) or own[id(reader)] or _downstream_part(reader, consumers, own, fallback)
        _add(parts, part, str(dtype), nbytes)
    return StepBytes(_sort_parts(parts), source, "initializers at stored dtype; lookup-only tables one row per token")


def onnx_dir_step_bytes(directory: Path | str, pattern: str = "*with_past*.onnx") -> StepBytes:
    """`onnx_step_bytes` of the decoder-with-past graph in an export directory (the graph every later step runs)."""
    found = sorted(Path(directory).glob(pattern))
    if len(found) != 1:
        raise FileNotFoundError(f"{directory}: expected one {pattern} (the per-step decoder graph), found {found}")
    return onnx_step_bytes(found[0])


# PyTorch ---------------------------------------------------------------------


def torch_step_bytes(model) -> StepBytes:
    """Bytes one cached decode step of a Hugging Face encoder-decoder reads from its decoder's tensors.

    Counts `model.get_decoder()` parameters and buffers, the LM head and `final_logits_bias`, each
    storage once; embedding tables one row per token unless the LM head shares them (then whole).
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    head_ptr = head.weight.data_ptr() if head is not None else None
    lookups = {m.weight.data_ptr() for m in decoder.modules() if isinstance(getattr(m, "embedding_dim", None), int)}
    named = [(f"decoder.{n}", t) for n, t in [*decoder.named_parameters(), *decoder.named_buffers()]]
    named += [(f"lm_head.{n}", t) for n, t in head.named_parameters()] if head is not None else []
    if getattr(model, "final_logits_bias", None) is not None:  # Marian/BART add it to every step's logits
        named.append(("lm_head.final_logits_bias", model.final_logits_bias))
    parts, seen, excluded = {}, set(), {}
    for name, t in named:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        nbytes = t.numel() * t.element_size()
        if any(c in name for c in TORCH_CACHED):
            excluded[name] = nbytes
        elif t.data_ptr() == head_ptr or name.startswith("lm_head."):
            _add(parts, "lm_head", str(t.dtype).removeprefix("torch."), nbytes)
        elif t.data_ptr() in lookups:
            _add(parts, "embeddings", str(t.dtype).removeprefix("torch."), nbytes // t.shape[0])
        else:
            _add(parts, layer_part(name) or "other", str(t.dtype).removeprefix("torch."), nbytes)
    return StepBytes(_sort_parts(parts), "torch decoder", "parameters + buffers; cross-attention k/v cached", excluded)


# CTranslate2 -----------------------------------------------------------------


def _ct2_string(f) -> str:
    (n,) = struct.unpack("<H", f.read(2))
    return f.read(n)[:-1].decode("utf-8")


def ct2_variables(path: Path | str) -> tuple[dict[str, tuple[tuple[int, ...], str, int]], dict[str, str]]:
    """({name: (shape, dtype, bytes)}, {alias: name}) from a CTranslate2 model.bin header (data skipped)."""
    path = Path(path)
    path = path / "model.bin" if path.is_dir() else path
    with open(path, "rb") as f:
        (version,) = struct.unpack("<I", f.read(4))
        if version < 5:
            raise ValueError(f"{path}: CTranslate2 binary version {version} < 5 is not read here; reconvert it")
        _ct2_string(f), f.read(4)  # spec name, revision
        (count,) = struct.unpack("<I", f.read(4))
        variables = {}
        for _ in range(count):
            name = _ct2_string(f)
            (rank,) = struct.unpack("<B", f.read(1))
            shape = struct.unpack(f"<{rank}I", f.read(4 * rank))
            dtype_id, nbytes = struct.unpack("<BI", f.read(5))
            f.seek(nbytes, os.SEEK_CUR)
            variables[name] = (tuple(shape), CT2_DTYPES.get(dtype_id, f"type{dtype_id}"), nbytes)
        (n_alias,) = struct.unpack("<I", f.read(4))
        aliases = {_ct2_string(f): _ct2_string(f) for _ in range(n_alias)}
    return variables, aliases


def ct2_step_bytes(directory: Path | str) -> StepBytes:
    """Bytes one decode step of a CTranslate2 model reads, from its model.bin as stored (see module doc)."""
    variables, aliases = ct2_variables(directory)  # an alias shares its target's storage: counted once
    # A projection aliased to the embeddings (tied weights) reads the whole table, with its scale, every step.
    tied = {target.rsplit("/", 1)[0] + "/" for alias, target in aliases.items() if "/projection" in alias}
    parts, excluded = {}, {}
    for name, (shape, dtype, nbytes) in variables.items():
        if not name.startswith("decoder/"):
            continue
        if any(c in name for c in CT2_CACHED):
            excluded[name] = nbytes
            continue
        if "/projection" in name or any(name.startswith(t) for t in tied):
            part = "lm_head"
        elif "/embeddings" in name or "position_encodings" in name:
            part, nbytes = "embeddings", nbytes // shape[0] if shape else nbytes
        else:
            part = layer_part(name) or "other"
        _add(parts, part, dtype, nbytes)
    return StepBytes(_sort_parts(parts), "ctranslate2 model.bin", "decoder variables as stored; memory K/V cached",
                     excluded)


def step_bytes(what) -> StepBytes:
    """Dispatch on what a variant runs: a torch model, an .onnx file, an ONNX export directory
    (its decoder-with-past graph), or a CTranslate2 directory (model.bin)."""
    if hasattr(what, "get_decoder"):
        return torch_step_bytes(what)
    path = Path(what)
    if path.suffix == ".onnx":
        return onnx_step_bytes(path)
    if (path / "model.bin").exists():
        return ct2_step_bytes(path)
    return onnx_dir_step_bytes(path)


# --------------------------------------------------------------------------- the limit


def limit(bytes_per_token: float, gbps: float, measured_ms: float | None = None) -> dict[str, float]:
    """Lower bound on ms/token and, given a measured ms/token, achieved GB/s and % of the bound.

    55e6 bytes at 36 GB/s -> bound 1.528 ms; measured 3.0 ms -> 18.3 GB/s achieved, 50.9 % of the limit.
    """
    nan = float("nan")
    bound_ms = bytes_per_token / (gbps * 1e9) * 1e3
    ok = measured_ms is not None and measured_ms > 0
    return {"bytes_per_token_mb": bytes_per_token / 1e6, "bound_ms": bound_ms,
            "measured_ms": measured_ms if ok else nan,
            "achieved_gbps": bytes_per_token / (measured_ms / 1e3) / 1e9 if ok else nan,
            "pct_of_limit": 100 * bound_ms / measured_ms if ok else nan}


# --------------------------------------------------------------------------- command line (the bench's child)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.measure.roofline")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--buffer-mb", type=float, default=256)
    args = parser.parse_args(argv)
    timing.pin_threads(args.threads)
    bw = bandwidth(args.threads, args.buffer_mb)
    print(json.dumps({"gbps": list(bw.gbps), "threads": bw.threads, "buffer_mb": bw.buffer_mb,
                      "cpu_share": bw.cpu_share}))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
