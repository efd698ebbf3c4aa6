"""The HTTP app in process (Starlette's TestClient runs its lifespan), on a fake translator.

The fake translates a text by reversing it ('我喜欢猫' -> '猫欢喜我'), so every answer is
checkable by hand; the real model's answers are checked in tests/test_serve_process.py.
"""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from labkit.serve.app import create_app
from labkit.serve.batcher import BatchConfig
from labkit.serve.metrics import parse
from labkit.serve.service import Limits, ServeConfig, TranslationService


class ReverseTranslator:
    """token_ids: code points + </s> (0); generate: reversed, after `delay_s`; detokenize: the text."""

    decode_cfg = "reverse"

    def __init__(self, delay_s: float = 0.0, max_input_tokens: int = 64):
        self.delay_s, self.max_input_tokens, self.calls = delay_s, max_input_tokens, 0

    def token_ids(self, text):
        ids = [ord(c) for c in text][: self.max_input_tokens - 1] + [0]
        return ids, ["truncated"] if len(text) >= self.max_input_tokens else []

    def generate(self, rows, beams):
        self.calls += 1
        time.sleep(self.delay_s)
        return [[i for i in reversed(r) if i] for r in rows]

    def detokenize(self, rows):
        return ["".join(map(chr, r)) for r in rows], [[] for _ in rows]


def client_for(config: ServeConfig | None = None, translator=None, gate: threading.Event | None = None) -> TestClient:
    translator, config = translator or ReverseTranslator(), config or ServeConfig()

    def load(metrics):
        if gate is not None:
            gate.wait(10)  # hold the model "loading" until the test says so
        return TranslationService(translator, "fake/reverse", config, metrics)

    return TestClient(create_app(load))


def wait_ready(client, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.01)


@pytest.fixture()
def client():
    with client_for() as c:
        wait_ready(c)
        yield c


def test_translate_answers_each_text_in_order_with_notes(client):
    r = client.post("/v1/translate", json={"texts": ["我喜欢猫", "  ", "abc", "我\x07爱 你"], "id": "r1"})
    assert r.status_code == 200
    body = r.json()
    assert body["id"] == "r1" and body["model"] == "fake/reverse"
    # text without Chinese comes back unchanged, as from every Translator (labkit.core.inputs): never invented
    assert body["translations"] == ["猫欢喜我", "", "abc", "你 爱我"]
    assert body["notes"][1] == ["empty input: nothing to translate"]
    assert "no Chinese characters: returned unchanged" in body["notes"][2][0] and body["notes"][3] == ["removed 1 control character(s)"]
    assert body["batch_sizes"][2] is None  # the model never saw it
    assert body["cached"] == [False] * 4 and body["timings_ms"]["total"] > 0
    assert client.post("/v1/translate", json={"texts": []}).json()["translations"] == []


@pytest.mark.parametrize("payload, field", [
    ({"texts": ["a", 3]}, ["body", "texts", 1]),
    ({"texts": "我喜欢猫"}, ["body", "texts"]),
    ({"text": ["a"]}, ["body", "texts"]),
    ({"texts": ["a"], "beams": "2"}, ["body", "beams"]),
    ({"texts": ["a"], "beams": 0}, ["body", "beams"]),
    ({"texts": ["a"] * 33}, ["body", "texts"]),
])
def test_bad_requests_get_422_naming_the_field(client, payload, field):
    r = client.post("/v1/translate", json=payload)
    assert r.status_code == 422
    assert [d["loc"] for d in r.json()["detail"]] == [field]


def test_invalid_json_is_a_422(client):
    r = client.post("/v1/translate", content=b'{"texts": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"


def test_over_long_text_is_cut_with_a_note():
    config = ServeConfig(limits=Limits(max_chars=5))
    with client_for(config) as c:
        wait_ready(c)
        body = c.post("/v1/translate", json={"texts": ["一二三四五六七"]}).json()
    assert body["translations"] == ["五四三二一"] and body["notes"][0] == ["truncated from 7 to 5 characters"]


def test_the_second_identical_text_comes_from_the_cache(client):
    first = client.post("/v1/translate", json={"texts": ["我喜欢猫"]}).json()
    second = client.post("/v1/translate", json={"texts": [" 我喜欢猫 "]}).json()  # same once normalized
    assert second["translations"] == first["translations"] and second["cached"] == [True]
    metrics = parse(client.get("/metrics").text)
    lookups = metrics["labkit_cache_lookups_total"]
    assert lookups[(("cache", "translation"), ("result", "hit"))] == 1.0
    assert lookups[(("cache", "tokenize"), ("result", "hit"))] == 1.0
    assert metrics["labkit_cache_hit_ratio"][(("cache", "translation"),)] == 0.5


def test_metrics_count_requests_batches_and_statuses(client):
    client.post("/v1/translate", json={"texts": ["一", "二", "三"]})
    client.post("/v1/translate", json={"texts": [1]})
    m = parse(client.get("/metrics").text)
    assert m["labkit_requests_total"][(("status", "200"),)] == 1.0
    assert m["labkit_requests_total"][(("status", "422"),)] == 1.0
    assert m["labkit_batch_size_sum"][()] == 3.0 and m["labkit_sentences_total"][()] == 3.0
    assert m["labkit_request_seconds_count"][()] == 2.0 and m["labkit_queue_depth"][()] == 0.0


def test_not_ready_while_loading_then_ready():
    gate = threading.Event()
    with client_for(gate=gate) as c:
        assert c.get("/healthz").json() == {"status": "alive"}
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"]
        r = c.post("/v1/translate", json={"texts": ["一"]})
        assert r.status_code == 503 and "retry-after" in r.headers
        gate.set()
        wait_ready(c)
        assert c.post("/v1/translate", json={"texts": ["一二"]}).json()["translations"] == ["二一"]


def test_a_failed_load_says_why_on_readyz():
    def load(metrics):
        raise FileNotFoundError("no such model")

    with TestClient(create_app(load)) as c:
        deadline = time.monotonic() + 5
        while c.get("/readyz").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.01)
        body = c.get("/readyz").json()
        assert body["status"] == "failed" and "no such model" in body["detail"]
        assert "no such model" in c.post("/v1/translate", json={"texts": ["一"]}).json()["detail"]


def test_a_full_queue_answers_503_with_retry_after_and_loses_nothing():
    config = ServeConfig(BatchConfig(max_batch_size=1, max_wait_ms=0, max_queue=2), translation_cache=0)
    with client_for(config, ReverseTranslator(delay_s=0.2)) as c:
        wait_ready(c)
        results = {}

        def post(i):
            results[i] = c.post("/v1/translate", json={"texts": [f"第{i}"], "id": str(i)})

        threads = [threading.Thread(target=post, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    codes = sorted(r.status_code for r in results.values())
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
    for i, r in results.items():  # every request got exactly one answer: its own, or a clear refusal
        if r.status_code == 200:
            assert r.json()["translations"] == [f"{i}第"] and r.json()["id"] == str(i)
        else:
            assert r.headers["retry-after"] == "1" and "overloaded" in r.json()["detail"]


def test_a_request_past_its_deadline_gets_504():
    config = ServeConfig(limits=Limits(deadline_s=0.05))
    with client_for(config, ReverseTranslator(delay_s=0.3)) as c:
        wait_ready(c)
        r = c.post("/v1/translate", json={"texts": ["慢"]})
    assert r.status_code == 504 and "deadline" in r.json()["detail"]


def test_the_page_and_its_script_are_served_without_any_outside_url(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="source"' in page.text and 'id="target"' in page.text
    script = client.get("/static/page.js")
    assert script.status_code == 200 and "/v1/translate" in script.text
    for text in (page.text, script.text, client.get("/static/page.css").text):
        assert "http://" not in text and "https://" not in text  # no CDN: it works offline
