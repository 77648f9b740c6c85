"""The chat messages every benchmark path gets, and the long messages for routing.

The mix has medical questions (route doctor), arithmetic and logic puzzles
(route dcot) and other chat that matches no route, from 2 to 64 words. None of
them is an utterance of the default routes.
"""

MIX = (
    "My knee has been swollen for a week after a run. Should I see a doctor?",
    "Can I take antihistamines while breastfeeding?",
    "What are the warning signs of a stroke?",
    "sore throat and fever, antibiotics?",
    "How much water should an adult drink per day when it is very hot outside?",
    "My father is 72, takes warfarin and has started to bruise easily on his arms "
    "and legs without any knocks that he can remember. His next check-up is in "
    "three weeks. Is this something that can wait, or should he call his doctor "
    "now, and what questions should we ask about his dose?",
    "Is a blood sugar reading of 140 after breakfast too high?",
    "What does a tetanus shot protect against and how often do I need one?",
    "Solve 5x - 3 = 2x + 9 and show each step.",
    "A bus covers 180 km in 2 hours 15 minutes. What is its average speed?",
    "If every cat is an animal and some animals are black, must some cats be black?",
    "What is 17% of 340?",
    "A recipe for 4 people needs 300 g of flour. How much flour for 10 people?",
    "Two trains start 300 km apart and drive toward each other at 70 and 80 km/h. "
    "How long until they meet, and how far has each one travelled by then? Please "
    "reason step by step and check the answer at the end.",
    "How many handshakes happen when 12 people all shake hands once?",
    "Work out the area of a circle with a radius of 7 cm.",
    "Hello!",
    "Write a short poem about the sea at night.",
    "What is the capital of Australia?",
    "Recommend a good science fiction novel for a long train ride.",
    "Translate 'good morning, how did you sleep?' into Spanish.",
    "Can you explain what a REST API is to someone who has never programmed?",
    "thanks, that was helpful",
    "I am planning a weekend trip to the mountains in October with two friends who "
    "like hiking and photography. We have a small car, a modest budget and no "
    "camping gear. Suggest a plan for the two days, with what to pack, where to "
    "sleep and how to avoid the crowds on the popular trails.",
)

assert all(len(text.split()) <= 64 for text in MIX)


def words64(seed: int) -> str:
    """Return a 64-word message built from the mix, varied by `seed`."""
    words: list[str] = []
    index = seed
    while len(words) < 64:
        words.extend(MIX[index % len(MIX)].split())
        index += 7
    return " ".join(words[:64])


def long_paste(seed: int, size: int = 200_000) -> str:
    """Return a `size`-character paste (a question, then log lines), varied by `seed`."""
    head = f"Here is the log from run {seed}, why does the job fail at the end?\n"
    lines = []
    total = len(head)
    number = 0
    while total < size:
        line = (
            f"2026-12-04T10:{number // 60 % 60:02d}:{number % 60:02d} worker-{seed} "
            f"INFO step {number} processed {number * 37 % 1000} records\n"
        )
        lines.append(line)
        total += len(line)
        number += 1
    return (head + "".join(lines))[:size]
