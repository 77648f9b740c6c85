"""SemanticRouting.scores with the real encoder: same scores as semantic-router.

The plugin scores a message by calling the encoder and the index itself, not
through IndexedRouter's sync call. These tests hold it to the scores that
IndexedRouter returns for the same text, so routing decisions stay the same.
"""

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
from livechat import MATH, MEDICAL, SMALL_TALK, TEST_ENCODER, TEST_THRESHOLD
from plugin_loader import load_plugin

MESSAGES = [
    MEDICAL,
    MATH,
    SMALL_TALK,
    "hi",
    "My daughter has had a fever of 39 degrees for two days. Should I worry?",
    "If a train travels 120 km in 1.5 hours, what is its average speed?",
    "Write a haiku about autumn leaves falling on a quiet pond.",
    "x " * 300,
    "Äpfel, Birnen und Bananen: was ist gesünder?",
]


@pytest.fixture(scope="module")
def routing(encoder_dir):
    plugin = load_plugin()
    valves = plugin.Valves(
        ENCODER_MODEL=TEST_ENCODER,
        ENCODER_LOCAL_DIR=str(encoder_dir),
        ROUTER_SCORE_THRESHOLD=float(TEST_THRESHOLD),
    )
    return plugin.SemanticRouting.build(valves, None)


def indexed_router_scores(routing, text):
    choices = routing.index_router(text, limit=None, threshold=-math.inf)
    return [(choice.name, float(choice.confidence)) for choice in choices]


@pytest.mark.parametrize("text", MESSAGES, ids=range(len(MESSAGES)))
def test_scores_equal_indexed_router(routing, text):
    expected = indexed_router_scores(routing, text)
    actual = routing.scores(text)
    assert [name for name, _ in actual] == [name for name, _ in expected]
    assert [score for _, score in actual] == pytest.approx(
        [score for _, score in expected], abs=1e-9
    )


def test_scores_name_every_route(routing):
    names = {name for name, _ in routing.scores(SMALL_TALK)}
    assert names == set(routing.routes)


def test_mean_aggregation_scores_equal_indexed_router(encoder_dir):
    plugin = load_plugin()
    valves = plugin.Valves(
        ENCODER_MODEL=TEST_ENCODER,
        ENCODER_LOCAL_DIR=str(encoder_dir),
        ROUTER_AGGREGATION="mean",
    )
    routing = plugin.SemanticRouting.build(valves, None)
    for text in (MEDICAL, MATH, SMALL_TALK):
        expected = indexed_router_scores(routing, text)
        actual = routing.scores(text)
        assert [name for name, _ in actual] == [name for name, _ in expected]
        assert [score for _, score in actual] == pytest.approx(
            [score for _, score in expected], abs=1e-9
        )


def test_concurrent_decisions_equal_sequential(routing):
    chats = [[{"role": "user", "content": text}] for text in MESSAGES * 4]
    sequential = [routing.decide(chat) for chat in chats]
    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(routing.decide, chats))
    assert [(d.best, d.route) for d in concurrent] == [
        (d.best, d.route) for d in sequential
    ]
    assert [d.score for d in concurrent] == pytest.approx(
        [d.score for d in sequential], abs=1e-6
    )


def test_encoder_keeps_input_order(routing):
    encoder = routing.index_router.encoder
    texts = ["a much longer text about headaches and fevers at night", "hi", MATH]
    batch = encoder(texts)
    assert len(batch) == len(texts)
    for text, vector in zip(texts, batch, strict=True):
        alone = next(iter(encoder._client.embed([text]))).tolist()
        assert vector == pytest.approx(alone, abs=1e-5)
