"""PDFs with known text on known pages, made by the tests (fpdf2)."""

from __future__ import annotations

from pathlib import Path


def make_pdf(path: str | Path, pages: list[str], *, user_password: str | None = None) -> Path:
    """Write a PDF with one page per string; optionally AES-256 encrypted."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("helvetica", size=11)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 6, text)
    if user_password is not None:
        from fpdf.enums import EncryptionMethod

        pdf.set_encryption(
            owner_password="owner",
            user_password=user_password,
            encryption_method=EncryptionMethod.AES_256,
        )
    path = Path(path)
    pdf.output(str(path))
    return path
