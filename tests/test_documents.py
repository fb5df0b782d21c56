"""Document ingestion: real PDFs and text files made here, hostile ones included; all offline.

Texts are compared exactly where the maths says they are equal; every error must name the file
and say what is wrong with it, as one `DocumentError`.
"""

from __future__ import annotations

import codecs
import hashlib
import pickle
import random
import time
import tracemalloc

import pypdf
import pytest
from pdf_factory import make_blank_pdf, make_bomb_pdf, make_pdf, make_raw_pdf, make_scanned_pdf

from beacon_apps.documents import (
    SUPPORTED_EXTENSIONS,
    Document,
    DocumentError,
    IngestLimits,
    Page,
    documents_text,
    load_document,
    load_documents,
)

PAGES = [
    "Alpha is on the first page.\nIt has a second line.",
    "Beta is on page two: 2 + 2 = 4 (checked).",
    "Gamma closes the book on page three.",
]
JUNK = random.Random(0).randbytes(8192)


def expected_text(labelled_pages: list[tuple[str, str]]) -> str:
    return "\n\n".join(f"[page {label}]\n{text}" for label, text in labelled_pages)


def problem(error: pytest.ExceptionInfo[DocumentError]) -> str:
    return str(error.value)


# ---------------------------------------------------------------------------------- PDF
def test_pdf_pages_keep_their_text_numbers_and_markers(tmp_path):
    path = make_pdf(tmp_path / "three.pdf", PAGES)
    document = load_document(path)

    assert [page.text for page in document.pages] == PAGES
    assert [(page.number, page.label) for page in document.pages] == [(1, "1"), (2, "2"), (3, "3")]
    assert document.text() == expected_text([("1", PAGES[0]), ("2", PAGES[1]), ("3", PAGES[2])])
    assert document.num_pages == 3
    assert document.num_chars == sum(len(text) for text in PAGES)
    assert document.source == str(path) and document.name == "three.pdf"
    data = path.read_bytes()
    assert document.metadata == {
        "file_type": "application/pdf",
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "encrypted": False,
    }


def test_source_is_the_path_as_given(tmp_path, monkeypatch):
    make_pdf(tmp_path / "three.pdf", PAGES)
    monkeypatch.chdir(tmp_path)
    assert load_document("three.pdf").source == "three.pdf"


def test_pdf_page_labels_are_the_markers(tmp_path):
    labels = {
        1: {"label_style": "r"},
        3: {"label_style": "D", "label_prefix": "A-", "label_start": 1},
    }
    texts = ["Preface.", "Foreword.", "Chapter one.", "Chapter two."]
    document = load_document(make_pdf(tmp_path / "labelled.pdf", texts, labels=labels))

    assert [page.label for page in document.pages] == ["i", "ii", "A-1", "A-2"]
    assert [page.number for page in document.pages] == [1, 2, 3, 4]
    assert document.text() == expected_text(
        list(zip(["i", "ii", "A-1", "A-2"], texts, strict=True))
    )


def test_pdf_title_and_author_in_metadata(tmp_path):
    path = make_pdf(tmp_path / "meta.pdf", PAGES, title="The Keeper", author="A. Writer")
    metadata = load_document(path).metadata
    assert metadata["title"] == "The Keeper" and metadata["author"] == "A. Writer"


def test_pdf_from_bytes(tmp_path):
    data = make_pdf(tmp_path / "three.pdf", PAGES).read_bytes()
    named = load_document(data, name="upload.pdf")
    assert named.name == named.source == "upload.pdf"
    assert [page.text for page in named.pages] == PAGES
    unnamed = load_document(data)  # recognised by its %PDF header
    assert unnamed.name == "document" and unnamed.metadata["file_type"] == "application/pdf"


def test_a_pdf_under_another_name_is_still_a_pdf(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(make_pdf(tmp_path / "three.pdf", PAGES).read_bytes())
    document = load_document(path)
    assert document.metadata["file_type"] == "application/pdf"
    assert [page.text for page in document.pages] == PAGES


def test_text_that_quotes_the_pdf_header_is_text(tmp_path):
    path = tmp_path / "format.md"
    path.write_text("# PDF files\n\nEvery PDF starts with %PDF-1.7 on its first line.\n")
    document = load_document(path)
    assert document.metadata["file_type"] == "text/markdown"
    assert (
        document.pages[0].text == "# PDF files\n\nEvery PDF starts with %PDF-1.7 on its first line."
    )


def test_on_page_reports_progress(tmp_path):
    calls = []
    load_document(make_pdf(tmp_path / "three.pdf", PAGES), on_page=lambda *a: calls.append(a))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_an_exception_from_on_page_is_not_disguised(tmp_path):
    class Cancelled(Exception):
        pass

    def cancel(done: int, total: int) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        load_document(make_pdf(tmp_path / "three.pdf", PAGES), on_page=cancel)


def test_aes256_pdf_with_an_empty_user_password_opens(tmp_path):
    document = load_document(make_pdf(tmp_path / "aes.pdf", PAGES, user_password=""))
    assert [page.text for page in document.pages] == PAGES
    assert document.metadata["encrypted"] is True


def test_pdf_with_a_user_password_says_it_needs_one(tmp_path):
    path = make_pdf(tmp_path / "locked.pdf", PAGES, user_password="hunter2")
    with pytest.raises(DocumentError) as error:
        load_document(path)
    assert problem(error).startswith("locked.pdf: is protected by a password; it needs a password")
    assert error.value.source == str(path) and error.value.page is None


# ---------------------------------------------------------------------------------- hostile PDFs
def test_truncated_pdf(tmp_path):
    data = make_pdf(tmp_path / "whole.pdf", PAGES * 5).read_bytes()
    path = tmp_path / "half.pdf"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DocumentError) as error:
        load_document(path)
    assert problem(error).startswith("half.pdf: not a readable PDF (")
    assert problem(error).endswith("the file looks truncated (no %%EOF at its end)")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (JUNK, "junk.pdf: not a PDF (it has no %PDF header)"),
        (b"%PDF-1.7\n" + JUNK, "junk.pdf: not a readable PDF ("),
    ],
)
def test_binary_junk_named_pdf(tmp_path, content, expected):
    path = tmp_path / "junk.pdf"
    path.write_bytes(content)
    with pytest.raises(DocumentError, match="^junk.pdf: not a") as error:
        load_document(path)
    assert problem(error).startswith(expected)


def test_decompression_bomb_stops_early_in_bounded_memory(tmp_path):
    path = make_bomb_pdf(tmp_path / "bomb.pdf", inflated_bytes=2 << 30)  # 2 GiB from 2 MiB
    assert path.stat().st_size < 3 << 20
    started = time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(DocumentError) as error:
            load_document(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert problem(error) == (
        "bomb.pdf: a compressed stream inflates past 75 MB (a decompression bomb?) (page 1)"
    )
    assert error.value.page == 1
    assert peak < 400 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert time.monotonic() - started < 15


def test_stream_limit_is_ours_not_the_process_wide_one(tmp_path):
    path = make_bomb_pdf(tmp_path / "bomb.pdf", inflated_bytes=64 << 20)
    limits = IngestLimits(max_stream_bytes=8 << 20)
    with pypdf.apply_configuration(zlib_maximum_output_length=0):  # 0: unlimited
        with pytest.raises(DocumentError, match="inflates past 8.38861 MB"):
            load_document(path, limits=limits)


def test_thousands_of_blank_pages_fail_fast(tmp_path):
    path = make_blank_pdf(tmp_path / "blank.pdf", 3000)
    started = time.monotonic()
    with pytest.raises(DocumentError) as error:
        load_document(path)
    assert problem(error) == "blank.pdf: no extractable text"
    assert time.monotonic() - started < 10


def test_scanned_pdf_asks_for_ocr(tmp_path):
    with pytest.raises(DocumentError) as error:
        load_document(make_scanned_pdf(tmp_path / "scan.pdf", pages=3))
    assert problem(error) == (
        "scan.pdf: no extractable text: no text layer; it looks scanned — OCR it first"
    )


def test_reading_stops_at_the_time_limit(tmp_path):
    # Each page is one 400 kB string, about 0.3 s of parsing for pypdf.
    page = b"BT /F1 12 Tf 72 700 Td (" + b"A" * 400_000 + b") Tj ET"
    path = make_raw_pdf(tmp_path / "slow.pdf", [page] * 16)  # about 5 s of work
    limits = IngestLimits(max_seconds_per_file=0.5, max_chars_per_page=10**6)
    started = time.monotonic()
    with pytest.raises(DocumentError) as error:
        load_document(path, limits=limits)
    assert time.monotonic() - started < 5
    assert 2 <= error.value.page < 16
    assert problem(error) == f"slow.pdf: reading took longer than 0.5 s (page {error.value.page})"


def test_unexpected_pypdf_errors_name_the_page(tmp_path, monkeypatch):
    original = pypdf.PageObject.extract_text
    calls = []

    def extract_text(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pypdf.PageObject, "extract_text", extract_text)
    with pytest.raises(DocumentError) as error:
        load_document(make_pdf(tmp_path / "three.pdf", PAGES))
    assert problem(error) == "three.pdf: cannot extract text (RuntimeError: boom) (page 2)"
    assert (
        error.value.page == 2 and error.value.problem == "cannot extract text (RuntimeError: boom)"
    )


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (IngestLimits(max_pages=2), "three.pdf: 3 pages; the limit is 2"),
        (IngestLimits(max_chars=60), "three.pdf: more than 60 characters of text (page 2)"),
        (
            IngestLimits(max_chars_per_page=40),
            "three.pdf: 49 characters on one page; the limit is 40 (page 1)",
        ),
        (IngestLimits(max_file_bytes=1000), "three.pdf: the file is {size} bytes; the limit is"),
    ],
)
def test_pdf_limits(tmp_path, limits, expected):
    path = make_pdf(tmp_path / "three.pdf", PAGES)
    with pytest.raises(DocumentError) as error:
        load_document(path, limits=limits)
    assert problem(error).startswith(expected.format(size=path.stat().st_size))


def test_default_limits():
    limits = IngestLimits()
    assert limits.max_file_bytes == 200 * 2**20 and limits.max_pages == 5000
    assert limits.max_chars == 20_000_000 and limits.max_seconds_per_file == 120.0


# ---------------------------------------------------------------------------------- files
def test_empty_missing_and_directory(tmp_path):
    (tmp_path / "empty.pdf").write_bytes(b"")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "folder.pdf").mkdir()
    cases = {
        "empty.pdf": "empty.pdf: the file is empty",
        "empty.txt": "empty.txt: the file is empty",
        "folder.pdf": "folder.pdf: is a directory, not a file",
        "missing.pdf": f"missing.pdf: file not found ({tmp_path / 'missing.pdf'})",
    }
    for name, expected in cases.items():
        with pytest.raises(DocumentError) as error:
            load_document(tmp_path / name)
        assert problem(error) == expected
        assert error.value.source == str(tmp_path / name) and error.value.name == name
    with pytest.raises(DocumentError, match="^document: the file is empty$"):
        load_document(b"")


# ---------------------------------------------------------------------------------- text
TEXT = "Café – naïve “quotes” cost € 42.\nSecond line: Œuvre, Straße, über."  # cp1252 can too


@pytest.mark.parametrize(
    ("codec", "bom", "detected"),
    [
        ("utf-8", b"", "utf-8"),
        ("utf-8", codecs.BOM_UTF8, "utf-8-sig"),
        ("utf-16-le", codecs.BOM_UTF16_LE, "utf-16-le"),
        ("utf-16-be", codecs.BOM_UTF16_BE, "utf-16-be"),
        ("utf-32-le", codecs.BOM_UTF32_LE, "utf-32-le"),
        ("utf-32-be", codecs.BOM_UTF32_BE, "utf-32-be"),
        ("utf-16-le", b"", "utf-16-le"),
        ("utf-16-be", b"", "utf-16-be"),
        ("cp1252", b"", "cp1252"),
    ],
)
def test_text_encodings(tmp_path, codec, bom, detected):
    path = tmp_path / "notes.txt"
    path.write_bytes(bom + TEXT.encode(codec))
    document = load_document(path)
    assert [page.text for page in document.pages] == [TEXT]
    assert document.metadata["encoding"] == detected
    assert document.metadata["file_type"] == "text/plain"
    assert document.text() == f"[page 1]\n{TEXT}"


def test_utf8_with_a_stray_byte_stays_utf8(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes("Grüße aus Köln. ".encode() * 20 + b"\xff" + "Schön.".encode())
    document = load_document(path)
    assert document.metadata["encoding"] == "utf-8"
    assert document.pages[0].text == "Grüße aus Köln. " * 20 + "\ufffdSchön."


def test_form_feeds_split_pages(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("One.\fTwo.\f\fFour.\f\n", encoding="utf-8")
    document = load_document(path)
    assert [(p.number, p.label, p.text) for p in document.pages] == [
        (1, "1", "One."),
        (2, "2", "Two."),
        (3, "3", ""),
        (4, "4", "Four."),
    ]
    assert document.text() == "[page 1]\nOne.\n\n[page 2]\nTwo.\n\n[page 3]\n\n[page 4]\nFour."


def test_white_space_is_tidied_lightly(tmp_path):
    path = tmp_path / "messy.txt"
    path.write_bytes(b"\r\n  Title   \r\n\r\n\r\n\r\n\r\n\r\nBody\t \nline  two  \n\n\n")
    assert load_document(path).pages[0].text == "  Title\n\n\nBody\nline  two"


@pytest.mark.parametrize(
    ("name", "file_type"),
    [
        ("readme.md", "text/markdown"),
        ("readme.markdown", "text/markdown"),
        ("guide.rst", "text/x-rst"),
        ("notes.text", "text/plain"),
        ("chapter.unknownext", "text/plain"),
        ("NOEXTENSION", "text/plain"),
    ],
)
def test_markdown_rst_and_other_text(tmp_path, name, file_type):
    text = "# Title\n\nSome *emphasis* and a list:\n\n- one\n- two"
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    document = load_document(path)
    assert document.pages == [Page(1, text, "1")]
    assert document.metadata["file_type"] == file_type
    assert document.name == name


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("junk.txt", JUNK, "junk.txt: looks like binary data, not text"),
        ("zeros.txt", bytes(4096), "zeros.txt: looks like binary data, not text"),
        ("report.docx", b"PK\x03\x04" + JUNK, "report.docx: looks like binary data, not text"),
        ("blank.md", b" \n\t\r\n \n", "blank.md: no text (only white space)"),
    ],
)
def test_text_that_is_not_text(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DocumentError) as error:
        load_document(path)
    assert problem(error).startswith(expected)
    if name == "report.docx":
        assert problem(error).endswith("(.docx files are not supported)")


@pytest.mark.parametrize(
    ("limits", "content", "expected"),
    [
        (IngestLimits(max_chars=10), b"eleven char", "a.txt: 11 characters of text; the limit"),
        (IngestLimits(max_chars=10), b"x" * 41, "a.txt: more than 10 characters of text"),
        (IngestLimits(max_pages=2), b"1\f2\f3", "a.txt: 3 pages (form feeds); the limit is 2"),
        (IngestLimits(max_file_bytes=4), b"12345", "a.txt: the file is 5 bytes; the limit is 4"),
    ],
)
def test_text_limits(tmp_path, limits, content, expected):
    path = tmp_path / "a.txt"
    path.write_bytes(content)
    with pytest.raises(DocumentError) as error:
        load_document(path, limits=limits)
    assert problem(error).startswith(expected)


def test_text_progress_and_bytes_input():
    calls = []
    document = load_document(b"A\fB", name="memo.md", on_page=lambda *a: calls.append(a))
    assert calls == [(1, 2), (2, 2)]
    assert document.source == document.name == "memo.md"
    assert document.metadata["file_type"] == "text/markdown"


# ---------------------------------------------------------------------------------- several
def test_several_documents_and_their_headers(tmp_path):
    pdf = make_pdf(tmp_path / "a.pdf", PAGES[:2])
    (tmp_path / "b.md").write_text("# B\n\nMarkdown body.", encoding="utf-8")
    (tmp_path / "c.txt").write_bytes("Ü in cp1252: \xdc.".encode("cp1252"))
    calls = []
    documents = load_documents(
        [pdf, str(tmp_path / "b.md"), tmp_path / "c.txt"], on_page=lambda *a: calls.append(a)
    )

    assert [d.name for d in documents] == ["a.pdf", "b.md", "c.txt"]
    assert calls == [(1, 2), (2, 2), (1, 1), (1, 1)]
    assert documents_text(documents) == (
        f"[document: a.pdf]\n[page 1]\n{PAGES[0]}\n\n[page 2]\n{PAGES[1]}\n\n"
        "[document: b.md]\n[page 1]\n# B\n\nMarkdown body.\n\n"
        "[document: c.txt]\n[page 1]\nÜ in cp1252: Ü."
    )
    assert load_documents(pdf)[0].pages == documents[0].pages  # one path is fine too


def test_several_documents_fail_naming_the_bad_one(tmp_path):
    good = make_pdf(tmp_path / "good.pdf", PAGES)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(JUNK)
    with pytest.raises(DocumentError) as error:
        load_documents([good, bad, good])
    assert problem(error) == "bad.txt: looks like binary data, not text"
    assert error.value.source == str(bad)


def test_documents_text_of_hand_made_documents():
    pages = [Page(1, "First.", "i"), Page(2, "", "ii"), Page(3, "Third.", "1")]
    book = Document(source="x/book.txt", name="book.txt", pages=pages, metadata={})
    assert book.num_pages == 3 and book.num_chars == 12
    assert documents_text([book]) == (
        "[document: book.txt]\n[page i]\nFirst.\n\n[page ii]\n\n[page 1]\nThird."
    )
    assert documents_text([]) == ""


# ---------------------------------------------------------------------------------- errors
def test_document_error_shape():
    error = DocumentError("/tmp/up/x.pdf", "cannot extract text", 7, name="book.pdf")
    assert isinstance(error, ValueError)
    assert str(error) == "book.pdf: cannot extract text (page 7)"
    assert (error.source, error.name, error.problem, error.page) == (
        "/tmp/up/x.pdf",
        "book.pdf",
        "cannot extract text",
        7,
    )
    assert str(DocumentError("notes.txt", "the file is empty")) == "notes.txt: the file is empty"
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.source, copy.page) == (str(error), error.source, 7)


def test_supported_extensions_are_read(tmp_path):
    assert ".pdf" in SUPPORTED_EXTENSIONS and ".md" in SUPPORTED_EXTENSIONS
    for extension in SUPPORTED_EXTENSIONS:
        if extension != ".pdf":
            path = tmp_path / f"file{extension}"
            path.write_text("Plain words.", encoding="utf-8")
            assert load_document(path).pages[0].text == "Plain words."
