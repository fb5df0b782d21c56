"""Files in, text with page numbers out: PDF (pypdf), plain text and Markdown.

Every page keeps its number and its label (the number printed on it, from the PDF's page labels)
so that answers can cite "[page xii]". Anything hostile or broken (an empty or truncated file, a
password, a decompression bomb, thousands of blank pages, binary junk, a scan without a text
layer) ends in one `DocumentError` naming the file, the problem and the page when known, within
`IngestLimits`: never a raw traceback, never a hang.

No model knowledge lives here: the engine decides what fits in a context.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PageHook = Callable[[int, int], None]
"""`on_page(done, total)`, called after each page is read (the CLI's tqdm, the app's progress)."""
Fail = Callable[..., "DocumentError"]  # fail(problem, page=None): the error for this file

SUPPORTED_EXTENSIONS = (
    ".pdf",
    ".txt",
    ".text",
    ".md",
    ".markdown",
    ".rst",
    ".csv",
    ".tsv",
    ".log",
    ".tex",
    ".org",
    ".adoc",
    ".json",
    ".yaml",
    ".yml",
    ".xml",
    ".html",
    ".htm",
)
"""What a file picker should offer. Other extensions are read too when the bytes are text."""

_TEXT_TYPES = {".md": "text/markdown", ".markdown": "text/markdown", ".rst": "text/x-rst"}


class DocumentError(ValueError):
    """One file could not be read. `str(error)` is "<name>: <problem>" plus " (page N)" when the
    page is known, ready to show to a user as it is."""

    def __init__(
        self, source: str, problem: str, page: int | None = None, *, name: str | None = None
    ) -> None:
        self.source = source  # the path as given, or the name of in-memory input
        self.name = name or source  # what users call the file
        self.problem = problem
        self.page = page
        where = f" (page {page})" if page is not None else ""
        super().__init__(f"{self.name}: {problem}{where}")

    def __reduce__(self):  # keyword-only `name` would otherwise be lost on pickling
        return _document_error, (self.source, self.problem, self.page, self.name)


def _document_error(source: str, problem: str, page: int | None, name: str) -> DocumentError:
    return DocumentError(source, problem, page, name=name)


@dataclass(frozen=True)
class Page:
    number: int  # 1-based physical page number
    text: str
    label: str  # the PDF's page label when it defines one, else str(number)


@dataclass
class Document:
    source: str  # the path as given (or the name for in-memory input)
    name: str  # the file name shown to users
    pages: list[Page]
    metadata: dict = field(default_factory=dict)  # flat: str/int/bool values only

    @property
    def num_pages(self) -> int:
        return len(self.pages)

    @property
    def num_chars(self) -> int:
        return sum(len(page.text) for page in self.pages)

    def text(self) -> str:
        """The whole text, each page after a "[page <label>]" line so answers can cite it.

        Blank pages keep their marker: the page count the model sees matches the file's.
        """
        return "\n\n".join(
            f"[page {page.label}]\n{page.text}" if page.text else f"[page {page.label}]"
            for page in self.pages
        )


@dataclass(frozen=True)
class IngestLimits:
    """Bounds on what one file may cost; past any of them the file is refused, not truncated,
    so that an answer never comes from a silently shortened document."""

    max_file_bytes: int = 200 * 2**20
    """Bigger than any text book or long scanned PDF; the bytes are held in memory while read."""
    max_pages: int = 5000
    """A very thick book; stops page trees that claim millions of pages."""
    max_chars: int = 20_000_000
    """About 5M tokens: far past any model's context, yet only some tens of MB of memory."""
    max_chars_per_page: int = 200_000
    """PDFs only (a text file without form feeds is one page). A dense page holds about 5,000
    characters; 40x that is a bomb or generated junk."""
    max_seconds_per_file: float = 120.0
    """pypdf reads 10-30 ms a page: a 1000-page book takes well under a minute. Checked between
    pages; within one page pypdf's own limits (stream sizes, 2M tokens per content stream)
    bound the work."""
    max_stream_bytes: int = 75_000_000
    """What one PDF stream may inflate to (pypdf's own default, pinned for the read so that a
    process-wide 0, meaning unlimited, cannot switch bomb protection off)."""


DEFAULT_LIMITS = IngestLimits()


def load_document(
    source: str | os.PathLike | bytes,
    *,
    name: str | None = None,
    limits: IngestLimits = DEFAULT_LIMITS,
    on_page: PageHook | None = None,
) -> Document:
    """Read one PDF or text file: a path, or the file's bytes (then `name` says what it is).

    A file is a PDF when it starts with the %PDF- header, whatever its name (a file named .pdf
    may have junk before it, as PDF readers allow); anything else is read as text, with its
    encoding detected. `name` (default: the file name) is what `Document.name` and every error
    message show, e.g. the original name of an uploaded temp file.
    """
    started = time.monotonic()
    data, source_text, name = _read_source(source, name, limits)
    suffix = Path(name).suffix.lower()
    if suffix == ".pdf":
        is_pdf = b"%PDF-" in data[:1024]
    else:  # a text file about PDFs may quote the header; it does not start with it
        is_pdf = data[:1024].lstrip().startswith(b"%PDF-")
    if not is_pdf and suffix == ".pdf":
        raise DocumentError(source_text, "not a PDF (it has no %PDF header)", name=name)

    def fail(problem: str, page: int | None = None) -> DocumentError:
        return DocumentError(source_text, problem, page, name=name)

    if is_pdf:
        pages, metadata = _read_pdf(data, fail, limits, on_page)
    else:
        pages, metadata = _read_text(data, suffix, fail, limits, on_page)
    metadata = {
        "file_type": "application/pdf" if is_pdf else _TEXT_TYPES.get(suffix, "text/plain"),
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        **metadata,
    }
    document = Document(source=source_text, name=name, pages=pages, metadata=metadata)
    logger.info(
        "read %s: %d pages, %d characters in %.2f s",
        name,
        document.num_pages,
        document.num_chars,
        time.monotonic() - started,
    )
    return document


def load_documents(
    sources: Iterable[str | os.PathLike | bytes] | str | os.PathLike,
    *,
    limits: IngestLimits = DEFAULT_LIMITS,
    on_page: PageHook | None = None,
) -> list[Document]:
    """Read several files, in order. The first one that fails raises its `DocumentError` (which
    names it): a question about five books must not be answered from four.

    `on_page` counts each file's pages from 1 again. Bytes inputs are all named "document";
    call `load_document` with `name=` to tell them apart.
    """
    if isinstance(sources, (str, bytes, os.PathLike)):
        sources = [sources]
    return [load_document(source, limits=limits, on_page=on_page) for source in sources]


def documents_text(documents: Sequence[Document]) -> str:
    """Several documents as one text, each after a "[document: <name>]" line."""
    return "\n\n".join(f"[document: {d.name}]\n{d.text()}" for d in documents)


# ---------------------------------------------------------------------------------- the bytes
def _read_source(
    source: str | os.PathLike | bytes, name: str | None, limits: IngestLimits
) -> tuple[bytes, str, str]:
    """The file's bytes, the source as given and the name to show; refuses what is not a file,
    is empty or is too big before reading it all."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "document"
        data, source_text = bytes(source), name
        size = len(data)
    else:
        source_text = os.fspath(source)
        if isinstance(source_text, bytes):
            source_text = os.fsdecode(source_text)
        path = Path(source_text)
        name = name or path.name or source_text

        def fail(problem: str) -> DocumentError:
            return DocumentError(source_text, problem, name=name)

        data = b""
        try:
            if path.is_dir():
                raise fail("is a directory, not a file")
            if not path.exists():
                raise fail(f"file not found ({source_text})")
            if not path.is_file():
                raise fail("not a regular file")
            size = path.stat().st_size
            if 0 < size <= limits.max_file_bytes:
                with path.open("rb") as file:  # at most one byte past the limit, even if it grew
                    data = file.read(limits.max_file_bytes + 1)
                size = len(data)
        except OSError as error:
            raise fail(f"cannot be read ({error.strerror or error})") from None
    if size == 0:
        raise DocumentError(source_text, "the file is empty", name=name)
    if size > limits.max_file_bytes:
        problem = f"the file is {_size(size)}; the limit is {_size(limits.max_file_bytes)}"
        raise DocumentError(source_text, problem, name=name)
    return data, source_text, name


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count} bytes"


# ---------------------------------------------------------------------------------- text files
_BOMS = (  # UTF-32 first: its little-endian BOM starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f\ufffd]")  # not \t \n \f \r
_SAMPLE = 65536


def _read_text(
    data: bytes, suffix: str, fail: Fail, limits: IngestLimits, on_page: PageHook | None
) -> tuple[list[Page], dict[str, Any]]:
    """Text split into pages at form feeds (as `pdftotext` writes them), else one page."""
    if len(data) > 4 * limits.max_chars:  # even at 4 bytes a character, too long
        raise fail(f"more than {limits.max_chars} characters of text")
    text, encoding = _decode(data)
    sample = text[:_SAMPLE]
    if len(_NOT_TEXT.findall(sample)) > 0.05 * len(sample):  # control characters: binary
        unsupported = suffix and suffix not in SUPPORTED_EXTENSIONS
        hint = f" ({suffix} files are not supported)" if unsupported else ""
        raise fail(f"looks like binary data, not text{hint}")
    if len(text) > limits.max_chars:
        raise fail(f"{len(text)} characters of text; the limit is {limits.max_chars}")
    chunks = text.replace("\r\n", "\n").replace("\r", "\n").split("\f")
    if len(chunks) > 1 and not chunks[-1].strip():
        chunks.pop()  # a final form feed ends the last page; it starts no new one
    if len(chunks) > limits.max_pages:
        raise fail(f"{len(chunks)} pages (form feeds); the limit is {limits.max_pages}")
    pages = []
    for number, chunk in enumerate(chunks, start=1):
        pages.append(Page(number, _tidy(chunk), str(number)))
        if on_page:
            on_page(number, len(chunks))
    if not any(page.text for page in pages):
        raise fail("no text (only white space)")
    return pages, {"encoding": encoding}


def _decode(data: bytes) -> tuple[str, str]:
    """The text and the encoding it was read with: a BOM, else UTF-16 recognised by its NUL
    bytes, else UTF-8 (even with a few stray bytes), else Windows' cp1252, which never fails."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data[len(bom) :].decode(encoding, errors="replace"), encoding
    sample = data[: _SAMPLE & ~1]
    half = len(sample) // 2
    even_nuls, odd_nuls = sample[0::2].count(0), sample[1::2].count(0)
    if odd_nuls > 0.4 * half and even_nuls < 0.05 * half:  # "h\0i\0": ASCII-range UTF-16
        return data.decode("utf-16-le", errors="replace"), "utf-16-le"
    if even_nuls > 0.4 * half and odd_nuls < 0.05 * half:
        return data.decode("utf-16-be", errors="replace"), "utf-16-be"
    text = data.decode("utf-8", errors="replace")
    broken = text.count("\ufffd") - data.count("\ufffd".encode())
    non_ascii = len(text) - len(text.encode("ascii", errors="ignore"))
    if broken <= 0.05 * non_ascii:  # cp1252 text has a broken sequence at every accent
        return text, "utf-8"
    return data.decode("cp1252", errors="replace"), "cp1252"


def _tidy(text: str) -> str:
    """Light clean-up only: no trailing white space on lines, at most two blank lines in a row,
    no blank lines at either end. Everything else stays as extracted."""
    text = re.sub(r"[^\S\n]+$", "", text, flags=re.MULTILINE)
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n")


# ---------------------------------------------------------------------------------- PDF files
def _read_pdf(
    data: bytes, fail: Fail, limits: IngestLimits, on_page: PageHook | None
) -> tuple[list[Page], dict[str, Any]]:
    """Each page's `extract_text()`, with pypdf's stream limits pinned for the whole read."""
    import pypdf
    from pypdf.errors import DependencyError

    deadline = time.monotonic() + limits.max_seconds_per_file
    with _pypdf_limits(pypdf, limits):
        try:
            reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
            encrypted = reader.is_encrypted
            if encrypted and not reader.decrypt(""):
                raise fail(
                    "is protected by a password; it needs a password to open"
                    " (save a copy without one and try again)"
                )
            total = len(reader.pages)
        except DependencyError:
            raise fail(
                "is encrypted with AES; reading it needs the 'cryptography' package"
                " (pip install 'pypdf[crypto]')"
            ) from None
        except DocumentError:
            raise
        except Exception as error:
            problem = _pdf_problem(error, limits, "not a readable PDF")
            if b"%%EOF" not in data[-2048:]:
                problem += "; the file looks truncated (no %%EOF at its end)"
            raise fail(problem) from None
        if total == 0:
            raise fail("the PDF has no pages")
        if total > limits.max_pages:
            raise fail(f"{total} pages; the limit is {limits.max_pages}")
        labels = _page_labels(reader, total)

        pages: list[Page] = []
        chars = 0
        scanned = False  # a page without text that draws an image
        for index in range(total):
            number = index + 1
            if time.monotonic() > deadline:
                seconds = limits.max_seconds_per_file
                raise fail(f"reading took longer than {seconds:g} s", number)  # page not read
            try:
                page = reader.pages[index]
                text = _tidy(page.extract_text() or "")
                if not text and not scanned:
                    scanned = _draws_images(page)
            except Exception as error:
                raise fail(_pdf_problem(error, limits, "cannot extract text"), number) from None
            if len(text) > limits.max_chars_per_page:
                raise fail(
                    f"{len(text)} characters on one page; the limit is {limits.max_chars_per_page}",
                    number,
                )
            chars += len(text)
            if chars > limits.max_chars:
                raise fail(f"more than {limits.max_chars} characters of text", number)
            pages.append(Page(number, text, labels[index]))
            if on_page:
                on_page(number, total)

    if not chars:
        raise fail(
            "no extractable text: no text layer; it looks scanned — OCR it first"
            if scanned
            else "no extractable text"
        )
    blank = sum(1 for page in pages if not page.text)
    if blank:
        logger.info("%d of %d pages have no text (images or scans?)", blank, total)
    return pages, {**_pdf_info(reader), "encrypted": encrypted}


@contextlib.contextmanager
def _pypdf_limits(pypdf: Any, limits: IngestLimits) -> Iterator[None]:
    """pypdf's per-stream limits set to `limits.max_stream_bytes` for this thread, for now."""
    apply = getattr(pypdf, "apply_configuration", None)
    if apply is None:  # pypdf < 7: fixed module-level limits (75 MB per stream) of its own
        yield
        return
    current = pypdf.get_configuration()
    names = (
        "maximum_declared_stream_length",
        "array_based_stream_maximum_output_length",
        "zlib_maximum_output_length",
        "lzw_maximum_output_length",
        "run_length_maximum_output_length",
        "brotli_maximum_output_length",
        "jbig2_maximum_output_length",
    )
    with apply(**{n: limits.max_stream_bytes for n in names if hasattr(current, n)}):
        yield


def _pdf_problem(error: Exception, limits: IngestLimits, failed: str) -> str:
    """pypdf's exception in words: "<failed> (<exception>)", or what a safety limit stopped."""
    from pypdf.errors import LimitReachedError

    if isinstance(error, LimitReachedError) and "decompress" in str(error).lower():
        megabytes = limits.max_stream_bytes / 1e6
        return f"a compressed stream inflates past {megabytes:g} MB (a decompression bomb?)"
    if isinstance(error, LimitReachedError):
        return f"too complex to read safely ({error})"
    return f"{failed} ({type(error).__name__}: {str(error)[:200]})"


def _page_labels(reader: Any, total: int) -> list[str]:
    """Each page's label, made safe for a "[page <label>]" line: one short line, no brackets.
    Pages whose label is missing or broken get their number."""
    try:
        labels = list(reader.page_labels)
    except Exception as error:
        logger.info("page labels ignored (%s: %s)", type(error).__name__, error)
        labels = []
    safe = []
    for number in range(1, total + 1):
        label = labels[number - 1] if number <= len(labels) else ""
        label = " ".join(str(label).replace("[", "").replace("]", "").split())[:32]
        safe.append(label or str(number))
    return safe


def _draws_images(page: Any) -> bool:
    """Whether a page has images (scans do); the image data itself is never decoded."""
    try:
        return len(page.images) > 0
    except Exception:
        return False


def _pdf_info(reader: Any) -> dict[str, str]:
    """Title and author when the PDF names them, on one line and not absurdly long."""
    try:
        info = reader.metadata
        found = {"title": info.title, "author": info.author} if info else {}
    except Exception:
        return {}
    cleaned = {key: " ".join(str(value).split())[:500] for key, value in found.items() if value}
    return {key: value for key, value in cleaned.items() if value}
