"""Write examples/python-reference-passkey.pdf: real text with one fact hidden in it.

    python scripts/make_demo_pdf.py [--topics 12] [--seed 7] [--out examples/...pdf]

The text is the Python Language Reference as it ships inside Python (`pydoc_data.topics`, PSF
licence), a few sections, one per page run; one sentence stating a pass key is hidden on a page in
the middle. The bundled demo model (issue: miniature paper) can only answer find-the-fact
questions, so this is the document the README's offline command asks about:
`beacon-apps ask examples/python-reference-passkey.pdf "What is the pass key?"`.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

TOPICS = [
    "if", "while", "for", "try", "with", "function", "class", "assignment", "import",
    "return", "raise", "break", "continue", "lambda", "booleans", "comparisons",
]  # fmt: skip
LINES_PER_PAGE = 48


def latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def write(out: Path, topics: int, seed: int) -> tuple[str, int]:
    import pydoc_data.topics

    from fpdf import FPDF

    rng = random.Random(seed)
    lines: list[str] = []
    for name in TOPICS[:topics]:
        lines.extend(pydoc_data.topics.topics[name].splitlines())
        lines.append("")
    pages = [lines[i : i + LINES_PER_PAGE] for i in range(0, len(lines), LINES_PER_PAGE)]
    key = str(rng.randint(10000, 99999))
    page = len(pages) // 2
    at = rng.randrange(5, LINES_PER_PAGE - 5)
    pages[page].insert(at, f"The pass key is {key}. Remember it. {key} is the pass key.")

    pdf = FPDF()
    pdf.set_title("The Python Language Reference (excerpt)")
    pdf.set_author("Python Software Foundation")
    pdf.set_font("Courier", size=8)
    for lines_of_page in pages:
        pdf.add_page()
        for line in lines_of_page:
            pdf.cell(0, 5, latin1(line[:110]), new_x="LMARGIN", new_y="NEXT")
    out.parent.mkdir(parents=True, exist_ok=True)
    pdf.output(str(out))
    return key, page + 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topics", type=int, default=6)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("examples/python-reference-passkey.pdf"))
    args = parser.parse_args()
    key, page = write(args.out, args.topics, args.seed)
    print(f"{args.out}: pass key {key} on page {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
