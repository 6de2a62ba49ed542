"""Alignment benchmark: ETA recall against the exact-span upper bound, ETA throughput, MinED cost.

Corpus: the paragraphs of `pydoc_data.topics.topics` (the Python reference manual's help topics,
shipped with every Python) plus `HARD_TEXT` (decomposed accents, NFKC compatibility characters,
literal special-token strings, CJK, emoji, tabs, CRLF, runs of spaces), each a label sequence (its
tokens, with `split_special_tokens` as training does, followed by EOS) for both tokenizers of every
ordered pair of the GPT-2, TinyLlama and Mistral tokenizers under `examples/tokenizers/` and a
Qwen2-style tokenizer built offline (`nfc_byte_level_tokenizer`: NFC normaliser, `Sequence`
pre-tokenizer).

Per pair: - `exact_span_pairs`: token pairs whose spans on the *original* text coincide, counted
independently of ETA from the fast tokenizers' character `offset_mapping`
(`dskd.evaluation.alignment_bounds`), plus the EOS pair of every sample: the upper bound;
- `eta_pairs`, `eta_recall` = the bound's pairs ETA makes / `exact_span_pairs` (target 1.0),
  `eta_pairs_outside_bound`; - `greedy_recall`: the reference's greedy string matching (spec §6.2),
  counting only its pairs ETA also makes;
- `normalisation_mismatches`: samples whose two tokenizations decode to different text;
- `eta_samples_per_s`: `align()` calls per second over the corpus, one process; -
  `mined_ms_per_sample`: MinED `align()` on 256 x 256-token samples (target <= 5 ms); the top-level
  `baseline` times the reference's cell-by-cell DTW on the same samples.

Run: `python benchmarks/bench_align.py` (prints one JSON object; `--mined-samples 0 --steps 0` keeps
the alignment figures only). The MinED vocabulary maps are built once per pair and cached in
`--cache-dir`; building them is not timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import tempfile
import time
import unicodedata
from pathlib import Path
from pydoc_data.topics import topics

from rapidfuzz.distance import Levenshtein
from transformers import AutoTokenizer

from dskd.evaluation.alignment_bounds import exact_span_pairs, greedy_pairs
from dskd.plugins.aligners.eta import eta
from dskd.plugins.aligners.mined import mined

REPO = Path(__file__).resolve().parents[1]
TOKENIZERS = REPO / "examples" / "tokenizers"
NAMES = ("gpt2", "tinyllama", "mistral")
MINED_LENGTH = 256


# GPT-2's pre-tokenizer regex, which Qwen2 runs as a `Split` step before a regex-free ByteLevel.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def nfc_byte_level_tokenizer(folder: Path):
    """A Qwen2-style tokenizer built offline: GPT-2's vocabulary behind an NFC normaliser and a
    `Sequence` pre-tokenizer (Split, then ByteLevel), saved to `folder` and loaded from there."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(TOKENIZERS / "gpt2" / "tokenizer.json"))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GPT2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


# Text on which tokenizers disagree about the text: decomposed accents (an NFC tokenizer composes them),
# NFKC compatibility characters, literal special-token strings, CJK, emoji, tabs and CRLF.
HARD_TEXT = [
    unicodedata.normalize("NFD", "Le café était fermé ; l'élève a trouvé une crème brûlée à côté."),
    unicodedata.normalize("NFD", "Ångström, naïve façade, São Paulo, Dvořák, Øresund, Mañana."),
    "The \ufb01rst o\ufb03ce: \u2460 step, \u2461 steps, \u00bd cup, x\u00b2, \u2122, \u2026 done.",
    "Full-width: \uff21\uff22\uff23 \uff11\uff12\uff13\uff01 and half-width \uff76\uff80\uff76\uff85.",
    "Replace <unk> with a word; <s> starts and </s> ends a sequence; <|endoftext|> ends GPT-2's.",
    "<unk><s></s><|endoftext|> glued, then spaced: < unk > and <<s>>.",
    "東京は日本の首都です。北京和上海是中国的城市。서울은 한국의 수도입니다.",
    "Emoji 😀👍🏽 👩\u200d👩\u200d👧 🇫🇷🇯🇵 and ✔\ufe0f done.",
    "col1\tcol2\t\tcol3\n\tindented\r\nwindows line\r\n\r\nlast",
    "   leading spaces, then  two,   three and a trailing one ",
    "The total is 12 plus 7, which makes 19.",
]


def corpus() -> list[str]:
    """Every non-blank paragraph of the help topics, in a fixed order, then `HARD_TEXT`."""
    paragraphs = []
    for key in sorted(topics):
        paragraphs += [p.strip("\n") for p in re.split(r"\n\s*\n", topics[key]) if p.strip()]
    return paragraphs + HARD_TEXT


def reference_dtw_ms(aligner, t_ids: list[int], s_ids: list[int]) -> float:
    """Milliseconds of the reference's cell-by-cell DTW, one C edit-distance call a cell (§15.2)."""
    start = time.perf_counter()
    t_str = [aligner.teacher_strings[i] for i in t_ids]
    s_str = [aligner.student_strings[i] for i in s_ids]
    acc = [[math.inf] * (len(s_str) + 1) for _ in range(len(t_str) + 1)]
    acc[0][0] = 0.0
    for i, a in enumerate(t_str):
        for j, b in enumerate(s_str):
            acc[i + 1][j + 1] = Levenshtein.distance(a, b) + min(acc[i][j + 1], acc[i + 1][j], acc[i][j])
    return (time.perf_counter() - start) * 1000


def timed(fn, repeats: int) -> float:
    """Best wall time of `repeats` runs of `fn()` in seconds (the least disturbed by other work)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def long_samples(tok, texts: list[str], count: int) -> list[list[int]]:
    """`count` samples of exactly MINED_LENGTH tokens, from consecutive paragraphs."""
    ids = tok("\n\n".join(texts), add_special_tokens=False).input_ids
    return [ids[k * MINED_LENGTH : (k + 1) * MINED_LENGTH] for k in range(count)]


def label_ids(tok, text: str) -> list[int]:
    """Label ids as training makes them (`dskd.data.examples`: literal special-token strings are text), then EOS."""
    return tok(text, add_special_tokens=False, split_special_tokens=True).input_ids + [tok.eos_token_id]


def bench_pair(t_tok, s_tok, texts, args) -> tuple[dict, float | None]:
    t_ids = [label_ids(t_tok, x) for x in texts]
    s_ids = [label_ids(s_tok, x) for x in texts]
    # The bound on the original text, with the EOS pair of every sample.
    bound = [{*exact_span_pairs(t_tok, s_tok, x), (len(a) - 1, len(b) - 1)} for x, a, b in zip(texts, t_ids, s_ids)]
    exact = sum(len(b) for b in bound)
    aligner = eta(t_tok, s_tok)
    found = [{tuple(p) for p in aligner.align(a, b).pairs.tolist()} for a, b in zip(t_ids, s_ids)]
    eta_count = sum(len(f) for f in found)
    missed = sum(len(b - f) for b, f in zip(bound, found))  # pairs of the bound ETA does not make
    differ = sum(aligner.text_differs(a, b) for a, b in zip(t_ids, s_ids))
    greedy = 0
    for a, b in zip(t_ids, s_ids):
        found_greedy = greedy_pairs(
            t_tok.convert_ids_to_tokens(a),
            s_tok.convert_ids_to_tokens(b),
            t_tok.eos_token,
            s_tok.eos_token,
        )
        # Count only pairs with a real span match: the reference also pairs space-only tokens at
        # different places and runs of spaces of different lengths ("" == "").
        exact_set = {tuple(p) for p in aligner.align(a, b).pairs.tolist()}
        greedy += sum(p in exact_set for p in found_greedy)
    eta_seconds = timed(lambda: [aligner.align(a, b) for a, b in zip(t_ids, s_ids)], args.repeats)
    row = {
        "exact_span_pairs": exact,
        "eta_pairs": eta_count,
        "eta_recall": round((exact - missed) / exact, 6),
        "eta_pairs_outside_bound": eta_count - (exact - missed),
        "greedy_recall": round(greedy / exact, 6),
        "normalisation_mismatches": differ,
        "eta_samples_per_s": round(len(texts) / eta_seconds, 1),
    }
    if not args.mined_samples:
        return row, None
    minimum = mined(t_tok, s_tok, cache_dir=args.cache_dir)
    t_long, s_long = (
        long_samples(t_tok, texts, args.mined_samples),
        long_samples(s_tok, texts, args.mined_samples),
    )
    mined_seconds = timed(lambda: [minimum.align(a, b) for a, b in zip(t_long, s_long)], args.repeats)
    reference_ms = min(reference_dtw_ms(minimum, t_long[k], s_long[k]) for k in range(2))
    return {**row, "mined_ms_per_sample": round(mined_seconds * 1000 / len(t_long), 3)}, reference_ms


def step_overhead_ratio(steps: int) -> dict:
    """Training-step time of cross-tokenizer DSKDv2 + ETA over same-vocabulary DSKDv2, on the same tiny models.

    The Mistral and TinyLlama tokenizers both have 32,000 tokens, so the default job's Llama teacher and a Llama
    student keep exactly the same shapes in both runs; only the teacher's tokenizer differs, which turns on the
    aligned gather/scatter path of the loss. The alignment itself was made in the data loader (cached before
    the timed steps), as in training. Step time = 1 / (student tokens per second) over the log intervals after
    the first (the first holds warm-up); the student's tokenisation is the same in both runs.
    """
    import tempfile

    from dskd.config import load_config
    from dskd.console import Console
    from dskd.registry import load_registry
    from dskd.run.job import Job

    registry = load_registry()
    rates = {}
    with tempfile.TemporaryDirectory(prefix="dskd-bench-step-") as tmp:
        for name, teacher_tok in (("same_vocab", "tinyllama"), ("cross_vocab", "mistral")):
            run = Path(tmp) / name
            overrides = [
                f"run.output_dir={run}",
                'run.stages=["distill"]',
                f"train.max_steps={steps}",
                f"run.log_every={max(steps // 5, 1)}",
                f"teacher.tokenizer={TOKENIZERS / teacher_tok}",
                f"student.config={REPO / 'examples/models/student-llama'}",
                f"student.tokenizer={TOKENIZERS / 'tinyllama'}",
                "objective.name=dskd_v2",
                'aligner.name=""',
                f"data.cache_dir={Path(tmp) / 'cache'}",
            ]
            job = Job(load_config(REPO / "dskd.toml", overrides, registry=registry), registry)
            job.console = Console(stderr=True)  # stdout carries the JSON only
            job.prepare_run_dir()
            job.distill(None)
            lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
            rates[name] = sum(line["perf/tokens_per_s"] for line in lines) / len(lines)
    return {
        "step_overhead_ratio": round(rates["same_vocab"] / rates["cross_vocab"], 3),
        "step_tokens_per_s": {k: round(v, 1) for k, v in rates.items()},
        "step_overhead_steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default="~/.cache/dskd", help="where MinED vocabulary maps are cached")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (the best is reported)")
    parser.add_argument(
        "--mined-samples", type=int, default=20, help="256 x 256-token samples timed for MinED (0 skips MinED)"
    )
    parser.add_argument(
        "--steps", type=int, default=60, help="training steps per run for step_overhead_ratio (0 skips it)"
    )
    args = parser.parse_args()
    texts = corpus()
    toks = {name: AutoTokenizer.from_pretrained(TOKENIZERS / name) for name in NAMES}
    toks["qwen2_style_nfc"] = nfc_byte_level_tokenizer(Path(tempfile.mkdtemp(prefix="dskd-bench-nfc-")))
    rows, reference = [], []
    for teacher in toks:
        for student in toks:
            if teacher != student:
                row, reference_ms = bench_pair(toks[teacher], toks[student], texts, args)
                rows.append({"teacher": teacher, "student": student, **row})
                if reference_ms is not None:
                    reference.append(reference_ms)
    print(
        json.dumps(
            {
                "benchmark": "align",
                "corpus": f"pydoc_data.topics paragraphs (Python {platform.python_version()}) + {len(HARD_TEXT)} HARD_TEXT samples",
                "samples": len(texts),
                "pairs": rows,
                "baseline": {
                    "greedy_recall": "reference greedy string matching (spec §6.2), same corpus",
                    **(
                        {"mined_reference_ms_per_sample": round(sum(reference) / len(reference), 1)}
                        if reference
                        else {}
                    ),
                },
                **(step_overhead_ratio(args.steps) if args.steps else {}),
                "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
