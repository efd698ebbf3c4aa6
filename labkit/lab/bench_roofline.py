"""The bench's roofline columns: bytes of weights per token of what each variant runs, against the bandwidth.

    bw = roofline.bandwidth_in_process(2)            # once per bench run, in its own process
    df = add_roofline(df, checks, bundle, bw)        # + bytes_per_token_mb, bound_ms, ms_per_token, ...

Bytes per token come from the artifact a variant's worker loaded (`Check.artifact`: an ONNX export
directory, a CTranslate2 directory) or, for a torch-backend variant, the bundle's model, through
labkit.measure.roofline.step_bytes, so a new variant gets its columns without being listed here.

Measured ms/token is the worker's batch-1 end-to-end p50 divided by the mean number of tokens it
decoded (`tokens`): it includes tokenization, the encoder and the first decoder step, so it
overstates the per-step time and the % of limit understates how close the decoder steps get (the
footer says so). On speed-only presets every sentence decodes the forced length, so the division is
exact; on quality presets lengths vary around the mean. Left out: a per-step timer inside each
engine (CTranslate2 exposes none; a torch/ORT-only one would make the columns incomparable).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from labkit.core.bundle import Bundle
from labkit.engines.variants import VARIANTS, Check
from labkit.measure import roofline
from labkit.measure.ledger import json_number

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ("bytes_per_token_mb", "bound_ms", "ms_per_token", "achieved_gbps", "pct_of_limit")
FOOTER = ("roofline: bytes_per_token_mb = weights one decode step reads (decoder-with-past graph / decoder "
          "tensors / model.bin, at stored precision; KV cache and activations not counted); bound_ms = "
          "bytes / bandwidth; ms_per_token = batch-1 end-to-end p50 / tokens decoded (includes tokenizing, "
          "the encoder and the first step, so it overstates a decode step and % of limit is a floor)")


def weights_of(variant: str, check: Check, bundle: Bundle):
    """What `variant`'s worker ran: its gated artifact, or the bundle's model for a torch-backend variant."""
    return bundle.model if VARIANTS[variant].backend == "torch" else check.artifact


def variant_bytes(variant: str, check: Check, bundle: Bundle) -> tuple[roofline.StepBytes | None, str | None]:
    """(StepBytes, None), or (None, why) when the artifact has a layout the counter does not read."""
    what = weights_of(variant, check, bundle)
    if what is None:
        return None, "no artifact"
    try:
        return roofline.step_bytes(what), None
    except (FileNotFoundError, ValueError, OSError) as exc:  # the table still shows the timing
        return None, f"bytes not counted: {exc}"


def add_roofline(df: pd.DataFrame, checks: Mapping[str, Check], bundle: Bundle,
                 bw: roofline.Bandwidth | None) -> pd.DataFrame:
    """`df` (run_bench's frame) with COLUMNS, `bandwidth_gbps` and `bytes_by_part` for every timed row."""
    import pandas as pd

    rows = []
    for row in df.itertuples(index=False):
        out = dict.fromkeys(COLUMNS, float("nan")) | {"bandwidth_gbps": float("nan"), "bytes_by_part": None}
        if row.status == "ok" and bw is not None:
            sb, _why = variant_bytes(row.variant, checks[row.variant], bundle)
            if sb is not None:
                lim = roofline.limit(sb.total, bw.median_gbps, row.p50_ms / row.tokens if row.tokens else None)
                out |= {"bytes_per_token_mb": lim["bytes_per_token_mb"], "bound_ms": lim["bound_ms"],
                        "ms_per_token": lim["measured_ms"], "achieved_gbps": lim["achieved_gbps"],
                        "pct_of_limit": lim["pct_of_limit"], "bandwidth_gbps": bw.median_gbps,
                        "bytes_by_part": sb.by_part()}
        rows.append(out)
    out = df.reset_index(drop=True).join(pd.DataFrame(rows))
    out.attrs["bandwidth"] = bw  # the measurement itself: a notebook reuses it for a second run_bench
    return out


def roofline_metrics(row) -> dict:
    """Extra ledger metric keys of a timed bench row (None where not counted)."""
    return {"bytes_per_token_mb": json_number(getattr(row, "bytes_per_token_mb", None)),
            "bound_ms_per_token": json_number(getattr(row, "bound_ms", None)),
            "ms_per_token": json_number(getattr(row, "ms_per_token", None)),
            "achieved_gbps": json_number(getattr(row, "achieved_gbps", None)),
            "pct_of_bandwidth_limit": json_number(getattr(row, "pct_of_limit", None)),
            "bandwidth_gbps": json_number(getattr(row, "bandwidth_gbps", None))}


def footer(df: pd.DataFrame) -> list[str]:
    """The table's closing lines on the limit: the bandwidth with its spread, and what the columns mean."""
    if df.attrs.get("bandwidth") is None:
        return []
    return [f"{df.attrs['bandwidth']} (own process)", FOOTER]
