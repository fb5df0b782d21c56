"""The beacon-apps web app: whole books and PDFs in front of a local long-context model.

A thin Gradio 6 layer over `beacon_apps.engine.BeaconEngine` and `beacon_apps.documents`.

Run it
------
::

    beacon-apps app [--model HUB_ID_OR_FOLDER] [--port 7860] [--device cuda|cpu]
                    [--cache-dir DIR | --no-cache] [--max-upload-mb 100]
                    [--auth user:password | --auth FILE]... [--share] [--lazy] [--lock-model]

It listens on 127.0.0.1 only (`--host 0.0.0.0` to serve a network, `--share` for a temporary
public gradio.live link; use `--auth` with either). `--auth` takes `user:password` or a file
with one `user:password` per line, and may be repeated. Uploads over `--max-upload-mb` are
refused by the server (and checked again before a file is read). The model loads in the
background at start (the page shows its state; `--lazy`: at the first question). If it cannot
be loaded (offline, wrong name), the page says why and how to point `--model` at a folder
(`beacon-apps tiny-model DIR` writes a small offline one).

The page
--------
Upload PDFs or text files: a progress bar follows text extraction (per page) and condensing
(per window of tokens), then a panel shows pages, tokens, the compression ratio chosen, the
condensed memory's size and the time taken. Chat about the documents: answers stream, cite
pages as **[page N]** (with the cited pages' first lines below), and say how much was reused
from the condensed-document cache ("cached: N tokens, prefill X s"), so follow-up questions are
visibly faster. Stop cancels the running request and frees the model. Summarize (short,
medium, long), Clear chat, Reset. Settings: the model (switching loads it, shared by every
session using that name), max new tokens, temperature, the compression ratio (auto or one the
model was trained with). Each browser tab has its own documents and chat; requests from all
tabs queue for the one model.

API (gradio_client)
-------------------
Named endpoints, usable without the page. Each `gradio_client.Client` is one session: the
documents it uploads stay with it (and only it) for later calls. Files are sent with
`gradio_client.handle_file(path)`.

``/upload(files: list[file], ratio: str = "auto") -> dict``
    Read and condense documents (replacing this session's) into the condensed-document cache,
    so that questions and summaries about them start from the cache. Returns ``{"documents": [{"name",
    "pages", "characters"}], "names", "pages", "characters", "tokens", "compression_ratio",
    "ratio_setting", "memory_entries", "memory_bytes", "fits", "extract_seconds",
    "condense_seconds", "cached_tokens", "model"}``. Any bad file is an error naming it.

``/ask(question: str, files: list[file] | None = None, max_new_tokens: int = 512,
temperature: float = 0.0, ratio: str = "auto") -> tuple[str, dict]``
    Answer one question about the documents given in `files` (they become the session's; a
    file sent again is not read again and its condensed form comes from the cache) or, without
    `files`, about the session's. Returns ``(answer, details)``; ``details`` has ``done``,
    ``finish_reason``, ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``,
    ``prefill_seconds``, ``total_seconds``, ``compression_ratio``, ``memory_entries``,
    ``memory_bytes``, ``notices``, ``citations`` (page labels cited), ``documents`` (names)
    and ``pages``. It streams: ``client.submit(...)`` yields ``(answer so far, {"done": False,
    "stage": "loading model" | "condensing" | "answering", "progress": [done, total] | None})``
    and the final pair last.

``/summarize(length: "short" | "medium" | "long" = "medium", files=None,
max_new_tokens: int = 0, temperature: float = 0.0, ratio: str = "auto") -> tuple[str, dict]``
    Like /ask, for a summary (``max_new_tokens`` 0: the length's own budget).

``/reset() -> dict``
    Forget this session's documents.

Defaults shown are the command line's (``--max-new-tokens``, ``--temperature``, ``--ratio``).
Errors (no documents, a bad file, a model that cannot load, a document too long to ask about,
a ratio the model was not trained with) raise ``gradio_client.exceptions.AppError`` with a
one-line message; a file over the upload limit is refused before it is sent (``ValueError``
from gradio_client; HTTP 413 from the server for other clients). Requests from all clients
and tabs run one at a time, in order. Example::

    from gradio_client import Client, handle_file

    client = Client("http://127.0.0.1:7860/")
    answer, details = client.predict(
        question="Who wrote it?", files=[handle_file("book.pdf")], api_name="/ask"
    )
    job = client.submit(question="And why?", api_name="/ask")  # the same book, from cache
    for answer_so_far, details in job:
        print(answer_so_far)
    summary, _ = client.predict(length="short", api_name="/summarize")
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # gradio is imported only when an app is built
    import gradio as gr

    from .engines import EngineRegistry


DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_UPLOAD_MB = 100


# ---------------------------------------------------------------------- command line
def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `beacon-apps app`."""
    from beacon_apps.default_model import MODEL_HELP

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=None,
        help=MODEL_HELP,
    )
    model.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    model.add_argument(
        "--ratio", default="auto", help="default compression ratio: auto or a trained ratio"
    )
    model.add_argument(
        "--cache-dir", type=Path, default=_default_cache_dir(), help="condensed documents on disk"
    )
    model.add_argument(
        "--no-cache", action="store_true", help="keep condensed documents in memory only"
    )
    model.add_argument(
        "--max-new-tokens", type=int, default=512, help="default answer length (tokens)"
    )
    model.add_argument("--temperature", type=float, default=0.0, help="default; 0 = greedy")
    model.add_argument(
        "--lazy", action="store_true", help="load the model at the first question, not at start"
    )
    model.add_argument(
        "--lock-model", action="store_true", help="the page cannot switch to another model"
    )
    server = parser.add_argument_group("server")
    server.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    server.add_argument(
        "--port", type=int, default=None, help="port (default 7860, or the next free one)"
    )
    server.add_argument(
        "--share", action="store_true", help="also open a temporary public gradio.live link"
    )
    server.add_argument(
        "--auth",
        action="append",
        default=None,
        metavar="USER:PASSWORD|FILE",
        help="require a login: user:password, or a file of user:password lines (repeatable)",
    )
    server.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MB,
        help=f"largest file accepted, in MB (default {DEFAULT_MAX_UPLOAD_MB})",
    )


def _default_cache_dir() -> Path:
    try:
        from beacon_apps.cli import DEFAULT_CACHE_DIR
    except ImportError:  # pragma: no cover - the CLI module is always there
        return Path.home() / ".cache" / "beacon-apps" / "condensed"
    return DEFAULT_CACHE_DIR


def parse_auth(values: Sequence[str] | None) -> list[tuple[str, str]] | None:
    """`user:password` values and/or files of such lines -> Gradio's list of pairs."""
    if not values:
        return None
    pairs: list[tuple[str, str]] = []
    for value in values:
        path = Path(value).expanduser()
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            entries = [
                (f"{path}:{number}", line.strip())
                for number, line in enumerate(lines, 1)
                if line.strip() and not line.lstrip().startswith("#")
            ]
            if not entries:
                raise ValueError(f"--auth: {path} has no user:password lines")
        else:
            entries = [("--auth", value)]
        for where, entry in entries:
            user, sep, password = entry.partition(":")
            if not sep or not user or not password:
                shown = where if where != "--auth" else f"--auth {value!r}"
                raise ValueError(
                    f"{shown}: expected user:password (or a file of user:password lines)"
                )
            pairs.append((user, password))
    return pairs


def run_app(args: argparse.Namespace) -> int:
    """`beacon-apps app`: build the app and serve it until Ctrl-C."""
    if args.max_upload_mb <= 0:
        raise ValueError("--max-upload-mb: must be more than 0")
    auth = parse_auth(args.auth)
    ratio = str(args.ratio)
    if ratio != "auto" and not ratio.isdigit():
        raise ValueError(f"--ratio: expected 'auto' or a number, got {ratio!r}")
    if (args.share or args.host not in (DEFAULT_HOST, "localhost", "::1")) and not auth:
        print(
            "beacon-apps: warning: the app is reachable from other machines without a login; "
            "consider --auth user:password",
            file=sys.stderr,
        )
    demo = build_app(
        args.model,
        device=args.device,
        cache_dir=None if args.no_cache else args.cache_dir,
        max_upload_mb=args.max_upload_mb,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        ratio=ratio,
        lazy=args.lazy,
        lock_model=args.lock_model,
    )
    _, local_url, share_url = launch_app(
        demo,
        host=args.host,
        port=args.port,
        share=args.share,
        auth=auth,
        prevent_thread_lock=True,
        quiet=True,
    )
    print(f"beacon-apps: the app is at {local_url}", file=sys.stderr)
    if share_url:
        print(f"beacon-apps: public link (72 h): {share_url}", file=sys.stderr)
    print("beacon-apps: Ctrl-C stops it", file=sys.stderr)
    demo.block_thread()  # until Ctrl-C; then closes the server
    return 0


# ---------------------------------------------------------------------- building
_shared_registries: dict[tuple[str | None, str | None, int], EngineRegistry] = {}


def shared_registry(
    device: str | None = None, cache_dir: str | os.PathLike | None = None, max_models: int = 2
) -> EngineRegistry:
    """The process-wide engines for (device, cache dir): one `BeaconEngine` per model name."""
    from .engines import EngineRegistry

    key = (device, str(cache_dir) if cache_dir else None, max_models)
    if key not in _shared_registries:

        def factory(name: str) -> Any:
            from beacon_apps.engine import BeaconEngine

            return BeaconEngine(name, device=device, cache_dir=cache_dir)

        _shared_registries[key] = EngineRegistry(factory, max_models=max_models)
    return _shared_registries[key]


def build_app(
    engine: Any = None,
    *,
    model: str | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_files: int = 20,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    ratio: str | int = "auto",
    lazy: bool = True,
    lock_model: bool = False,
    device: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_models: int = 2,
    registry: EngineRegistry | None = None,
) -> gr.Blocks:
    """The app as a `gr.Blocks` (queue set up; launch it with `launch_app`).

    `engine` is a loaded `BeaconEngine` (used for its `model_name`), a factory
    `callable(model_name) -> BeaconEngine`, or a model name / folder (loaded with `device` and
    `cache_dir`; `None`: the default model). Engines are shared by model name: the default
    factory's process-wide, a given factory's within this app. `lazy=False` starts loading the
    model now (in the background) instead of at the first request.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from beacon_apps.default_model import default_model

    from .engines import EngineRegistry
    from .web import BeaconWebApp, build_blocks

    if engine is not None and hasattr(engine, "stream_ask"):  # a loaded engine
        registry = registry or shared_registry(device, cache_dir, max_models)
        model = model or engine.model_name
        registry.add(model, engine)
    elif callable(engine):
        registry = registry or EngineRegistry(engine, max_models=max_models)
        model = model or default_model()
    else:
        registry = registry or shared_registry(device, cache_dir, max_models)
        model = str(engine) if engine is not None else (model or default_model())
    app = BeaconWebApp(
        registry,
        str(model),
        max_upload_mb=max_upload_mb,
        max_files=max_files,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        ratio=str(ratio),
        lazy=lazy,
        lock_model=lock_model,
        file_types=_file_types(),
    )
    if not lazy:
        registry.start(app.model)
    return build_blocks(app)


def _file_types() -> list[str]:
    """Extensions for the file picker: PDF and the text suffixes `beacon_apps.documents` reads."""
    from beacon_apps import documents

    from . import web

    suffixes = getattr(documents, "TEXT_SUFFIXES", None)
    if not suffixes:
        return web.DEFAULT_FILE_TYPES
    return [".pdf", *sorted(s for s in suffixes if s and s != ".pdf")]


def launch_app(
    demo: gr.Blocks,
    *,
    host: str = DEFAULT_HOST,
    port: int | None = None,
    share: bool = False,
    auth: list[tuple[str, str]] | Callable[[str, str], bool] | None = None,
    max_upload_mb: float | None = None,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
) -> tuple[Any, str, str | None]:
    """Serve `demo` (from `build_app`): 127.0.0.1, no share link, uploads capped in size.

    Returns Gradio's (FastAPI app, local URL, share URL). Blocks until Ctrl-C unless
    `prevent_thread_lock` (then `demo.close()` stops it).
    """
    import gradio as gr

    from .web import CSS

    app = getattr(demo, "beacon_app", None)
    if max_upload_mb is None:
        max_upload_mb = app.max_upload_mb if app is not None else DEFAULT_MAX_UPLOAD_MB
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        auth_message="beacon-apps: log in" if auth else None,
        max_file_size=int(max_upload_mb * 2**20),
        prevent_thread_lock=prevent_thread_lock,
        show_error=True,
        quiet=quiet,
        inbrowser=False,
        ssr_mode=False,
        mcp_server=False,
        theme=gr.themes.Soft(),
        css=CSS,
    )
