"""Regenerate ``instructions.jsonl``: a small synthetic instruction data set (no downloads).

Two kinds of tasks, so the curves of ``examples/sft.py`` have something to show:

* tasks with one right answer (arithmetic, reversing, sorting, case changes, comparisons), where a
  fine-tuned model should become confident;
* open tasks with many right answers (name a fruit, write a greeting, ...), where a model that
  keeps its diversity spreads its probability over them instead of collapsing onto a few.

Usage: ``python examples/data/make_instructions.py`` (deterministic: same file every time).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud garden window pencil candle rocket violin tiger planet bridge "
    "forest silver orange button mirror castle dragon harbor jacket lemon meadow"
).split()
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark",
    "early": "late", "open": "closed", "full": "empty", "loud": "quiet", "young": "old",
}  # fmt: skip
OPEN_TASKS = {
    "Name a fruit.": "apple banana cherry mango peach pear plum grape melon kiwi lemon fig".split(),
    "Name a color.": "red blue green yellow purple orange pink brown black white gray teal".split(),
    "Name an animal.": "cat dog horse tiger rabbit eagle dolphin fox owl bear wolf otter".split(),
    "Write a short greeting.": [
        "Hello there!", "Hi, nice to see you.", "Good morning!", "Hey, how are you?",
        "Greetings, friend.", "Welcome back!", "Hello, it is good to meet you.", "Hi there!",
    ],
    "Describe the weather in one word.": "sunny rainy windy cloudy snowy foggy stormy mild".split(),
    "Give me a word that rhymes with cat.": "hat bat mat rat sat flat chat pat that".split(),
    "Suggest a name for a pet.": "Max Luna Bella Milo Coco Rocky Daisy Leo Ruby Oscar".split(),
    "Write a sentence about the sea.": [
        "The sea is calm tonight.", "Waves roll onto the sand.", "The sea sparkles in the sun.",
        "Boats drift across the blue sea.", "The sea smells of salt and wind.",
        "Gulls circle above the grey sea.",
    ],
}  # fmt: skip


def closed_task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(7)
    if kind == 0:
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 1:
        word = rng.choice(WORDS)
        return f"Reverse the word {word}.", word[::-1]
    if kind == 2:
        letters = rng.sample("abcdefghij", rng.randint(3, 6))
        return f"Sort these letters: {' '.join(letters)}.", " ".join(sorted(letters))
    if kind == 3:
        words = rng.sample(WORDS, 2)
        return f"Write in capitals: {' '.join(words)}.", " ".join(words).upper()
    if kind == 4:
        a, b = rng.sample(range(1, 100), 2)
        return f"Which is larger, {a} or {b}?", str(max(a, b))
    if kind == 5:
        word, opposite = rng.choice(sorted(OPPOSITES.items()))
        return f"What is the opposite of {word}?", opposite
    word = rng.choice(WORDS)
    return f"How many letters are in the word {word}?", str(len(word))


def main() -> None:
    rng = random.Random(0)
    rows = []
    for _ in range(1200):
        if rng.random() < 0.6:
            instruction, response = closed_task(rng)
        else:
            instruction = rng.choice(sorted(OPEN_TASKS))
            response = rng.choice(OPEN_TASKS[instruction])
        rows.append({"instruction": instruction, "response": response})
    path = Path(__file__).with_name("instructions.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
