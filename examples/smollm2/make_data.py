"""Build the SmolLM2 example's data from the Python documentation that ships with Python (`pydoc_data.topics`).

The 79 topics (one per statement, operator, data model section, ...) are shuffled with a fixed seed and split
BY TOPIC into train/valid/test, so no held-out paragraph has a neighbour from the same page in training. Each
topic's text is cut at paragraph boundaries into passages of at most `--max-chars` characters, and every passage
becomes one instruction record (the data format of `dskd.toml`: instruction, context, response):

- the first passage of a topic: "Explain this topic of the Python documentation: <title>." -> the passage;
- a later passage: "Continue this passage of the Python documentation on <title>." with the end of the previous
  passage as context -> the passage.

The records hold only the instruction and its context; the prompt text around them is the job's `data.template`
(one shared template today; a job can switch to each model's own chat template when dskd renders them).
`test_text.jsonl` holds the whole text of every test topic, for per-byte perplexity on held-out documentation.

    python examples/smollm2/make_data.py [--out examples/smollm2/data] [--seed 0]

The committed files were made with Python 3.11's topics and the defaults; another Python's topics differ a little,
so regenerate only on purpose. Prints one JSON line with the split sizes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def passages(text: str, max_chars: int) -> list[str]:
    """Consecutive paragraphs joined up to `max_chars`; a longer paragraph is cut at line breaks."""
    pieces: list[str] = []
    for paragraph in (p.strip("\n") for p in text.split("\n\n")):
        if not paragraph.strip():
            continue
        while len(paragraph) > max_chars:
            cut = paragraph.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(paragraph[:cut])
            paragraph = paragraph[cut:].lstrip("\n")
        pieces.append(paragraph)
    out: list[str] = []
    for piece in pieces:
        if out and len(out[-1]) + 2 + len(piece) <= max_chars:
            out[-1] += "\n\n" + piece
        else:
            out.append(piece)
    return out


def title_of(text: str, topic: str) -> str:
    first = text.strip().splitlines()[0].strip() if text.strip() else topic
    return first or topic


def records(topic: str, text: str, max_chars: int, context_chars: int) -> list[dict]:
    title = title_of(text, topic)
    body = text.strip()
    # The first line and its ***** underline are the title; the passages start after them.
    lines = body.splitlines()
    if len(lines) > 1 and set(lines[1].strip()) <= set("*=-") and lines[1].strip():
        body = "\n".join(lines[2:]).strip()
    out = []
    previous = ""
    for i, passage in enumerate(passages(body, max_chars)):
        # A passage may open with an indented code line; a tokenizer would merge that indentation with a newline
        # ending the prompt. So the prompt template ends at "### Response:" and each response starts a new line.
        response = "\n" + passage
        if i == 0:
            record = {
                "instruction": f"Explain this topic of the Python documentation: {title}.",
                "context": "",
                "response": response,
            }
        else:
            record = {
                "instruction": f"Continue this passage of the Python documentation on {title}.",
                "context": previous[-context_chars:].lstrip(),
                "response": response,
            }
        record["topic"] = topic
        out.append(record)
        previous = passage
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "data"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--valid-topics", type=int, default=8)
    p.add_argument("--test-topics", type=int, default=8)
    p.add_argument("--max-chars", type=int, default=320, help="longest response, in characters")
    p.add_argument("--context-chars", type=int, default=160, help="longest context, in characters")
    args = p.parse_args(argv)
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(args.seed).shuffle(names)
    split = {
        "valid": sorted(names[: args.valid_topics]),
        "test": sorted(names[args.valid_topics : args.valid_topics + args.test_topics]),
        "train": sorted(names[args.valid_topics + args.test_topics :]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, chosen in split.items():
        rows = [r for topic in chosen for r in records(topic, topics[topic], args.max_chars, args.context_chars)]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        sizes[name] = {"topics": len(chosen), "records": len(rows)}
    text_rows = [{"topic": t, "text": topics[t].strip()} for t in split["test"]]
    (out / "test_text.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in text_rows))
    sizes["test_text"] = {"topics": len(text_rows), "chars": sum(len(r["text"]) for r in text_rows)}
    sizes["python"] = sys.version.split()[0]
    print(json.dumps(sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
