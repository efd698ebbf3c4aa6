"""The suite fails on deprecations labkit hits (pyproject's filterwarnings), and labkit hits none.

A warning attributed to a labkit module is an error; one attributed elsewhere stays a warning (the
filter is scoped); transformers' renamed keywords (`past_key_values` -> `cache`) are errors too.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from labkit.core.decode import TorchStepper, cache_kwargs, greedy

PROBE = "warnings.warn('this call goes away next release', {kind})"


@pytest.mark.parametrize("kind", [FutureWarning, DeprecationWarning])
def test_a_deprecation_from_a_labkit_module_fails_the_test(kind):
    as_labkit_module = {"__name__": "labkit.core.probe", "warnings": warnings, kind.__name__: kind}
    with pytest.raises(kind):
        exec(PROBE.format(kind=kind.__name__), as_labkit_module)


def test_the_filter_is_scoped_to_labkit():
    elsewhere = {"__name__": "somebody_else", "warnings": warnings, "FutureWarning": FutureWarning}
    with pytest.warns(FutureWarning):
        exec(PROBE.format(kind="FutureWarning"), elsewhere)


def test_the_deprecated_cache_keyword_would_fail_and_labkit_uses_the_current_one(tiny_bundle):
    model, enc = tiny_bundle.model, tiny_bundle.tokenizer(["我喜欢猫。"], return_tensors="pt")
    start = torch.tensor([[model.config.decoder_start_token_id]])
    outputs = model.get_encoder()(**enc)
    if "cache" in cache_kwargs(model, None):  # this transformers renamed it: the old name must be an error
        with pytest.raises(FutureWarning, match="past_key_values"):
            model(encoder_outputs=outputs, attention_mask=enc["attention_mask"], decoder_input_ids=start,
                  past_key_values=None, use_cache=True)
    ids = greedy(TorchStepper(model, cache="dynamic"), enc["input_ids"], enc["attention_mask"])
    assert ids[0]  # the cached decode ran under the error filter
