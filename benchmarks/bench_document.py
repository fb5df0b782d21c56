"""First ask vs. repeated ask on the same document: what the condensed-document cache buys.

    python benchmarks/bench_document.py [PDF ...] [--model DIR|HUB_ID] [--device cuda]

Without --model it writes a tiny random-weight beacon model (window 256, native context 8192,
ratios 2..32: about 254K tokens of reach) so the benchmark runs anywhere, offline, on the CPU.
Without a PDF it looks for Debian's R manuals (`apt-get download r-doc-pdf`, `dpkg -x`), e.g.
R-intro.pdf (about 100 pages). Prints one table: time to first token and total time for the
first question (condenses the document) and for later questions (restore the condensed prefix),
and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEBIAN_PDFS = [
    "/tmp/debpdf/x/usr/share/R/doc/manual/R-intro.pdf",
    "/usr/share/R/doc/manual/R-intro.pdf",
]
QUESTIONS = [
    "How do I read a data file into a data frame?",
    "What does the function lm do?",
    "How are factors different from character vectors?",
    "Which page explains loops?",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pdfs", nargs="*", type=Path)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="repeated questions to time")
    parser.add_argument(
        "--shape",
        choices=["qwen2-7b"],
        default=None,
        help="random weights with this real shape, built on --device (see bench_prefill.py); "
        "the tiny model's tokenizer stands in for the real one",
    )
    args = parser.parse_args()
    print("command:", " ".join(sys.argv))

    from beacon_apps.beacon.tiny import write_tiny_model
    from beacon_apps.documents import load_documents
    from beacon_apps.engine import BeaconEngine

    pdfs = args.pdfs or [Path(p) for p in DEBIAN_PDFS if Path(p).is_file()][:1]
    if not pdfs:
        print("no PDF given and no R manual found: apt-get download r-doc-pdf && dpkg -x ...")
        return 2
    started = time.perf_counter()
    documents = load_documents(pdfs)
    ingest = time.perf_counter() - started
    model, tokenizer = args.model, None
    if model is None:
        model = write_tiny_model(
            Path(tempfile.mkdtemp()) / "tiny",
            beacon_window=256,
            beacon_stride=256,
            max_position_embeddings=8192,
        )
    if args.shape:
        model, tokenizer = _random_shape_model(args, tiny_folder=model)
    engine = BeaconEngine(model, tokenizer, device=args.device)
    info = engine.info(documents)
    print(
        f"document: {', '.join(info.names)}: {info.pages} pages, {info.tokens} tokens, "
        f"ratio {info.compression_ratio}, ingestion {ingest:.2f}s; model {engine.model_name} on "
        f"{engine.model.device} ({engine.model.dtype})"
    )

    def timed(question: str):
        stream = engine.stream_ask(documents, question, max_new_tokens=args.max_new_tokens)
        begin = time.perf_counter()
        first_token = None
        for _ in stream:
            if first_token is None:
                first_token = time.perf_counter() - begin
        total = time.perf_counter() - begin
        answer = stream.answer
        return answer, first_token if first_token is not None else total, total

    first, first_ttft, first_total = timed(QUESTIONS[0])
    repeats = [timed(QUESTIONS[1 + i % (len(QUESTIONS) - 1)]) for i in range(args.repeats)]
    assert first.cached_tokens == 0 and all(a.cached_tokens > 0 for a, _, _ in repeats)
    ttft = statistics.median(t for _, t, _ in repeats)
    total = statistics.median(t for _, _, t in repeats)
    prefill = statistics.median(a.prefill_seconds for a, _, _ in repeats)
    rows = [
        ("first ask (condense)", first.prefill_seconds, first_ttft, first_total, 0),
        ("repeated ask (cache)", prefill, ttft, total, repeats[0][0].cached_tokens),
    ]
    print(f"\n{'':22} {'prefill s':>10} {'first token s':>14} {'total s':>9} {'cached tok':>11}")
    for name, p, t, s, c in rows:
        print(f"{name:22} {p:10.3f} {t:14.3f} {s:9.3f} {c:11d}")
    print(
        f"{'speed-up (first/repeat)':22} {first.prefill_seconds / prefill:9.1f}x "
        f"{first_ttft / ttft:13.1f}x {first_total / total:8.1f}x"
    )
    return 0


def _random_shape_model(args, tiny_folder: Path):
    """A random-weight model of a real shape (bench_prefill's builder) + the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_prefill import QWEN2_7B, RELEASED_BEACON, random_weight_models

    device = torch.device(args.device or "cuda")
    options = argparse.Namespace(attn="sdpa", shape=args.shape)
    beacon, base, _ = random_weight_models(
        QWEN2_7B, RELEASED_BEACON, {}, options, device, torch.bfloat16
    )
    del base
    return beacon, AutoTokenizer.from_pretrained(tiny_folder)


if __name__ == "__main__":
    sys.exit(main())
