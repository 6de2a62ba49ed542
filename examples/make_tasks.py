"""Generate the default job's instruction data: small tasks a tiny model can learn in a few hundred steps.

    python examples/make_tasks.py                # writes examples/data/tasks/{train,valid,test}.jsonl
    python examples/make_tasks.py --out DIR      # somewhere else (the tests regenerate into a temp dir)

Four families, each with short answers (1-12 tokens with the GPT-2, Llama and Mistral tokenizers):
arithmetic (add, subtract), list transforms (reverse, sort, max, min of 3-5 digits), string transforms
(uppercase, spell backwards, first letter, repeat) and conversions (km -> m, kg -> g, hours -> minutes,
minutes -> seconds, number -> English word for 0-20). Lines are Dolly records (`instruction`, `context`,
`response`, `category`); some tasks put their operands in `context`, others inline them in the instruction, so
both prompt templates (with and without an input section) are exercised.

The output is a pure function of the seed: `random.Random` only (no global RNG, no clock, no network), so the
committed files can be checked byte for byte against a fresh run.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

SEED = 1234
SIZES = {"train": 4000, "valid": 200, "test": 200}
DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "tasks"
# Draws of one task that may in a row repeat an item already generated before the task counts as exhausted
# (the small tasks, such as number -> word, have only a few dozen distinct items).
MAX_REPEATS = 200

WORDS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "bread",
    "chair",
    "green",
    "house",
    "light",
    "music",
    "ocean",
    "paper",
    "plant",
    "queen",
    "radio",
    "sheep",
    "table",
    "tiger",
    "water",
    "zebra",
    "cat",
    "dog",
    "sun",
    "moon",
    "star",
    "tree",
    "fish",
    "bird",
    "rain",
    "snow",
    "book",
    "door",
    "lamp",
    "ship",
    "road",
    "hill",
    "lake",
    "milk",
    "salt",
    "wind",
    "basket",
    "garden",
    "window",
    "pencil",
    "rabbit",
    "orange",
    "yellow",
    "planet",
    "silver",
    "forest",
    "candle",
    "bridge",
    "flower",
    "dragon",
    "castle",
    "butter",
    "carrot",
    "monkey",
    "button",
    "rocket",
    "kitten",
    "island",
    "jacket",
    "ladder",
    "mirror",
    "pepper",
    "shadow",
    "summer",
    "winter",
    "market",
    "cup",
    "hat",
    "pen",
    "box",
    "bus",
    "egg",
    "ice",
    "jam",
    "key",
    "map",
    "red",
    "blue",
    "gold",
    "pink",
    "gray",
    "cold",
    "warm",
    "fast",
    "slow",
    "tall",
    "horse",
    "mouse",
    "truck",
    "train",
    "money",
    "smile",
    "dance",
    "sugar",
    "honey",
    "grape",
)
NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
)
TIMES = {2: "twice", 3: "three times", 4: "four times"}

Record = dict[str, str]


def record(category: str, instruction: str, context: str, response: str) -> Record:
    return {"instruction": instruction, "context": context, "response": response, "category": category}


def digits(rng: random.Random) -> list[int]:
    return [rng.randrange(10) for _ in range(rng.randint(3, 5))]


def spaced(numbers: list[int]) -> str:
    return " ".join(str(n) for n in numbers)


def add(rng: random.Random) -> Record:
    a, b = rng.randrange(100), rng.randrange(100)
    if rng.random() < 0.5:
        return record("arithmetic/add", "Add the two numbers.", f"{a} and {b}", str(a + b))
    return record("arithmetic/add", f"What is {a} plus {b}?", "", str(a + b))


def subtract(rng: random.Random) -> Record:
    a, b = sorted((rng.randrange(100), rng.randrange(100)), reverse=True)  # non-negative results only
    if rng.random() < 0.5:
        return record("arithmetic/subtract", "Subtract the second number from the first.", f"{a} and {b}", str(a - b))
    return record("arithmetic/subtract", f"What is {a} minus {b}?", "", str(a - b))


def reverse_list(rng: random.Random) -> Record:
    xs = digits(rng)
    return record("list/reverse", "Reverse the list of numbers.", spaced(xs), spaced(xs[::-1]))


def sort_list(rng: random.Random) -> Record:
    xs = digits(rng)
    return record("list/sort", "Sort the numbers from smallest to largest.", spaced(xs), spaced(sorted(xs)))


def max_list(rng: random.Random) -> Record:
    xs = digits(rng)
    return record("list/max", "What is the largest number in the list?", spaced(xs), str(max(xs)))


def min_list(rng: random.Random) -> Record:
    xs = digits(rng)
    return record("list/min", "What is the smallest number in the list?", spaced(xs), str(min(xs)))


def uppercase(rng: random.Random) -> Record:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        return record("string/uppercase", "Write the word in uppercase letters.", word, word.upper())
    return record("string/uppercase", f"Write the word {word} in uppercase letters.", "", word.upper())


def reverse_word(rng: random.Random) -> Record:
    word = rng.choice(WORDS)
    return record("string/reverse", "Spell the word backwards.", word, word[::-1])


def first_letter(rng: random.Random) -> Record:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        return record("string/first_letter", "What is the first letter of the word?", word, word[0])
    return record("string/first_letter", f"What is the first letter of the word {word}?", "", word[0])


def repeat_word(rng: random.Random) -> Record:
    word, n = rng.choice(WORDS), rng.randint(2, 4)
    return record("string/repeat", f"Repeat the word {TIMES[n]}.", word, " ".join([word] * n))


def km_to_m(rng: random.Random) -> Record:
    k = rng.randint(1, 99)
    return record("conversion/km_to_m", f"Convert {k} km to metres.", "", f"{k * 1000} m")


def kg_to_g(rng: random.Random) -> Record:
    k = rng.randint(1, 99)
    return record("conversion/kg_to_g", f"Convert {k} kg to grams.", "", f"{k * 1000} g")


def hours_to_minutes(rng: random.Random) -> Record:
    h = rng.randint(1, 48)
    return record("conversion/hours_to_minutes", f"How many minutes are in {h} hours?", "", f"{h * 60} minutes")


def minutes_to_seconds(rng: random.Random) -> Record:
    m = rng.randint(1, 60)
    return record("conversion/minutes_to_seconds", f"How many seconds are in {m} minutes?", "", f"{m * 60} seconds")


def number_to_word(rng: random.Random) -> Record:
    n = rng.randint(0, 20)
    if rng.random() < 0.5:
        return record("conversion/number_to_word", "Write the number in words.", str(n), NUMBER_WORDS[n])
    return record("conversion/number_to_word", f"Write the number {n} in words.", "", NUMBER_WORDS[n])


TASKS: tuple[Callable[[random.Random], Record], ...] = (
    add,
    subtract,
    reverse_list,
    sort_list,
    max_list,
    min_list,
    uppercase,
    reverse_word,
    first_letter,
    repeat_word,
    km_to_m,
    kg_to_g,
    hours_to_minutes,
    minutes_to_seconds,
    number_to_word,
)


def generate(seed: int = SEED, total: int = sum(SIZES.values())) -> list[Record]:
    """`total` records with distinct (instruction, context), drawn round-robin over the tasks.

    Distinct prompts are what keeps the splits disjoint by content. Small tasks run out of new items early
    and drop out of the rotation; the large ones fill the rest.
    """
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    out: list[Record] = []
    active = list(TASKS)
    misses = {task: 0 for task in TASKS}
    while len(out) < total and active:
        for task in list(active):
            item = task(rng)
            key = (item["instruction"], item["context"])
            if key in seen:
                misses[task] += 1
                if misses[task] >= MAX_REPEATS:
                    active.remove(task)
                continue
            misses[task] = 0
            seen.add(key)
            out.append(item)
            if len(out) == total:
                break
    if len(out) < total:
        raise SystemExit(f"only {len(out)} distinct items for {total} requested; add tasks or lower the sizes")
    rng.shuffle(out)
    return out


def write_splits(out_dir: Path, seed: int = SEED) -> dict[str, Path]:
    return write_jsonl_splits(out_dir, generate(seed), SIZES)


def write_jsonl_splits(out_dir: Path, records: list, sizes: dict[str, int]) -> dict[str, Path]:
    """`records` cut in order into one JSONL file per split of `sizes` (LF line ends, so the committed files are
    byte-identical on every platform); shared with `chat/make_chat.py`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, start = {}, 0
    for split, size in sizes.items():
        path = out_dir / f"{split}.jsonl"
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records[start : start + size]]
        path.write_text("".join(lines), encoding="utf-8", newline="\n")
        paths[split], start = path, start + size
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument(
        "--seed", type=int, default=SEED, help=f"random seed (default: {SEED}; the committed files use it)"
    )
    args = parser.parse_args()
    for split, path in write_splits(args.out, args.seed).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
