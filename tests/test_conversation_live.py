"""Conversation-aware routing: follow-ups keep their route, new topics switch."""

import pytest
from livechat import stream_chat, update_valves

FEVER = "My daughter has a fever of 38.5C and a sore throat."
REPLY = "That sounds like a common viral infection; keep her hydrated."


def conversation(*user_turns):
    """Build a chat of alternating user and assistant turns, ending with the user."""
    messages = []
    for turn in user_turns[:-1]:
        messages += [
            {"role": "user", "content": turn},
            {"role": "assistant", "content": REPLY},
        ]
    return messages + [{"role": "user", "content": user_turns[-1]}]


@pytest.mark.parametrize(
    "follow_up",
    [
        "And how much of it can I give her?",
        "Is it contagious?",
        "What about for her little brother, he is 3?",
    ],
)
def test_follow_up_keeps_medical_route(pipelines, follow_up):
    result = stream_chat(
        pipelines.base_url, {"messages": conversation(FEVER, follow_up)}
    )
    assert result.models == {"doctor"}
    assert result.done_count == 1


def test_follow_up_alone_goes_to_base(pipelines, base_name):
    result = stream_chat(
        pipelines.base_url,
        {"messages": conversation("And how much of it can I give her?")},
    )
    assert result.models == {base_name}


def test_topic_change_to_other_route_switches(pipelines):
    messages = conversation(FEVER, "Solve 3x + 7 = 22 step by step")
    result = stream_chat(pipelines.base_url, {"messages": messages})
    assert result.models == {"dcot"}
    assert "from the conversation" not in result.statuses[0]


@pytest.mark.parametrize(
    "new_topic",
    ["Now write me a poem about autumn leaves", "What's the capital of France?"],
)
def test_topic_change_to_small_talk_goes_to_base(pipelines, base_name, new_topic):
    result = stream_chat(
        pipelines.base_url, {"messages": conversation(FEVER, new_topic)}
    )
    assert result.models == {base_name}


def test_math_follow_up_keeps_dcot(pipelines):
    messages = conversation(
        "A train travels 210 km at 70 km/h. How long does the trip take?",
        "And what if it goes twice as fast?",
    )
    result = stream_chat(pipelines.base_url, {"messages": messages})
    assert result.models == {"dcot"}


def test_routing_user_turns_one_ignores_history(pipelines, restore_valves, base_name):
    response = update_valves(pipelines, restore_valves, ROUTING_USER_TURNS=1)
    assert response.status_code == 200, response.text
    messages = conversation(FEVER, "And how much of it can I give her?")
    result = stream_chat(pipelines.base_url, {"messages": messages})
    assert result.models == {base_name}
