"""Markdown for the page: page citations, the document panel, per-answer numbers, the chat."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

# "[page 3]", "[pages 3-5]", "[p. 4]", "[pp. 4, 7]", "[page iv]", "[report.pdf, page 2]"
CITATION = re.compile(
    r"\[(?:[^\[\]\n]{0,80}?[\s,;:(])?(?:pages?|pp?\.)\s*"
    r"(?P<pages>[0-9ivxlcdm]+(?:\s*(?:[-\u2013,]|and|&)\s*[0-9ivxlcdm]+)*)\s*\]",
    re.IGNORECASE,
)
_MAX_RANGE = 50


def cited_pages(text: str) -> list[str]:
    """Page labels cited as [page N] in `text`, in order of first mention, ranges expanded."""
    labels: list[str] = []
    for match in CITATION.finditer(text):
        for part in re.split(r"\s*(?:,|and|&)\s*", match.group("pages")):
            bounds = re.split(r"\s*[-\u2013]\s*", part.strip())
            if len(bounds) == 2 and all(b.isdigit() for b in bounds):
                low, high = int(bounds[0]), int(bounds[1])
                pages = [str(p) for p in range(low, min(high, low + _MAX_RANGE) + 1)]
            else:
                pages = [b for b in bounds if b]
            labels += [p.lower() for p in pages if p.lower() not in labels]
    return list(dict.fromkeys(labels))


def render_citations(text: str) -> str:
    """Make [page N] citations stand out (bold)."""
    return CITATION.sub(lambda m: f"**{m.group(0)}**", text)


def escape_markdown(text: str) -> str:
    """Text shown as is inside markdown (file names, error messages)."""
    return re.sub(r"([\\`*_\[\]<>|~])", r"\\\1", text)


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def stats_line(answer: Any) -> str:
    """The numbers under an answer: cache reuse and time (the second question is faster)."""
    cached = answer.cached_tokens
    parts = [
        f"cached: {cached:,} tokens" if cached else "cached: 0 tokens (condensed now)",
        f"prefill {answer.prefill_seconds:.2f} s",
        f"total {answer.total_seconds:.2f} s",
        f"{answer.completion_tokens} new tokens",
        f"ratio \u00d7{answer.compression_ratio}",
    ]
    if answer.finish_reason == "length":
        parts.append("stopped at max new tokens")
    return "\u26a1 " + " \u00b7 ".join(parts)


def document_panel(summary: dict[str, Any] | None, errors: Sequence[str] = ()) -> str:
    """The panel next to the upload: each document, then pages, tokens, ratio, memory, time."""
    lines: list[str] = []
    if not summary or not summary.get("documents"):
        lines.append("*No documents yet: upload PDF or text files.*")
    else:
        documents = summary["documents"]
        lines.append("| document | pages | characters |\n|---|---:|---:|")
        lines += [
            f"| {escape_markdown(d['name'])} | {d['pages']:,} | {d['characters']:,} |"
            for d in documents
        ]
        rows = [("pages", f"{summary['pages']:,}")]
        if summary.get("tokens") is not None:
            rows.append(("tokens", f"{summary['tokens']:,}"))
        if summary.get("compression_ratio") is not None:
            how = summary.get("ratio_setting", "auto")
            rows.append(("compression ratio", f"\u00d7{summary['compression_ratio']} ({how})"))
        if summary.get("memory_bytes") is not None:
            rows.append(
                (
                    "condensed memory",
                    f"{human_bytes(summary['memory_bytes'])} "
                    f"({summary['memory_entries']:,} entries per layer)",
                )
            )
        if summary.get("extract_seconds") is not None:
            rows.append(("text extraction", f"{summary['extract_seconds']:.2f} s"))
        if summary.get("condense_seconds") is not None:
            cached = summary.get("cached_tokens") or 0
            note = f" (from cache: {cached:,} tokens)" if cached else ""
            rows.append(("condensing", f"{summary['condense_seconds']:.2f} s{note}"))
        if summary.get("fits") is False:
            rows.append(("fits the model", "no: questions fail; summaries go section by section"))
        lines.append("\n" + "\n".join(f"- **{k}**: {v}" for k, v in rows))
        if summary.get("state"):
            lines.append(f"\n*{summary['state']}*")
    lines += [f"\n\u26a0\ufe0f {escape_markdown(e)}" for e in errors]
    return "\n".join(lines)


def page_excerpts(documents: Sequence[Any], labels: Sequence[str], width: int = 280) -> str:
    """The start of each cited page (by label), for the collapsible 'cited pages' message."""
    blocks = []
    for label in labels:
        for document in documents:
            for page in document.pages:
                if str(page.label).lower() == label:
                    text = " ".join(page.text.split())
                    excerpt = text[:width] + ("\u2026" if len(text) > width else "")
                    where = f"{document.name}, page {page.label}"
                    blocks.append(f"**{escape_markdown(where)}**: {escape_markdown(excerpt)}")
    return "\n\n".join(blocks)


def chat_messages(exchanges: Sequence[Any], documents: Sequence[Any]) -> list[dict[str, Any]]:
    """Chatbot messages (openai-style dicts) for the session's exchanges."""
    messages: list[dict[str, Any]] = []
    for exchange in exchanges:
        messages.append({"role": "user", "content": exchange.shown_question})
        if exchange.error:
            messages.append({"role": "assistant", "content": f"\u26a0\ufe0f {exchange.error}"})
            continue
        text = exchange.answer
        if exchange.status == "running" and not text:
            text = exchange.progress or "\u2026"
        body = render_citations(text)
        if exchange.status == "stopped":
            body += "\n\n*(stopped)*"
        if exchange.stats:
            body += f"\n\n<sub>{exchange.stats}</sub>"
        messages.append({"role": "assistant", "content": body})
        labels = cited_pages(exchange.answer) if exchange.status != "running" else []
        excerpts = page_excerpts(documents, labels) if labels else ""
        if excerpts:
            messages.append(
                {
                    "role": "assistant",
                    "content": excerpts,
                    "metadata": {
                        "title": "Cited pages: " + ", ".join(labels),
                        "status": "done",
                    },
                }
            )
    return messages
