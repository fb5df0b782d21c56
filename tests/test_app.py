"""The web app: its gradio_client API, sessions, bad files, Stop, the model registry, launching.

A tiny random-weight model on CPU answers gibberish, so tests check the numbers and names the
app reports (documents, pages, cache reuse), never the text.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from pdf_factory import make_pdf

from beacon_apps.engine import BeaconEngine
from ui import render
from ui.app import add_app_arguments, build_app, launch_app, parse_auth, run_app
from ui.engines import CancelToken, EngineRegistry, ModelLoadError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a page

MAX_UPLOAD_MB = 1


def page_texts(topic: str, count: int) -> list[str]:
    return [
        f"Page {i} of the {topic} report discusses {topic} item {i}. " * 8
        for i in range(1, count + 1)
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> BeaconEngine:
    return BeaconEngine(tiny_model_dir())


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("app-docs")
    text = folder / "beta.txt"
    text.write_text("\n".join(page_texts("beta", 4)), encoding="utf-8")
    good = make_pdf(folder / "alpha.pdf", page_texts("alpha", 3))
    corrupt = folder / "corrupt.pdf"
    corrupt.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    junk = folder / "junk.pdf"
    junk.write_bytes(os.urandom(3000))
    empty = folder / "empty.txt"
    empty.write_bytes(b"")
    big = folder / "big.txt"
    big.write_text("too big " * (MAX_UPLOAD_MB * 2**20 // 8 + 1000), encoding="utf-8")
    return {
        "alpha": good,
        "beta": text,
        "gamma": make_pdf(folder / "gamma.pdf", page_texts("gamma", 5)),
        "corrupt": corrupt,
        "junk": junk,
        "empty": empty,
        "big": big,
    }


@pytest.fixture(scope="module")
def served(engine):
    demo = build_app(engine, max_upload_mb=MAX_UPLOAD_MB, max_new_tokens=24)
    _, url, share_url = launch_app(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo, url, share_url
    demo.close()


@pytest.fixture()
def client(served) -> Client:
    return Client(served[1], verbose=False)


def run(coroutine_or_generator):
    """Run a handler outside a server: a coroutine's result or an async generator's outputs."""

    async def collect():
        if hasattr(coroutine_or_generator, "__aiter__"):
            return [item async for item in coroutine_or_generator]
        return await coroutine_or_generator

    return asyncio.run(collect())


# ---------------------------------------------------------------------- launching
def test_binds_localhost_without_share_link(served):
    demo, url, share_url = served
    assert url.startswith("http://127.0.0.1:")
    assert demo.server_name == "127.0.0.1"
    assert not demo.share and share_url is None
    assert demo.max_file_size == MAX_UPLOAD_MB * 2**20
    address = non_loopback_address()
    if address:  # listening on 127.0.0.1 only: this machine's other address is refused
        with socket.socket() as probe, pytest.raises(OSError):
            probe.settimeout(2)
            probe.connect((address, demo.server_port))


def non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing address
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_run_app_defaults_and_options(monkeypatch, tiny_model_dir, tmp_path):
    import gradio as gr

    launched = {}
    monkeypatch.setattr(
        gr.Blocks, "launch", lambda self, **options: launched.update(options) or (None, "", None)
    )
    parser = argparse.ArgumentParser()
    add_app_arguments(parser)
    args = parser.parse_args(["--model", str(tiny_model_dir()), "--lazy", "--no-cache"])
    assert run_app(args) == 0
    assert launched["server_name"] == "127.0.0.1" and launched["share"] is False
    assert launched["auth"] is None and launched["max_file_size"] == 100 * 2**20

    logins = tmp_path / "logins"
    logins.write_text("# who may log in\nann:secret\nbob:pw:with:colons\n", encoding="utf-8")
    args = parser.parse_args(
        ["--model", str(tiny_model_dir()), "--lazy", "--no-cache", "--max-upload-mb", "5"]
        + ["--auth", "me:pw", "--auth", str(logins), "--port", "7999"]
    )
    assert run_app(args) == 0
    assert launched["auth"] == [("me", "pw"), ("ann", "secret"), ("bob", "pw:with:colons")]
    assert launched["max_file_size"] == 5 * 2**20 and launched["server_port"] == 7999
    with pytest.raises(ValueError, match="user:password"):
        parse_auth(["nopassword"])


def test_cli_app_command_uses_these_options(tiny_model_dir):
    from beacon_apps.cli import build_parser

    args = build_parser().parse_args(["app", "--model", str(tiny_model_dir())])
    assert args.host == "127.0.0.1" and args.share is False and args.auth is None
    assert args.max_upload_mb == 100


# ---------------------------------------------------------------------- the API
def test_named_endpoints_and_their_parameters(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(endpoints) == {"/upload", "/ask", "/summarize", "/reset"}
    names = {
        name: [(p["parameter_name"], p["parameter_has_default"]) for p in info["parameters"]]
        for name, info in endpoints.items()
    }
    assert names["/ask"] == [
        ("question", True),
        ("files", True),
        ("max_new_tokens", True),
        ("temperature", True),
        ("ratio", True),
    ]
    assert names["/upload"] == [("files", False), ("ratio", True)]
    assert [p[0] for p in names["/summarize"]][:2] == ["length", "files"]
    assert [r["label"] for r in endpoints["/ask"]["returns"]] == ["answer", "details"]


def test_upload_then_streamed_answers_then_summary(client, docs, engine):
    info = client.predict(files=[handle_file(docs["alpha"])], api_name="/upload")
    assert info["names"] == ["alpha.pdf"] and info["pages"] == 3
    assert info["tokens"] > 200 and info["fits"] is True
    assert info["compression_ratio"] in engine.beacon_config.beacon_ratio
    assert info["memory_bytes"] > 0 and info["memory_entries"] > 0
    assert info["extract_seconds"] >= 0 and info["condense_seconds"] >= 0

    job = client.submit(question="What does page 2 say?", max_new_tokens=400, api_name="/ask")
    outputs = list(job)
    answers = [answer for answer, details in outputs if details.get("stage") == "answering"]
    assert len(answers) >= 3, outputs  # streamed: several partial answers
    assert all(later.startswith(earlier) for earlier, later in pairwise(answers))
    answer, details = outputs[-1]
    assert details["done"] and details["documents"] == ["alpha.pdf"] and details["pages"] == 3
    assert details["completion_tokens"] > 0 and answer.startswith(answers[-1][:1])
    assert details["cached_tokens"] > 0  # the upload condensed it; the question reused that

    follow_up, details = client.predict(question="And page 3?", max_new_tokens=400, api_name="/ask")
    assert (
        details["cached_tokens"] > 0 and details["compression_ratio"] == info["compression_ratio"]
    )

    summary, details = client.predict(length="short", max_new_tokens=12, api_name="/summarize")
    assert isinstance(summary, str) and details["done"]
    assert 0 < details["completion_tokens"] <= 12 and details["documents"] == ["alpha.pdf"]
    assert details["cached_tokens"] > 0  # summaries start from the same condensed document


def test_ask_with_files_in_one_call_and_again_from_cache(client, docs):
    first, details = client.predict(
        question="Who is it about?", files=[handle_file(docs["gamma"])], api_name="/ask"
    )
    assert details["documents"] == ["gamma.pdf"] and details["pages"] == 5
    again, details_again = client.predict(
        question="Who is it about?", files=[handle_file(docs["gamma"])], api_name="/ask"
    )
    assert details_again["cached_tokens"] > 0 and again == first  # greedy, same prefix


def test_fixed_ratio_and_a_wrong_one(client, docs, engine):
    ratio = sorted(engine.beacon_config.beacon_ratio)[-1]
    _, details = client.predict(
        question="Q?", files=[handle_file(docs["alpha"])], ratio=str(ratio), api_name="/ask"
    )
    assert details["compression_ratio"] == ratio
    info = client.predict(files=[handle_file(docs["beta"])], ratio=str(ratio), api_name="/upload")
    assert info["compression_ratio"] == ratio and info["ratio_setting"] == "fixed"
    _, details = client.predict(question="Q?", ratio=str(ratio), api_name="/ask")
    assert details["compression_ratio"] == ratio and details["cached_tokens"] > 0
    _, details = client.predict(question="Q?", api_name="/ask")  # auto: another condensed form
    assert details["compression_ratio"] == engine.info(docs["beta"]).compression_ratio
    with pytest.raises(AppError, match="ratio"):
        client.predict(question="Q?", ratio="3", api_name="/ask")


def test_two_sessions_see_only_their_own_documents(served, docs):
    url = served[1]
    first, second, third = (Client(url, verbose=False) for _ in range(3))
    assert first.predict(files=[handle_file(docs["alpha"])], api_name="/upload")["pages"] == 3
    assert second.predict(files=[handle_file(docs["beta"])], api_name="/upload")["names"] == [
        "beta.txt"
    ]
    with ThreadPoolExecutor(4) as pool:  # at the same time: they queue for the one model
        jobs = [
            pool.submit(c.predict, question=f"Question {i}?", api_name="/ask")
            for i in range(2)
            for c in (first, second)
        ]
        results = [job.result(timeout=120) for job in jobs]
    for index, (_, details) in enumerate(results):
        expected = ["alpha.pdf"] if index % 2 == 0 else ["beta.txt"]
        assert details["documents"] == expected
    with pytest.raises(AppError, match="no documents"):
        third.predict(question="Anything?", api_name="/ask")
    second.predict(api_name="/reset")
    with pytest.raises(AppError, match="no documents"):
        second.predict(question="Anything?", api_name="/ask")
    assert first.predict(question="Still there?", api_name="/ask")[1]["documents"] == ["alpha.pdf"]


@pytest.mark.parametrize("bad", ["empty", "corrupt", "junk"])
def test_bad_file_is_an_error_and_the_app_keeps_answering(client, docs, bad):
    with pytest.raises(AppError, match=docs[bad].name):
        client.predict(question="What is it?", files=[handle_file(docs[bad])], api_name="/ask")
    _, details = client.predict(
        question="What is it?", files=[handle_file(docs["alpha"])], api_name="/ask"
    )
    assert details["done"] and details["documents"] == ["alpha.pdf"]


def test_too_big_file_is_refused_by_the_server(served, client, docs):
    import httpx

    with pytest.raises(ValueError, match="maximum file size"):  # the client checks first
        client.predict(question="What is it?", files=[handle_file(docs["big"])], api_name="/ask")
    with open(docs["big"], "rb") as handle:  # and the server refuses it anyway
        response = httpx.post(f"{served[1]}gradio_api/upload", files={"files": handle})
    assert response.status_code == 413
    _, details = client.predict(
        question="What is it?", files=[handle_file(docs["alpha"])], api_name="/ask"
    )
    assert details["done"]


def test_stop_cancels_the_answer_and_frees_the_model(served, client, docs):
    client.predict(files=[handle_file(docs["alpha"])], api_name="/upload")
    job = client.submit(question="Talk for a long time.", max_new_tokens=3000, api_name="/ask")
    deadline = time.monotonic() + 60
    while not any(d.get("stage") == "answering" for _, d in job.outputs()):
        assert time.monotonic() < deadline and not job.done()
        time.sleep(0.02)
    job.cancel()  # 3000 tokens take the tiny model ~20 s on a laptop CPU
    started = time.monotonic()
    _, details = client.predict(question="Short one?", max_new_tokens=4, api_name="/ask")
    assert details["done"] and time.monotonic() - started < 10
    assert not any(d.get("done") for _, d in job.outputs())


# ---------------------------------------------------------------------- the page's handlers
@pytest.fixture(scope="module")
def page(engine):
    return build_app(engine, max_upload_mb=MAX_UPLOAD_MB, max_new_tokens=16).beacon_app


def test_page_upload_shows_bad_files_and_keeps_good_ones(page, docs):
    files = [str(docs[k]) for k in ("alpha", "empty", "corrupt", "junk", "big")]
    panel, session = run(page.ui_extract(files, None))
    assert [d.name for d in session.documents] == ["alpha.pdf"]
    assert "alpha.pdf" in panel and "| 3 |" in panel
    for name in ("empty.txt", "corrupt.pdf", "junk.pdf", "big.txt"):
        assert name in panel, panel
    assert "upload limit" in panel
    panel, session = run(page.ui_condense(page.model, "auto", session))
    assert "condensed memory" in panel and "compression ratio" in panel and "condensing" in panel


def test_page_chat_follow_up_summary_and_stop(page, docs, engine):
    _, session = run(page.ui_extract([str(docs["gamma"])], None))
    run(page.ui_condense(page.model, "auto", session))
    outputs = run(page.ui_ask("What is page 1 about?", page.model, 16, 0.0, "auto", session))
    chat, _, session = outputs[-1]
    assert outputs[0][1] == "" and len(outputs) > 2  # the question box is cleared at once
    assert chat[0] == {"role": "user", "content": "What is page 1 about?"}
    assert "cached: " in chat[1]["content"] and "cached: 0" not in chat[1]["content"]
    run(page.ui_ask("And page 2?", page.model, 16, 0.0, "auto", session))
    assert [e.status for e in session.exchanges] == ["done", "done"]
    assert len(session.history()) == 4  # the follow-up saw the first exchange
    chat, session = run(page.ui_summarize("short", page.model, 0.0, "auto", session))[-1]
    assert session.exchanges[-1].kind == "summary" and session.exchanges[-1].status == "done"

    async def ask_then_stop():
        stream = page.ui_ask("Long answer please.", page.model, 3000, 0.0, "auto", session)
        async for _ in stream:
            if session.exchanges[-1].answer:
                page.ui_stop(session)
        return session.exchanges[-1]

    stopped = asyncio.run(ask_then_stop())
    assert stopped.status == "stopped" and stopped.answer
    finished = threading.Event()
    threading.Thread(
        target=lambda: (engine.ask(session.documents, "Free?", max_new_tokens=2), finished.set()),
        daemon=True,
    ).start()
    assert finished.wait(30), "the engine is still held after Stop"
    chat, session = page.ui_clear_chat(session)
    assert chat == [] and session.exchanges == [] and session.documents


def test_page_explains_a_model_that_cannot_load(tmp_path, docs):
    missing = str(tmp_path / "no-such-model")
    app = build_app(missing, lazy=False).beacon_app
    status, _ = run(app.ui_model_status(missing, "auto"))[-1]
    status = status.replace("\\", "")
    assert "could not be loaded" in status and "no-such-model" in status
    _, session = run(app.ui_extract([str(docs["alpha"])], None))
    chat, _, _ = run(app.ui_ask("Hello?", missing, 8, 0.0, "auto", session))[-1]
    assert "could not be loaded" in chat[-1]["content"]


# ---------------------------------------------------------------------- pieces
def test_registry_shares_engines_by_name_and_reports_failures():
    loads = []

    def factory(name):
        loads.append(name)
        if name == "bad":
            raise OSError("no such model")
        return object()

    registry = EngineRegistry(factory, max_models=1)
    assert registry.get("a") is registry.get("a") and loads == ["a"]
    registry.get("b")
    assert registry.state("a")[0] == "absent" and registry.state("b")[0] == "ready"
    with pytest.raises(ModelLoadError, match="no such model"):
        registry.get("bad")
    assert registry.state("bad")[0] == "failed"
    with pytest.raises(ModelLoadError):  # not retried at once
        registry.get("bad")
    assert loads.count("bad") == 1
    with pytest.raises(ModelLoadError):
        registry.get("bad", retry=True)
    assert loads.count("bad") == 2


def test_cancel_token_cancels_the_streams_it_watches(engine):
    token = CancelToken()
    watched = token.watch(engine.stream_complete("Hello", max_new_tokens=50))
    token.cancel()  # before the first token: the request stops at once
    answer = watched.consume()
    assert answer.finish_reason == "cancelled" and answer.completion_tokens == 0
    late = token.watch(engine.stream_complete("Hello", max_new_tokens=50))
    assert late.consume().finish_reason == "cancelled"  # watched after the Stop


def test_citations_are_found_and_rendered():
    from beacon_apps.documents import Document, Page
    from ui.web import Exchange

    text = "It rains [page 3], see also [pages 5-6] and [p. iv]. Not [this]."
    assert render.cited_pages(text) == ["3", "5", "6", "iv"]
    shown = render.render_citations(text)
    assert "**[page 3]**" in shown and "**[pages 5-6]**" in shown and "[this]" in shown

    pages = [Page(n, f"Text of page {n}.", str(n)) for n in range(1, 5)]
    book = Document(source="book.txt", name="book.txt", pages=pages, metadata={})
    exchange = Exchange("Where?", "Where?", answer="On [page 2] and [page 4].", status="done")
    messages = render.chat_messages([exchange], [book])
    assert messages[1]["content"].startswith("On **[page 2]** and **[page 4]**.")
    assert messages[2]["metadata"]["title"] == "Cited pages: 2, 4"
    assert "Text of page 2." in messages[2]["content"] and "page 3" not in messages[2]["content"]
