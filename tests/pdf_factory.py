"""PDFs for tests, made on the spot: real multi-page PDFs with known text, and hostile ones.

`make_pdf` (fpdf2) is the one most tests want: one page per string, optionally with page labels,
title/author and AES-256 encryption. The others build what fpdf2 will not: thousands of blank
pages (`make_blank_pdf`), a decompression bomb (`make_bomb_pdf`), image-only "scanned" pages
(`make_scanned_pdf`) and pages with arbitrary content streams (`make_raw_pdf`). All of them are
cheap: even the 2 GiB bomb is written in milliseconds.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FONT = b"<< /Font << /F1 << /Type /Font /Subtype /Type1 /BaseFont /Helvetica >> >> >>"


def make_pdf(
    path: str | Path,
    pages: Sequence[str],
    *,
    user_password: str | None = None,
    owner_password: str = "owner",
    labels: Mapping[int, Mapping[str, Any]] | None = None,
    title: str | None = None,
    author: str | None = None,
) -> Path:
    """Write a PDF with one page per string (Helvetica, so Latin-1 text only).

    pypdf gives each page's text back exactly when its lines fit the page width and there are
    no blank lines (pypdf drops those). `labels` maps a 1-based page number to
    `FPDF.set_page_label` arguments, which apply from that page on, e.g.
    `{1: {"label_style": "r"}, 3: {"label_style": "D", "label_start": 1}}` labels the pages
    i, ii, 1, 2, ... `user_password` encrypts with AES-256 ("" opens without a password).
    """
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("helvetica", size=11)
    for number, text in enumerate(pages, start=1):
        pdf.add_page()
        if labels and number in labels:
            pdf.set_page_label(**labels[number])
        pdf.multi_cell(0, 6, text)
    if title is not None:
        pdf.set_title(title)
    if author is not None:
        pdf.set_author(author)
    if user_password is not None:
        from fpdf.enums import EncryptionMethod

        pdf.set_encryption(
            owner_password=owner_password,
            user_password=user_password,
            encryption_method=EncryptionMethod.AES_256,
        )
    path = Path(path)
    pdf.output(str(path))
    return path


def make_blank_pdf(path: str | Path, count: int) -> Path:
    """Write a PDF of `count` empty pages (pypdf's writer: 3000 pages take well under a second)."""
    from pypdf import PdfWriter

    writer = PdfWriter()
    for _ in range(count):
        writer.add_blank_page(width=612, height=792)
    buffer = io.BytesIO()
    writer.write(buffer)
    path = Path(path)
    path.write_bytes(buffer.getvalue())
    return path


def make_raw_pdf(
    path: str | Path, contents: Sequence[bytes], *, compress: bool = True, resources: bytes = FONT
) -> Path:
    """Write a PDF whose pages have exactly these content streams (Helvetica as /F1).

    With `compress=True` each stream is deflated here and marked /FlateDecode.
    """
    streams = [(zlib.compress(c) if compress else c, compress) for c in contents]
    return _write_pages(path, streams, resources)


def make_bomb_pdf(path: str | Path, inflated_bytes: int = 2 << 30) -> Path:
    """Write a one-page PDF (about 1 KiB per MiB inflated) whose content stream inflates to
    `inflated_bytes` of zeros: 2 GiB by default, from a 2 MiB file.

    The zlib stream is assembled, not compressed: after a full flush a deflate block of 1 MiB of
    zeros never refers back, so the same block repeats; the Adler-32 of n zeros is `n % 65521`
    in its high half and 1 in the low half.
    """
    chunk = bytes(1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: header and checksum by hand
    block = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    blocks = inflated_bytes // len(chunk)
    checksum = (blocks * len(chunk)) % 65521 << 16 | 1
    stream = b"\x78\xda" + block * blocks + b"\x03\x00" + struct.pack(">I", checksum)
    return _write_pages(path, [(stream, True)], FONT)


def make_scanned_pdf(path: str | Path, pages: int = 2) -> Path:
    """Write a PDF whose pages only draw an image (a 2x2 grey bitmap): a scan without OCR."""
    image = (
        b"<< /Type /XObject /Subtype /Image /Width 2 /Height 2 /ColorSpace /DeviceGray"
        b" /BitsPerComponent 8 /Length 4 >>\nstream\n\x00\x80\x80\xff\nendstream"
    )
    draw = b"q 612 0 0 792 0 0 cm /Im1 Do Q"
    return _write_pages(path, [(draw, False)] * pages, b"<< /XObject << /Im1 %d 0 R >> >>", image)


def _write_pages(
    path: str | Path,
    streams: Sequence[tuple[bytes, bool]],
    resources: bytes,
    shared: bytes | None = None,
) -> Path:
    """Catalog, page tree, one page + content stream per entry of `streams`, and optionally one
    shared object (numbered last; `resources` may refer to it with `%d`)."""
    count = len(streams)
    shared_number = 3 + 2 * count
    if shared is not None:
        resources = resources % shared_number
    kids = b" ".join(b"%d 0 R" % (3 + 2 * i) for i in range(count))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, count),
    ]
    for index, (data, deflated) in enumerate(streams):
        page_number = 3 + 2 * index
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources %s"
            b" /Contents %d 0 R >>" % (resources, page_number + 1)
        )
        flate = b" /Filter /FlateDecode" if deflated else b""
        objects.append(b"<< /Length %d%s >>\nstream\n%s\nendstream" % (len(data), flate, data))
    if shared is not None:
        objects.append(shared)
    path = Path(path)
    path.write_bytes(_pdf_file(objects))
    return path


def _pdf_file(objects: Sequence[bytes]) -> bytes:
    """A PDF file of numbered objects (1 is the catalog) with a correct cross-reference table."""
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)
