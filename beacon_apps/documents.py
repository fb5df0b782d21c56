"""Files in, text with page numbers out: PDF (pypdf), plain text and Markdown.

Each page keeps its number and label so answers can cite "[page 12]". Hostile or broken input
(empty, truncated, encrypted, decompression bombs, thousands of blank pages, binary junk, scans
without a text layer) gives one `DocumentError` that names the file and the problem, in bounded
time and memory. No model knowledge lives here.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

PageHook = Callable[[int, int], None]
TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text", ".csv", ".log", ".tex", ""}


class DocumentError(ValueError):
    """A file could not be read; the message names the file, the problem and the page if known."""

    def __init__(self, source: str, problem: str, page: int | None = None):
        self.source, self.problem, self.page = source, problem, page
        where = f" (page {page})" if page is not None else ""
        super().__init__(f"{source}: {problem}{where}")


@dataclass(frozen=True)
class Page:
    number: int  # 1-based physical page number
    text: str
    label: str  # the PDF's page label if it defines one, else str(number)


@dataclass
class Document:
    source: str
    name: str
    pages: list[Page]
    metadata: dict = field(default_factory=dict)

    @property
    def num_pages(self) -> int:
        return len(self.pages)

    @property
    def num_chars(self) -> int:
        return sum(len(page.text) for page in self.pages)

    def text(self) -> str:
        """The whole text, each page preceded by a "[page N]" marker line."""
        return "\n\n".join(f"[page {page.label}]\n{page.text}" for page in self.pages)


@dataclass(frozen=True)
class IngestLimits:
    """Bounds that keep hostile files from exhausting time or memory."""

    max_file_bytes: int = 200 << 20
    max_pages: int = 5000
    max_chars: int = 20_000_000
    max_chars_per_page: int = 200_000
    max_seconds_per_file: float = 120.0


def documents_text(documents: Sequence[Document]) -> str:
    """Several documents as one text, each under a "[document: name]" header."""
    return "\n\n".join(f"[document: {d.name}]\n{d.text()}" for d in documents)


def load_documents(
    sources: Sequence[str | os.PathLike | bytes],
    *,
    limits: IngestLimits = IngestLimits(),
    on_page: PageHook | None = None,
) -> list[Document]:
    """Load several files; the first failure raises, naming its file (nothing dropped silently)."""
    return [load_document(source, limits=limits, on_page=on_page) for source in sources]


def load_document(
    source: str | os.PathLike | bytes,
    *,
    name: str | None = None,
    limits: IngestLimits = IngestLimits(),
    on_page: PageHook | None = None,
) -> Document:
    """Read one PDF or text file (a path, or its bytes with `name`) into a `Document`."""
    data, label, suffix = _read_bytes(source, name, limits)
    if not data:
        raise DocumentError(label, "the file is empty")
    is_pdf = data[:1024].lstrip().startswith(b"%PDF") or suffix == ".pdf"
    if is_pdf:
        pages, metadata = _read_pdf(data, label, limits, on_page)
    else:
        pages, metadata = _read_text(data, label, limits, on_page)
    if not any(page.text.strip() for page in pages):
        problem = (
            "no extractable text: no text layer; it looks scanned — OCR it first"
            if metadata.get("images")
            else "no extractable text"
        )
        raise DocumentError(label, problem)
    if sum(len(p.text) for p in pages) > limits.max_chars:
        raise DocumentError(label, f"more than {limits.max_chars} characters of text")
    metadata.update({"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
    metadata.pop("images", None)
    source_text = label if isinstance(source, bytes) else str(source)
    return Document(source=source_text, name=label, pages=pages, metadata=metadata)


def _read_bytes(source, name, limits: IngestLimits) -> tuple[bytes, str, str]:
    if isinstance(source, bytes):
        label = name or "document"
        if len(source) > limits.max_file_bytes:
            raise DocumentError(label, f"larger than {limits.max_file_bytes >> 20} MiB")
        return source, label, Path(label).suffix.lower()
    path = Path(source)
    label = name or path.name or str(path)
    if not path.exists():
        raise DocumentError(str(path), "no such file")
    if path.is_dir():
        raise DocumentError(str(path), "is a folder, not a file")
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise DocumentError(
            label, f"larger than {limits.max_file_bytes >> 20} MiB ({size >> 20} MiB)"
        )
    try:
        return path.read_bytes(), label, path.suffix.lower()
    except OSError as error:
        raise DocumentError(label, f"cannot be read: {error.strerror or error}") from None


# ---------------------------------------------------------------------- text
def _decode(data: bytes, label: str) -> str:
    boms = [
        (b"\xff\xfe\x00\x00", "utf-32-le"),
        (b"\x00\x00\xfe\xff", "utf-32-be"),
        (b"\xef\xbb\xbf", "utf-8-sig"),
        (b"\xff\xfe", "utf-16-le"),
        (b"\xfe\xff", "utf-16-be"),
    ]
    for bom, encoding in boms:
        if data.startswith(bom):
            return data[len(bom) :].decode(encoding, errors="replace")
    sample = data[:4096]
    if sample and sample.count(0) > len(sample) // 4:
        even, odd = sample[0::2].count(0), sample[1::2].count(0)
        if odd > len(sample) // 3 and even < len(sample) // 20:
            return data.decode("utf-16-le", errors="replace")
        if even > len(sample) // 3 and odd < len(sample) // 20:
            return data.decode("utf-16-be", errors="replace")
        raise DocumentError(label, "looks like binary data, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")
    control = sum(1 for ch in text[:20000] if ord(ch) < 32 and ch not in "\t\n\r\f")
    if control > len(text[:20000]) // 20:
        raise DocumentError(label, "looks like binary data, not text")
    return text


def _read_text(data: bytes, label: str, limits: IngestLimits, on_page) -> tuple[list[Page], dict]:
    text = _decode(data, label).replace("\r\n", "\n").replace("\r", "\n")
    chunks = text.split("\f") if "\f" in text else [text]
    if len(chunks) > limits.max_pages:
        raise DocumentError(label, f"more than {limits.max_pages} pages")
    pages = []
    for number, chunk in enumerate(chunks, start=1):
        pages.append(Page(number, _tidy(chunk), str(number)))
        if on_page:
            on_page(number, len(chunks))
    return pages, {"type": "text"}


def _tidy(text: str) -> str:
    lines = [line.rstrip() for line in text.split("\n")]
    out: list[str] = []
    blank = 0
    for line in lines:
        blank = blank + 1 if not line else 0
        if blank <= 2:
            out.append(line)
    return "\n".join(out).strip("\n")


# ---------------------------------------------------------------------- PDF
def _read_pdf(data: bytes, label: str, limits: IngestLimits, on_page) -> tuple[list[Page], dict]:
    import pypdf
    # pypdf 7 bounds decompression itself (`pypdf.Configuration`: 75 MB per stream by default)
    started = time.monotonic()
    try:
        reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                ok = reader.decrypt("")
            except Exception as error:  # unsupported algorithm, missing crypto library
                raise DocumentError(
                    label, f"encrypted in a way that cannot be opened ({error})"
                ) from None
            if not ok:
                raise DocumentError(
                    label,
                    "is password-protected; open it with its password and save an unprotected copy",
                )
        total = len(reader.pages)
    except DocumentError:
        raise
    except Exception as error:
        raise DocumentError(
            label, f"not a readable PDF ({type(error).__name__}: {error})"
        ) from None
    if total == 0:
        raise DocumentError(label, "the PDF has no pages")
    if total > limits.max_pages:
        raise DocumentError(label, f"{total} pages; the limit is {limits.max_pages}")
    try:
        labels = list(reader.page_labels)
    except Exception:
        labels = []
    pages: list[Page] = []
    images = 0
    empty_run = 0
    for index in range(total):
        if time.monotonic() - started > limits.max_seconds_per_file:
            raise DocumentError(
                label, f"text extraction took over {limits.max_seconds_per_file:.0f}s", index + 1
            )
        try:
            page = reader.pages[index]
            text = page.extract_text() or ""
            if not text.strip():
                images += _has_images(page)
        except DocumentError:
            raise
        except Exception as error:
            raise DocumentError(
                label, f"cannot extract text ({type(error).__name__}: {error})", index + 1
            ) from None
        if len(text) > limits.max_chars_per_page:
            raise DocumentError(
                label, f"over {limits.max_chars_per_page} characters on one page", index + 1
            )
        empty_run = empty_run + 1 if not text.strip() else 0
        if empty_run >= 500 and not pages_have_text(pages):
            raise DocumentError(label, "no extractable text in the first 500 pages")
        page_label = labels[index] if index < len(labels) and labels[index] else str(index + 1)
        pages.append(Page(index + 1, _tidy(text), page_label))
        if on_page:
            on_page(index + 1, total)
    metadata = {"type": "pdf", "pages": total, "images": images}
    info = _pdf_info(reader)
    metadata.update(info)
    return pages, metadata


def pages_have_text(pages: list[Page]) -> bool:
    return any(page.text.strip() for page in pages)


def _has_images(page) -> int:
    try:
        resources = page.get("/Resources") or {}
        xobjects = resources.get("/XObject") or {}
        return int(any(xobjects[k].get_object().get("/Subtype") == "/Image" for k in xobjects))
    except Exception:
        return 0


def _pdf_info(reader) -> dict:
    try:
        info = reader.metadata or {}
    except Exception:
        return {}
    out = {}
    for key, name in (("/Title", "title"), ("/Author", "author")):
        value = info.get(key)
        if value:
            out[name] = str(value)
    return out
