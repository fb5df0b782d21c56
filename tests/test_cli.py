"""The command line: output, streaming, exit codes and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from beacon_apps.beacon.tiny import write_tiny_model
from beacon_apps.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("cli-model"))


@pytest.fixture()
def document(tmp_path) -> Path:
    from pdf_factory import make_pdf

    path = tmp_path / "notes.pdf"
    make_pdf(
        path, [f"Page {i} of the notes talks about topic number {i}. " * 6 for i in range(1, 6)]
    )
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_prints_the_numbers(capsys, model_dir, document, tmp_path):
    code, out, _ = run(capsys, "info", str(document), "--model", str(model_dir), "--no-cache")
    assert code == 0
    assert "pages: 5" in out and "compression ratio" in out and "tokens" in out


def test_ask_streams_an_answer_and_reuses_the_disk_cache(capsys, model_dir, document, tmp_path):
    args = [
        "--model",
        str(model_dir),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--max-new-tokens",
        "8",
    ]
    code, out, err = run(capsys, "ask", str(document), "What is page 2 about?", *args)
    assert code == 0 and out.endswith("\n") and "Traceback" not in err
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    code, out_again, _ = run(capsys, "-v", "ask", str(document), "What is page 2 about?", *args)
    assert code == 0 and out_again == out


def test_summarize(capsys, model_dir, document):
    args = ["--model", str(model_dir), "--no-cache", "--max-new-tokens", "6", "--length", "short"]
    code, out, _ = run(capsys, "summarize", str(document), *args)
    assert code == 0 and out.endswith("\n")


def test_chat_reads_questions_until_an_empty_line(monkeypatch, capsys, model_dir, document):
    answers = iter(["What is page 1 about?", "And page 3?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    code, out, _ = run(
        capsys,
        "chat",
        str(document),
        "--model",
        str(model_dir),
        "--no-cache",
        "--max-new-tokens",
        "4",
    )
    assert code == 0 and out.count("beacon> ") == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ask", "missing.pdf", "why?"], "missing.pdf"),
        (["ask", "only-a-question"], "give one or more files"),
        (["info", "DOC", "--model", "/nonexistent/model"], "/nonexistent/model"),
        (["info", "DOC", "--ratio", "lots"], "--ratio"),
        (["ask", "DOC", "Q", "--ratio", "3"], "ratio"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(capsys, model_dir, document, argv, message):
    argv = [str(document) if a == "DOC" else a for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(model_dir)]
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("beacon-apps: ")


def test_offline_default_model_is_the_bundled_demo_and_says_so(
    capsys, caplog, document, monkeypatch, tmp_path
):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("BEACON_APPS_MODEL", raising=False)
    code, out, _ = run(capsys, "info", str(document), "--no-cache")
    assert code == 0 and "tokens" in out
    said = caplog.text
    assert "namespace-Pt/beacon-qwen-2-7b-instruct" in said and "--model" in said
    assert "bundled demo model" in said


def test_console_script_entry_point(model_dir, document):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "beacon_apps.cli",
            "info",
            str(document),
            "--model",
            str(model_dir),
            "--no-cache",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "pages: 5" in result.stdout


def test_pypdf_warnings_do_not_flood_the_terminal(model_dir, tmp_path):
    from pdf_factory import make_pdf

    path = make_pdf(tmp_path / "repaired.pdf", ["Alpha page text.", "Beta page text."])
    data = path.read_bytes()
    at = data.rindex(b"startxref")
    path.write_bytes(data[:at] + b"startxref\n12\n%%EOF\n")  # a wrong pointer pypdf repairs
    command = [sys.executable, "-m", "beacon_apps.cli"]
    options = ["info", str(path), "--model", str(model_dir), "--no-cache"]
    quiet = subprocess.run([*command, *options], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "pages: 2" in quiet.stdout and "pypdf" not in quiet.stderr
    verbose = subprocess.run(
        [*command, "-v", *options], capture_output=True, text=True, timeout=300
    )
    assert "pypdf" in verbose.stderr  # -v still shows them
