"""The Gradio Blocks of the app: the page, its per-session state and the named API endpoints.

`ui.app` is the entry point (CLI options, launching) and documents the API; this module
imports gradio and is loaded only when an app is built. Everything about documents and the
model goes through `beacon_apps.documents` and `beacon_apps.engine`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from . import render
from .engines import (
    CancelToken,
    EngineRegistry,
    ModelLoadError,
    iterate_stream,
    parse_ratio,
    ratio_choices,
    thread_events,
)

logger = logging.getLogger(__name__)

SUMMARY_LENGTHS = ("short", "medium", "long")
MODEL_GROUP = "model"  # every event that runs the model: one at a time, in order
EXTRACT_GROUP = "extract"
STREAM_INTERVAL_S = 0.04
CONDENSING = "condensing\u2026"
NOT_CONDENSED = "not condensed yet: that happens at the first question"
DEFAULT_FILE_TYPES = [".pdf", ".txt", ".md"]  # if beacon_apps.documents does not say
CSS = """
#beacon-status p { margin: 0; }
#beacon-info table { font-size: 0.9em; }
#beacon-chat sub { opacity: 0.75; }
"""


class UserError(Exception):
    """Something the user can fix; shown in the page (or as the API error) as is."""


# ---------------------------------------------------------------------- per-session state
@dataclass
class Exchange:
    """One question (or summary request) and its answer, as shown in the chat."""

    question: str  # the user turn the engine sees
    shown_question: str
    kind: str = "ask"  # "ask" | "summary"
    answer: str = ""
    status: str = "running"  # running | done | stopped | failed
    stats: str = ""
    error: str = ""
    progress: str = ""


@dataclass
class Session:
    """Everything one browser tab (or one gradio_client) has: never shared between sessions."""

    documents: list[Any] = field(default_factory=list)  # beacon_apps.documents.Document
    digests: list[str] = field(default_factory=list)  # sha256 of each uploaded file
    summary: dict[str, Any] | None = None  # what the document panel shows
    errors: list[str] = field(default_factory=list)  # the last upload's bad files
    exchanges: list[Exchange] = field(default_factory=list)
    tokens: set[CancelToken] = field(default_factory=set)  # running requests; Stop cancels

    def history(self) -> list[dict[str, str]]:
        """Finished (or stopped) exchanges as chat turns for `engine.stream_chat`."""
        turns: list[dict[str, str]] = []
        for exchange in self.exchanges:
            if exchange.status in ("done", "stopped") and exchange.answer.strip():
                turns.append({"role": "user", "content": exchange.question})
                turns.append({"role": "assistant", "content": exchange.answer})
        return turns

    def new_token(self) -> CancelToken:
        self.tokens = {t for t in self.tokens if not t.cancelled}
        token = CancelToken()
        self.tokens.add(token)
        return token

    def cancel_all(self) -> None:
        for token in self.tokens:
            token.cancel()
        self.tokens = set()


def _session(value: Any) -> Session:
    return value if isinstance(value, Session) else Session()


def _file_path(item: Any) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    path = getattr(item, "path", None) or getattr(item, "name", None)
    if path is None and isinstance(item, dict):
        path = item.get("path") or item.get("name")
    if not path:
        raise UserError(f"could not read the uploaded file {item!r}")
    return str(path)


def _digest(path: str) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _document_rows(documents: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"name": d.name, "pages": d.num_pages, "characters": d.num_chars} for d in documents]


# ---------------------------------------------------------------------- the app
class BeaconWebApp:
    """Handlers of the page and of the API. One instance per built app; state lives in `Session`."""

    def __init__(
        self,
        registry: EngineRegistry,
        model: str,
        *,
        max_upload_mb: float = 100,
        max_files: int = 20,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        ratio: str = "auto",
        lazy: bool = True,
        lock_model: bool = False,
        file_types: list[str] | None = None,
    ) -> None:
        self.registry = registry
        self.model = model
        self.max_upload_mb = max_upload_mb
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.max_files = max_files
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.ratio = str(ratio)
        self.lazy = lazy
        self.lock_model = lock_model
        self.file_types = file_types

    def _model_name(self, model: str | None) -> str:
        model = (model or "").strip()
        if not model or self.lock_model:
            return self.model
        return model

    # ------------------------------------------------------------------ documents
    def _load_work(self, paths: Sequence[str], session: Session, token: CancelToken) -> Callable:
        """Work for `thread_events`: read each file (reusing ones this session already has).

        Reading a file cannot be cancelled from outside: Stop raises in its page callback."""
        from beacon_apps.documents import DocumentError, IngestLimits, load_document

        known = dict(zip(session.digests, session.documents, strict=False))
        limits = IngestLimits(max_file_bytes=self.max_upload_bytes)

        def work(emit: Callable[[Any], None]) -> None:
            started = time.perf_counter()
            documents, digests, errors = [], [], []
            if len(paths) > self.max_files:
                errors.append(f"{len(paths)} files: at most {self.max_files} at a time")
                paths_to_read = list(paths)[: self.max_files]
            else:
                paths_to_read = list(paths)
            for index, path in enumerate(paths_to_read):
                name = Path(path).name
                try:
                    size = os.path.getsize(path)
                    if size > self.max_upload_bytes:
                        raise UserError(
                            f"{name}: {size / 2**20:.1f} MB is over the upload limit of "
                            f"{self.max_upload_mb:g} MB"
                        )
                    digest = _digest(path)
                    if digest in known and known[digest].name == name:
                        document = known[digest]
                    else:

                        def on_page(done: int, total: int, index=index, name=name) -> None:
                            token.check()
                            emit(("page", index, len(paths_to_read), name, done, total))

                        document = load_document(path, name=name, limits=limits, on_page=on_page)
                    documents.append(document)
                    digests.append(digest)
                except (DocumentError, UserError, OSError, ValueError) as error:
                    message = str(error)
                    if name not in message:
                        message = f"{name}: {message}"
                    errors.append(message)
            token.check()
            emit(("loaded", documents, digests, errors, time.perf_counter() - started))

        return work

    async def _load(
        self, files: Sequence[Any] | None, session: Session, progress: Any, strict: bool
    ) -> list[str]:
        """Replace the session's documents with `files`; return the errors (bad files)."""
        paths = [_file_path(f) for f in (files or [])]
        token = session.new_token()
        result = None
        async for batch in thread_events(self._load_work(paths, session, token), token):
            for event in batch:
                if event[0] == "page":
                    _, index, count, name, done, total = event
                    where = f" ({index + 1}/{count})" if count > 1 else ""
                    progress((done, total), desc=f"Reading {name}{where}", unit="pages")
                else:
                    result = event
        if result is None:  # stopped
            return ["reading the files was stopped"]
        _, documents, digests, errors, seconds = result
        if strict and errors:
            raise UserError("; ".join(errors))
        session.documents, session.digests, session.errors = documents, digests, errors
        session.summary = (
            {
                "documents": _document_rows(documents),
                "names": [d.name for d in documents],
                "pages": sum(d.num_pages for d in documents),
                "characters": sum(d.num_chars for d in documents),
                "extract_seconds": seconds,
            }
            if documents
            else None
        )
        return errors

    # ------------------------------------------------------------------ the model
    async def _engine(self, model: str, progress: Any) -> Any:
        if self.registry.state(model)[0] != "ready":
            progress(0.0, desc=f"Loading the model {model}\u2026")
        try:
            return await self.registry.aget(model)
        except ModelLoadError as error:
            raise UserError(f"The model could not be loaded. {error}") from None

    async def _condense(self, session: Session, model: str, ratio: str, progress: Any) -> bool:
        """Tokens, ratio and condensed memory of the session's documents (cached for questions).

        `engine.condense` reads the documents into the condensed-document cache the way a
        question (or a summary) will, so the first question restores them from the cache.
        """
        documents = session.documents
        summary = session.summary or {}
        for key in (
            "tokens",
            "fits",
            "compression_ratio",
            "memory_entries",
            "memory_bytes",
            "condense_seconds",
            "cached_tokens",
        ):
            summary.pop(key, None)
        engine = await self._engine(model, progress)
        setting = parse_ratio(engine, ratio)
        token = session.new_token()

        def work(emit: Callable[[Any], None]) -> None:
            info = engine.info(documents, ratio=setting)
            emit(("info", info, None))
            if not info.fits:
                return

            def on_progress(done: int, total: int) -> None:
                token.check()  # condense() gives no stream to cancel: Stop raises here
                emit(("progress", done, total))

            emit(("info", info, engine.condense(documents, on_progress=on_progress, ratio=setting)))

        async for batch in thread_events(work, token):
            for event in batch:
                if event[0] == "progress":
                    _, done, total = event
                    progress((done, total), desc="Condensing the document", unit="tokens")
                else:
                    _, info, answer = event
                    summary.update(
                        tokens=info.tokens,
                        fits=info.fits,
                        compression_ratio=info.compression_ratio,
                        ratio_setting="auto" if setting == "auto" else "fixed",
                        memory_entries=info.memory_entries,
                        memory_bytes=info.memory_bytes,
                        model=model,
                    )
                    if answer is not None:
                        summary.update(
                            compression_ratio=answer.compression_ratio,
                            memory_entries=answer.memory_entries,
                            memory_bytes=answer.memory_bytes,
                            condense_seconds=answer.prefill_seconds,
                            cached_tokens=answer.cached_tokens,
                        )
        if session.documents is not documents:  # new files came while this ran
            return False
        session.summary = summary
        return "condense_seconds" in summary

    async def _answer(
        self,
        exchange: Exchange,
        session: Session,
        model: str,
        ratio: str,
        open_stream: Callable[..., Any],
        progress: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """Run one engine request for `exchange`; yield details as it goes (at most every
        STREAM_INTERVAL_S, so a fast model does not spend its time redrawing the page).

        Fills `exchange` (answer text as it streams, then stats or the error). Yields a dict
        for the API: {"done": False, "stage": ..., "progress": [done, total]} while running.
        """
        from beacon_apps.engine import DocumentTooLongError

        token = session.new_token()
        details: dict[str, Any] = {"done": False, "stage": "loading model", "progress": None}
        try:
            if self.registry.state(model)[0] != "ready":
                exchange.progress = f"Loading the model {model}\u2026"
            yield details
            engine = await self._engine(model, progress)
            setting = parse_ratio(engine, ratio)
            documents = list(session.documents)

            def work(emit: Callable[[Any], None]) -> None:
                stream = open_stream(
                    engine,
                    on_progress=lambda done, total: emit(("progress", done, total)),
                    ratio=setting,
                )
                emit(("answer", iterate_stream(token.watch(stream), emit)))

            details = {"done": False, "stage": "condensing", "progress": None}
            answer = None
            shown = 0.0
            async for batch in thread_events(work, token):
                for event in batch:
                    if event[0] == "progress":
                        _, done, total = event
                        details = {"done": False, "stage": "condensing", "progress": [done, total]}
                        if done < total:
                            percent = 100 * done // max(total, 1)
                            exchange.progress = (
                                f"Condensing the document: {percent}% ({done:,} / {total:,} tokens)"
                            )
                            progress((done, total), desc="Condensing the document", unit="tokens")
                    elif event[0] == "delta":
                        exchange.answer += event[1]
                        details = {"done": False, "stage": "answering", "progress": None}
                    else:
                        answer = event[1]
                if answer is None and time.monotonic() - shown >= STREAM_INTERVAL_S:
                    shown = time.monotonic()
                    yield details
            exchange.answer = answer.text
            exchange.stats = render.stats_line(answer)
            if answer.notices:
                exchange.stats += " \u00b7 " + " \u00b7 ".join(answer.notices)
            details = _answer_details(answer, documents)
            if answer.finish_reason == "cancelled":
                exchange.status, details["stage"] = "stopped", "stopped"
            else:
                exchange.status = "done"
            yield details
        except (UserError, DocumentTooLongError, ValueError) as error:
            exchange.status, exchange.error = "failed", str(error)
            yield {"done": True, "stage": "failed", "error": str(error)}
        except Exception as error:  # shown in the page; the app keeps working
            logger.exception("request failed")
            exchange.status = "failed"
            exchange.error = f"Unexpected error: {type(error).__name__}: {error}"
            yield {"done": True, "stage": "failed", "error": exchange.error}
        finally:
            if exchange.status == "running":  # cancelled from outside (Stop, client gone)
                exchange.status = "stopped"
            token.cancel()

    # ------------------------------------------------------------------ page handlers
    def _chat(self, session: Session) -> list[dict[str, Any]]:
        return render.chat_messages(session.exchanges, session.documents)

    def _panel(self, session: Session) -> str:
        return render.document_panel(session.summary, session.errors)

    async def ui_extract(self, files, session, progress=gr.Progress()):  # noqa: B008
        """Upload: read the files (per-page progress); condensing follows (`ui_condense`)."""
        session = _session(session)
        reported = set(session.errors)
        try:
            errors = await self._load(files, session, progress, strict=False)
        except UserError as error:
            errors = [str(error)]
            session.errors = errors
        for error in errors:
            if error not in reported:  # the file list is read again on each upload
                gr.Warning(error)
        if session.summary:
            session.summary["state"] = CONDENSING
        return self._panel(session), session

    async def ui_condense(self, model, ratio, session, progress=gr.Progress()):  # noqa: B008
        session = _session(session)
        if not session.documents:
            return self._panel(session), session
        try:
            condensed = await self._condense(session, self._model_name(model), ratio, progress)
            if session.summary:
                session.summary.pop("state", None)
                if not condensed and session.summary.get("fits", True):
                    session.summary["state"] = NOT_CONDENSED
        except (UserError, ValueError) as error:
            if session.summary:
                session.summary["state"] = f"not condensed: {error}"
            gr.Warning(str(error))
        return self._panel(session), session

    async def ui_ask(
        self,
        question,
        model,
        max_new_tokens,
        temperature,
        ratio,
        session,
        progress=gr.Progress(),  # noqa: B008
    ):
        session = _session(session)
        question = (question or "").strip()
        if not question:
            gr.Warning("Type a question first.")
            yield self._chat(session), "", session
            return
        exchange = Exchange(question=question, shown_question=question)
        session.exchanges.append(exchange)
        if not session.documents:
            exchange.status, exchange.error = "failed", "Upload a PDF or text file first."
            yield self._chat(session), "", session
            return
        history = [*session.history(), {"role": "user", "content": question}]
        documents = list(session.documents)
        options = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature)}

        def open_stream(engine, **request):
            return engine.stream_chat(documents, history, **request, **options)

        question_box: Any = ""  # cleared once; later updates leave what the user types next
        async for _ in self._answer(
            exchange, session, self._model_name(model), ratio, open_stream, progress
        ):
            yield self._chat(session), question_box, session
            question_box = gr.update()
        if exchange.error:
            gr.Warning(exchange.error)

    async def ui_summarize(
        self,
        length,
        model,
        temperature,
        ratio,
        session,
        progress=gr.Progress(),  # noqa: B008
    ):
        session = _session(session)
        length = length if length in SUMMARY_LENGTHS else "medium"
        exchange = Exchange(
            question=f"Summarize the document ({length}).",
            shown_question=f"Summarize the documents ({length})",
            kind="summary",
        )
        session.exchanges.append(exchange)
        if not session.documents:
            exchange.status, exchange.error = "failed", "Upload a PDF or text file first."
            yield self._chat(session), session
            return
        documents = list(session.documents)
        options = {"temperature": float(temperature)}

        def open_stream(engine, **request):
            return engine.stream_summarize(documents, length, **request, **options)

        async for _ in self._answer(
            exchange, session, self._model_name(model), ratio, open_stream, progress
        ):
            yield self._chat(session), session
        if exchange.error:
            gr.Warning(exchange.error)

    def ui_stop(self, session):
        session = _session(session)
        session.cancel_all()
        for exchange in session.exchanges:
            if exchange.status == "running":
                exchange.status = "stopped"
        if session.summary and session.summary.get("state") == CONDENSING:
            session.summary["state"] = NOT_CONDENSED
        return self._chat(session), self._panel(session), session

    def ui_clear_chat(self, session):
        session = _session(session)
        session.cancel_all()
        session.exchanges = []
        return [], session

    def ui_reset(self, session):
        session = _session(session)
        session.cancel_all()
        session = Session()
        return None, self._panel(session), [], "", session

    async def ui_model_status(
        self,
        model,
        ratio,
        load: bool = True,
        retry: bool = False,
        progress=gr.Progress(),  # noqa: B008
    ):
        """The status line and the ratio choices; loads the model unless it loads lazily."""
        model = self._model_name(model)
        state, _ = self.registry.state(model)
        if state in ("absent", "failed") and not load:
            yield self._status(model), gr.update()
            return
        if state != "ready":
            self.registry.start(model, retry=retry)
            yield self._status(model), gr.update()
        try:
            engine = await self._engine(model, progress)
        except UserError:
            yield self._status(model), gr.update(choices=["auto"], value="auto")
            return
        choices = ["auto", *map(str, ratio_choices(engine))]
        value = str(ratio) if str(ratio) in choices else "auto"
        yield self._status(model), gr.update(choices=choices, value=value)

    def _status(self, model: str) -> str:
        state, detail = self.registry.state(model)
        name = f"`{model}`"
        if state == "ready":
            engine = self.registry.get(model)
            device = getattr(engine.model, "device", "")
            took = f", loaded in {detail}" if detail else ""
            return (
                f"Model {name} ready on {device}{took}: it reads documents of up to about "
                f"{engine.context_window:,} tokens."
            )
        if state == "loading":
            return f"Loading the model {name}\u2026 ({detail})"
        if state == "failed":
            return (
                f"\u26a0\ufe0f **The model could not be loaded.** {render.escape_markdown(detail)}"
                "\n\nChoose another model under *Settings* (a hub id or a local folder) or "
                "restart with `--model FOLDER`."
            )
        return f"Model {name} loads at the first question."

    def ui_status_now(self, model):
        return self._status(self._model_name(model))

    # ------------------------------------------------------------------ API handlers
    async def api_upload(self, files, ratio, session, progress=gr.Progress()):  # noqa: B008
        """Read and condense documents for this session; returns their numbers.

        Later /ask and /summarize calls without files use them.
        """
        session = _session(session)
        if not files:
            raise _api_error("files: give one or more PDF or text files")
        try:
            await self._load(files, session, progress, strict=True)
            await self._condense(session, self.model, ratio, progress)
        except (UserError, ValueError) as error:
            raise _api_error(str(error)) from None
        return _public_summary(session.summary), session

    async def _api_documents(self, files, session: Session, progress) -> None:
        if files:
            try:
                await self._load(files, session, progress, strict=True)
            except UserError as error:
                raise _api_error(str(error)) from None
        if not session.documents:
            raise _api_error(
                "no documents: pass files=[handle_file(path), ...] or call /upload first"
            )

    async def api_ask(
        self,
        question: str,
        files: list[str] | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        ratio: str = "auto",
        session: Session | None = None,
        progress=gr.Progress(),  # noqa: B008
    ):
        """Answer a question about the documents (streams: each output is the answer so far)."""
        session = _session(session)
        question = (question or "").strip()
        if not question:
            raise _api_error("question: empty question")
        await self._api_documents(files, session, progress)
        documents = list(session.documents)
        options = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature)}
        exchange = Exchange(question=question, shown_question=question)

        def open_stream(engine, **request):
            return engine.stream_ask(documents, question, **request, **options)

        async for details in self._answer(
            exchange, session, self.model, ratio, open_stream, progress
        ):
            if exchange.error:
                raise _api_error(exchange.error)
            yield exchange.answer, details, session

    async def api_summarize(
        self,
        length: str = "medium",
        files: list[str] | None = None,
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        ratio: str = "auto",
        session: Session | None = None,
        progress=gr.Progress(),  # noqa: B008
    ):
        """Summarize the documents (streams like /ask). max_new_tokens 0: the length's default."""
        session = _session(session)
        if length not in SUMMARY_LENGTHS:
            raise _api_error(f"length: choose one of {', '.join(SUMMARY_LENGTHS)}")
        await self._api_documents(files, session, progress)
        documents = list(session.documents)
        options: dict[str, Any] = {"temperature": float(temperature)}
        if max_new_tokens and int(max_new_tokens) > 0:
            options["max_new_tokens"] = int(max_new_tokens)
        exchange = Exchange(question=length, shown_question=length, kind="summary")

        def open_stream(engine, **request):
            return engine.stream_summarize(documents, length, **request, **options)

        async for details in self._answer(
            exchange, session, self.model, ratio, open_stream, progress
        ):
            if exchange.error:
                raise _api_error(exchange.error)
            yield exchange.answer, details, session

    def api_reset(self, session):
        """Forget this session's documents."""
        session = _session(session)
        session.cancel_all()
        return {"documents": []}, Session()


def _api_error(message: str) -> Exception:
    """The error an API client gets (gradio_client raises AppError with this message)."""
    return gr.Error(message, print_exception=False)


def _answer_details(answer: Any, documents: Sequence[Any]) -> dict[str, Any]:
    return {
        "done": True,
        "stage": "done",
        "finish_reason": answer.finish_reason,
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "cached_tokens": answer.cached_tokens,
        "prefill_seconds": round(answer.prefill_seconds, 4),
        "total_seconds": round(answer.total_seconds, 4),
        "compression_ratio": answer.compression_ratio,
        "memory_entries": answer.memory_entries,
        "memory_bytes": answer.memory_bytes,
        "notices": list(answer.notices),
        "citations": render.cited_pages(answer.text),
        "documents": [d.name for d in documents],
        "pages": sum(d.num_pages for d in documents),
    }


def _public_summary(summary: dict[str, Any] | None) -> dict[str, Any]:
    summary = dict(summary or {})
    summary.pop("state", None)
    return summary


# ---------------------------------------------------------------------- the page
def build_blocks(app: BeaconWebApp, *, title: str = "beacon-apps") -> gr.Blocks:
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        session = gr.State(None)
        gr.Markdown(
            "## beacon-apps \u2014 ask your whole book\n"
            "Upload PDFs or text files, then ask about them. The model reads every page "
            "(condensed with Activation Beacon); answers cite pages as **[page N]**."
        )
        status = gr.Markdown(app._status(app.model), elem_id="beacon-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                files = gr.File(
                    label="Documents (PDF or text)",
                    file_count="multiple",
                    file_types=app.file_types,
                    elem_id="beacon-files",
                )
                info = gr.Markdown(render.document_panel(None), elem_id="beacon-info")
                with gr.Accordion("Summarize", open=True):
                    length = gr.Radio(
                        list(SUMMARY_LENGTHS),
                        value="short",
                        label="Length",
                        elem_id="beacon-length",
                    )
                    summarize = gr.Button("Summarize", elem_id="beacon-summarize")
                with gr.Accordion("Settings", open=False):
                    model = gr.Dropdown(
                        [app.model],
                        value=app.model,
                        label="Model (hub id or local folder)",
                        allow_custom_value=not app.lock_model,
                        interactive=not app.lock_model,
                        elem_id="beacon-model",
                    )
                    load = gr.Button("Load model", size="sm", visible=not app.lock_model)
                    max_new_tokens = gr.Slider(
                        1,
                        4096,
                        value=app.max_new_tokens,
                        step=1,
                        label="Max new tokens",
                        elem_id="beacon-max-new-tokens",
                    )
                    temperature = gr.Slider(
                        0.0, 1.5, value=app.temperature, step=0.05, label="Temperature (0 = greedy)"
                    )
                    ratio_choices_now = ["auto"] if app.ratio == "auto" else ["auto", app.ratio]
                    ratio = gr.Dropdown(
                        ratio_choices_now,
                        value=app.ratio,
                        label="Compression ratio (auto: the smallest that fits)",
                        elem_id="beacon-ratio",
                    )
            with gr.Column(scale=2, min_width=400):
                chat = gr.Chatbot(
                    label="Chat about the documents",
                    height=520,
                    elem_id="beacon-chat",
                    buttons=["copy"],
                    feedback_options=None,
                    placeholder="Upload a document, then ask a question.",
                )
                with gr.Row():
                    question = gr.Textbox(
                        placeholder="Ask about the documents\u2026",
                        show_label=False,
                        scale=5,
                        elem_id="beacon-question",
                        submit_btn=False,
                    )
                    ask = gr.Button("Ask", variant="primary", scale=1, elem_id="beacon-ask")
                    stop = gr.Button("Stop", variant="stop", scale=1, elem_id="beacon-stop")
                with gr.Row():
                    clear = gr.Button("Clear chat", size="sm", elem_id="beacon-clear")
                    reset = gr.Button("Reset (documents too)", size="sm", elem_id="beacon-reset")

        # The named API (see ui/app.py): hidden components, one session State per client.
        with gr.Column(visible=False):
            api_files = gr.File(label="files", file_count="multiple")
            api_question = gr.Textbox(label="question", value="")
            api_length = gr.Radio(list(SUMMARY_LENGTHS), value="medium", label="length")
            api_max_new_tokens = gr.Number(
                value=app.max_new_tokens, precision=0, label="max_new_tokens"
            )
            api_summary_tokens = gr.Number(value=0, precision=0, label="max_new_tokens")
            api_temperature = gr.Number(value=app.temperature, label="temperature")
            api_ratio = gr.Textbox(value=app.ratio, label="ratio")
            api_answer = gr.Textbox(label="answer")
            api_details = gr.JSON(label="details")
            api_info = gr.JSON(label="documents")
            api_buttons = [gr.Button(visible=False) for _ in range(4)]

        model_events = {"concurrency_id": MODEL_GROUP, "concurrency_limit": 1}
        private = {"api_visibility": "private"}
        settings = [model, ratio]

        # Upload: read the files (in parallel with other sessions' questions), then condense.
        reading = [
            files.upload(
                app.ui_extract,
                [files, session],
                [info, session],
                concurrency_id=EXTRACT_GROUP,
                concurrency_limit=4,
                **private,
            ),
            files.delete(
                app.ui_extract,
                [files, session],
                [info, session],
                concurrency_id=EXTRACT_GROUP,
                concurrency_limit=4,
                **private,
            ),
        ]
        condensing = [
            event.then(
                app.ui_condense, [*settings, session], [info, session], **model_events, **private
            )
            for event in reading
        ]
        condensing.append(  # another ratio: condense again
            ratio.input(
                app.ui_condense, [*settings, session], [info, session], **model_events, **private
            )
        )
        files.clear(
            app.ui_reset, [session], [files, info, chat, question, session], queue=False, **private
        )

        ask_inputs = [question, model, max_new_tokens, temperature, ratio, session]
        asking = [
            ask.click(app.ui_ask, ask_inputs, [chat, question, session], **model_events, **private),
            question.submit(
                app.ui_ask, ask_inputs, [chat, question, session], **model_events, **private
            ),
        ]
        summarizing = summarize.click(
            app.ui_summarize,
            [length, model, temperature, ratio, session],
            [chat, session],
            **model_events,
            **private,
        )
        for event in [*asking, summarizing, *condensing]:
            event.then(app.ui_status_now, [model], [status], queue=False, **private)
        stop.click(
            app.ui_stop,
            [session],
            [chat, info, session],
            cancels=[*asking, summarizing, *reading, *condensing],
            queue=False,
            **private,
        )
        clear.click(app.ui_clear_chat, [session], [chat, session], queue=False, **private)
        reset.click(
            app.ui_reset, [session], [files, info, chat, question, session], queue=False, **private
        )

        # The model: loaded at start (status shown) or at first use; switching reloads.
        status_kwargs = {"concurrency_limit": None, **private}
        demo.load(
            _bind_load(app.ui_model_status, not app.lazy),
            [model, ratio],
            [status, ratio],
            **status_kwargs,
        )
        for trigger in (model.change, load.click):
            trigger(
                _bind_load(app.ui_model_status, True, retry=True),
                [model, ratio],
                [status, ratio],
                **status_kwargs,
            ).then(
                app.ui_condense, [*settings, session], [info, session], **model_events, **private
            )

        # The API endpoints.
        upload_button, ask_button, summarize_button, reset_button = api_buttons
        upload_button.click(
            app.api_upload,
            [api_files, api_ratio, session],
            [api_info, session],
            api_name="upload",
            **model_events,
        )
        ask_button.click(
            app.api_ask,
            [api_question, api_files, api_max_new_tokens, api_temperature, api_ratio, session],
            [api_answer, api_details, session],
            api_name="ask",
            **model_events,
        )
        summarize_button.click(
            app.api_summarize,
            [api_length, api_files, api_summary_tokens, api_temperature, api_ratio, session],
            [api_answer, api_details, session],
            api_name="summarize",
            **model_events,
        )
        reset_button.click(
            app.api_reset, [session], [api_info, session], api_name="reset", queue=False
        )
    demo.queue(default_concurrency_limit=1)
    demo.beacon_app = app  # for tests and for `ui.app.launch_app`
    return demo


def _bind_load(handler: Callable, load: bool, retry: bool = False) -> Callable:
    async def model_status(model, ratio, progress=gr.Progress()):  # noqa: B008
        async for update in handler(model, ratio, load=load, retry=retry, progress=progress):
            yield update

    return model_status
