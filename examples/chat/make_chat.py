"""Generate the chat example's conversations: the default job's small tasks, asked in multi-turn chats.

    python examples/chat/make_chat.py              # writes examples/chat/data/{train,valid,test}.jsonl
    python examples/chat/make_chat.py --out DIR    # somewhere else (the tests regenerate into a temp dir)

Each line is `{"messages": [...]}` in the OpenAI/TRL conversational format: a system prompt in about a third of
the conversations, then 1-3 user turns, each answered by the assistant. The questions are the items of
`examples/make_tasks.py` (arithmetic, list and string transforms, conversions), with their context written into
the question, so every answer is short and checkable. Items are drawn without repetition across the three
splits, so the splits are disjoint by content.

The output is a pure function of the seed (`random.Random` only), so the committed files can be checked byte for
byte against a fresh run.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # make_tasks.py sits one folder up; reuse its task families

import make_tasks  # noqa: E402

SEED = 4321
SIZES = {"train": 1500, "valid": 100, "test": 100}
DEFAULT_OUT = HERE / "data"
SYSTEM_PROMPTS = (
    "You are a helpful assistant. Answer with the result only.",
    "You are a concise assistant.",
    "Reply briefly and exactly.",
)


def question(item: make_tasks.Record) -> str:
    return f"{item['instruction']}\n{item['context']}" if item["context"] else item["instruction"]


def conversations(seed: int = SEED) -> list[dict]:
    """Conversations of 1-3 task items each, as many as the splits need, items never repeated."""
    rng = random.Random(seed)
    turns = [rng.randint(1, 3) for _ in range(sum(SIZES.values()))]
    items = make_tasks.generate(seed, sum(turns))
    out, k = [], 0
    for n in turns:
        messages = []
        if rng.random() < 1 / 3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for item in items[k : k + n]:
            messages += [
                {"role": "user", "content": question(item)},
                {"role": "assistant", "content": item["response"]},
            ]
        out.append({"messages": messages})
        k += n
    return out


def write_splits(out_dir: Path, seed: int = SEED) -> dict[str, Path]:
    return make_tasks.write_jsonl_splits(out_dir, conversations(seed), SIZES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"random seed (default: {SEED})")
    args = parser.parse_args()
    for split, path in write_splits(args.out, args.seed).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
