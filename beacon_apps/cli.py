"""`beacon-apps`: ask, summarize and chat about whole documents from the terminal.

Every subcommand goes through `beacon_apps.engine.BeaconEngine`. Answers stream to stdout;
progress bars and errors go to stderr. An error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

DEFAULT_CACHE_DIR = Path(
    os.environ.get("BEACON_APPS_CACHE", Path.home() / ".cache" / "beacon-apps" / "condensed")
)
logger = logging.getLogger("beacon_apps")


class UsageError(Exception):
    """A problem with what the user typed (shown as one line, exit code 2)."""


# ---------------------------------------------------------------------- shared options
def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from .default_model import MODEL_HELP

    parser.add_argument(
        "--model",
        default=None,
        help=MODEL_HELP,
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument(
        "--ratio", default="auto", help="compression ratio: auto (fit the document) or a number"
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument(
        "--no-cache", action="store_true", help="do not keep condensed documents on disk"
    )


def _add_generation_options(parser: argparse.ArgumentParser, max_new_tokens: int = 512) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _generation(args: argparse.Namespace) -> dict:
    options = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "do_sample": args.temperature > 0,
    }
    if args.stop:
        options["stop"] = args.stop
    return options


def _engine(args: argparse.Namespace):
    from .engine import BeaconEngine

    ratio = args.ratio if args.ratio == "auto" else _int(args.ratio, "--ratio")
    return BeaconEngine(
        args.model,
        device=args.device,
        ratio=ratio,
        cache_dir=None if args.no_cache else args.cache_dir,
    )


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name}: expected 'auto' or a number, got {value!r}") from None


def _load(paths: Sequence[str]):
    from .documents import load_documents

    with tqdm(desc="reading", unit="page", file=sys.stderr, leave=False, disable=None) as bar:

        def on_page(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        return load_documents(list(paths), on_page=on_page)


def _stream_to_stdout(stream) -> None:
    for delta in stream:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    answer = stream.answer
    for notice in answer.notices:
        print(f"note: {notice}", file=sys.stderr)
    logger.info(
        "%d prompt tokens (%d from cache), ratio %d, %d new tokens, prefill %.2fs, total %.2fs",
        answer.prompt_tokens,
        answer.cached_tokens,
        answer.compression_ratio,
        answer.completion_tokens,
        answer.prefill_seconds,
        answer.total_seconds,
    )


class _CondenseBar:
    """tqdm over the tokens being condensed."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=total,
                desc="condensing",
                unit="tok",
                file=sys.stderr,
                leave=False,
                disable=None,
            )
        self.bar.n = done
        self.bar.refresh()
        if done >= total:
            self.bar.close()


# ---------------------------------------------------------------------- commands
def cmd_info(args: argparse.Namespace) -> int:
    documents = _load(args.files)
    engine = _engine(args)
    info = engine.info(documents)
    rows = [
        ("documents", ", ".join(info.names)),
        ("pages", info.pages),
        ("characters", info.characters),
        ("tokens", info.tokens),
        ("compression ratio", info.compression_ratio),
        ("condensed entries/layer", info.memory_entries),
        ("estimated memory", f"{info.memory_bytes / 2**20:.1f} MiB"),
        ("fits the model", "yes" if info.fits else "no (summaries use map-reduce; ask fails)"),
    ]
    for name, value in rows:
        print(f"{name:>24}: {value}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    if len(args.inputs) < 2:
        raise UsageError("ask: give one or more files and then the question")
    *files, question = args.inputs
    documents = _load(files)
    engine = _engine(args)
    plan = "question" if args.question_aware else "uniform"
    stream = engine.stream_ask(
        documents, question, on_progress=_CondenseBar(), ratio_plan=plan, **_generation(args)
    )
    _stream_to_stdout(stream)
    return 0


def cmd_summarize(args: argparse.Namespace) -> int:
    documents = _load(args.files)
    engine = _engine(args)
    options = _generation(args)
    if args.max_new_tokens is None:
        options.pop("max_new_tokens")
    stream = engine.stream_summarize(documents, args.length, on_progress=_CondenseBar(), **options)
    _stream_to_stdout(stream)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    documents = _load(args.files)
    engine = _engine(args)
    history: list[dict[str, str]] = []
    print("Ask about the document(s); an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        if not question:
            break
        history.append({"role": "user", "content": question})
        sys.stdout.write("beacon> ")
        stream = engine.stream_chat(
            documents, history, on_progress=_CondenseBar(), **_generation(args)
        )
        _stream_to_stdout(stream)
        history.append({"role": "assistant", "content": stream.answer.text})
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from .beacon.tiny import write_tiny_model

    directory = write_tiny_model(args.directory, family=args.family, seed=args.seed)
    print(directory)
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    from ui.app import run_app

    return run_app(args)


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beacon-apps",
        description="Ask questions about whole books and PDFs with an Activation Beacon model.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="pages, tokens, ratio and memory of documents")
    info.add_argument("files", nargs="+")
    _add_model_options(info)
    info.set_defaults(run=cmd_info)

    ask = commands.add_parser("ask", help="answer a question about documents")
    ask.add_argument("inputs", nargs="+", metavar="FILE... QUESTION")
    _add_model_options(ask)
    _add_generation_options(ask)
    ask.add_argument(
        "--question-aware",
        action="store_true",
        help="condense the parts most relevant to the question least, the rest hard, at the same "
        "overall compression (not cached)",
    )
    ask.set_defaults(run=cmd_ask)

    summarize = commands.add_parser("summarize", help="summarize documents")
    summarize.add_argument("files", nargs="+")
    summarize.add_argument("--length", choices=["short", "medium", "long"], default="medium")
    _add_model_options(summarize)
    _add_generation_options(summarize, max_new_tokens=None)
    summarize.set_defaults(run=cmd_summarize)

    chat = commands.add_parser("chat", help="interactive chat about documents")
    chat.add_argument("files", nargs="+")
    _add_model_options(chat)
    _add_generation_options(chat)
    chat.set_defaults(run=cmd_chat)

    tiny = commands.add_parser(
        "tiny-model", help="write a tiny random-weight beacon model (offline)"
    )
    tiny.add_argument("directory")
    tiny.add_argument("--family", choices=["qwen2", "llama", "mistral"], default="qwen2")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=cmd_tiny_model)

    app = commands.add_parser("app", help="start the web app on 127.0.0.1")
    _add_app_options(app)
    app.set_defaults(run=cmd_app)

    _add_optional_command(commands, "train", "train a beacon", "training", "train")
    _add_optional_command(commands, "eval", "perplexity, passkey, needle", "evaluation", "eval")
    return parser


def _add_app_options(parser: argparse.ArgumentParser) -> None:
    try:
        from ui.app import add_app_arguments
    except ImportError:  # the app's own module defines its options
        _add_model_options(parser)
        return
    add_app_arguments(parser)


def _add_optional_command(commands, name: str, help_text: str, module: str, verb: str) -> None:
    import importlib

    try:
        target = importlib.import_module(f"beacon_apps.{module}")
    except ImportError:
        return
    parser = commands.add_parser(name, help=help_text)
    getattr(target, f"add_{verb}_arguments")(parser)
    parser.set_defaults(run=getattr(target, f"run_{verb}"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        # pypdf warns about each malformed object it repairs, often many times per file; our
        # ingestion reports what matters (a page it cannot read is an error naming the page).
        # -v shows pypdf's warnings.
        logging.getLogger("pypdf").setLevel(logging.ERROR)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line, never a traceback, for anything the user can fix
        from .beacon import BeaconConfigError, CheckpointError
        from .documents import DocumentError
        from .engine import DocumentTooLongError

        expected = (
            UsageError,
            DocumentError,
            CheckpointError,
            DocumentTooLongError,
            BeaconConfigError,
            ValueError,
            OSError,
        )
        if not isinstance(error, expected) or args.verbose:
            logger.debug("details", exc_info=True)
        if not isinstance(error, expected):
            print(
                f"beacon-apps: unexpected error: {type(error).__name__}: {error}", file=sys.stderr
            )
            return 1
        print(f"beacon-apps: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
