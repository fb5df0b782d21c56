"""The engine: prompts, pinned ratios, the condensed-document cache and its exactness."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from counting import CountingTokenizer

from beacon_apps.beacon import GenerationSettings, generate
from beacon_apps.beacon.tiny import write_tiny_model
from beacon_apps.cache import CondensedCache
from beacon_apps.documents import Document, Page, documents_text, load_document
from beacon_apps.engine import (
    QA_SYSTEM_PROMPT,
    BeaconEngine,
    DocumentTooLongError,
    _TextDecoder,
    text_document,
)

WORDS = (
    "river stone lamp garden winter letter harbor signal copper violin meadow lantern orbit "
    "candle forest mirror thunder pepper marble ribbon"
).split()


def make_document(name: str, pages: int, words_per_page: int = 120, seed: int = 0) -> Document:
    generator = torch.Generator().manual_seed(seed)
    texts = []
    for page in range(pages):
        picks = torch.randint(len(WORDS), (words_per_page,), generator=generator).tolist()
        texts.append(f"Page {page + 1} says: " + " ".join(WORDS[i] for i in picks) + ".")
    return Document(
        source=name,
        name=name,
        pages=[Page(i + 1, t, str(i + 1)) for i, t in enumerate(texts)],
        metadata={},
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("engine-model"))


@pytest.fixture(scope="module")
def engine(model_dir) -> BeaconEngine:
    return BeaconEngine(model_dir)


@pytest.fixture(scope="module")
def book() -> Document:
    return make_document("book.txt", pages=12)


def fresh_engine(model_dir, **options) -> BeaconEngine:
    options.setdefault("cache", CondensedCache(max_bytes=0))  # no caching at all
    return BeaconEngine(model_dir, **options)


def test_cached_answers_equal_uncached_token_for_token(engine, model_dir, book):
    uncached = fresh_engine(model_dir)
    questions = ["Which page mentions copper?", "What is the lantern for?", "Summarize page 3."]
    first = [engine.ask(book, q, max_new_tokens=24) for q in questions]
    again = [engine.ask(book, q, max_new_tokens=24) for q in questions]
    reference = [uncached.ask(book, q, max_new_tokens=24) for q in questions]
    assert first[0].cached_tokens == 0
    for a, b, ref in zip(first, again, reference, strict=True):
        assert a.token_ids == b.token_ids == ref.token_ids
        assert a.text == b.text == ref.text
        assert b.cache_hit and ref.cached_tokens == 0
    # later questions about the same document restore its condensed prefix
    assert all(a.cached_tokens > 0 for a in first[1:])
    assert first[1].cached_tokens % engine.window == 0
    assert first[1].prefill_seconds < first[0].prefill_seconds


def test_streamed_deltas_make_the_answer(engine, book):
    stream = engine.stream_ask(book, "Which page mentions copper?", max_new_tokens=24)
    deltas = list(stream)
    assert "".join(deltas) == stream.answer.text
    assert stream.answer.completion_tokens == len(stream.answer.token_ids) <= 24


def test_two_documents_never_mix(engine, model_dir, book):
    other = make_document("other.txt", pages=12, seed=7)
    reference = fresh_engine(model_dir).ask(other, "Which page mentions copper?", max_new_tokens=24)
    engine.ask(book, "Which page mentions copper?", max_new_tokens=24)
    answer = engine.ask(other, "Which page mentions copper?", max_new_tokens=24)
    assert answer.token_ids == reference.token_ids
    assert answer.prompt_tokens == reference.prompt_tokens


def test_disk_cache_survives_restart_and_rejects_corruption(model_dir, book, tmp_path):
    question = "Where is the harbor?"
    first = BeaconEngine(model_dir, cache_dir=tmp_path)
    original = first.ask(book, question, max_new_tokens=16)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob("*.partial"))

    restarted = BeaconEngine(model_dir, cache_dir=tmp_path)
    again = restarted.ask(book, question, max_new_tokens=16)
    assert again.cached_tokens > 0 and again.token_ids == original.token_ids

    data = bytearray(files[0].read_bytes())
    data[-100:] = bytes(100)  # flip the end of the tensor data
    files[0].write_bytes(bytes(data))
    rebuilt_engine = BeaconEngine(model_dir, cache_dir=tmp_path)
    rebuilt = rebuilt_engine.ask(book, question, max_new_tokens=16)
    assert rebuilt.cached_tokens == 0  # the corrupt file was not trusted
    assert rebuilt.token_ids == original.token_ids
    assert (
        BeaconEngine(model_dir, cache_dir=tmp_path).ask(book, question, max_new_tokens=16).cache_hit
    )

    files[0].write_bytes(b"not a safetensors file")
    assert (
        BeaconEngine(model_dir, cache_dir=tmp_path)
        .ask(book, question, max_new_tokens=16)
        .cached_tokens
        == 0
    )


def test_memory_cache_is_bounded_in_bytes(model_dir):
    cache = CondensedCache()
    engine = BeaconEngine(model_dir, cache=cache)
    engine.ask(make_document("d", 10), "What?", max_new_tokens=2)
    one = cache.nbytes
    assert len(cache) == 1 and one > 0
    cache.clear()
    cache.max_bytes = int(2.5 * one)
    for seed in range(4):
        engine.ask(make_document(f"d{seed}", 10, seed=seed), "What?", max_new_tokens=2)
        assert cache.nbytes <= cache.max_bytes
    assert 0 < len(cache) < 4


def test_ratio_is_chosen_per_document_and_pinned(engine, book, model_dir):
    short = make_document("short.txt", pages=2)
    long_info = engine.info(book)
    short_info = engine.info(short)
    assert short_info.compression_ratio < long_info.compression_ratio
    assert long_info.fits and long_info.pages == 12
    assert long_info.tokens == engine.count_tokens(documents_text([book]))
    # the same document keeps its ratio whatever the question
    answers = [engine.ask(book, q, max_new_tokens=4) for q in ("Why?", "Why " * 60 + "?")]
    assert {a.compression_ratio for a in answers} == {long_info.compression_ratio}
    # a memory budget forces stronger compression
    budget = long_info.memory_bytes - 1
    tight = fresh_engine(model_dir, memory_budget_bytes=budget)
    assert tight.info(book).compression_ratio > long_info.compression_ratio
    assert tight.info(book).memory_bytes <= budget
    # a fixed ratio is used as given (32: stronger than the 16 auto picks; 8 would not fit)
    assert long_info.compression_ratio == 16
    assert (
        fresh_engine(model_dir, ratio=32).ask(book, "Why?", max_new_tokens=2).compression_ratio
        == 32
    )
    with pytest.raises(ValueError, match="ratio"):
        fresh_engine(model_dir, ratio=3)


def test_too_long_document_is_refused_for_questions_and_map_reduced_for_summaries(model_dir):
    engine = fresh_engine(model_dir)
    huge = make_document("huge.txt", pages=80, words_per_page=200)
    assert not engine.info(huge).fits
    with pytest.raises(DocumentTooLongError, match="do not fit"):
        engine.ask(huge, "What?", max_new_tokens=2)
    summary = engine.summarize(huge, "short", max_new_tokens=4)
    assert any("map-reduce" in notice for notice in summary.notices)
    assert summary.completion_tokens <= 4


def test_prompt_carries_page_markers_and_the_chat_template(engine, book):
    ids, document_end, _ = engine._document_prompt(
        documents_text([book]), [{"role": "user", "content": "Q?"}], "SYSTEM"
    )
    text = engine.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nSYSTEM<|im_end|>")
    assert "[page 1]" in text and "[page 12]" in text and "[document: book.txt]" in text
    assert text.endswith("Q?<|im_end|>\n<|im_start|>assistant\n")
    assert engine.tokenizer.decode(ids[:document_end]).endswith(book.pages[-1].text)


def test_requests_are_serialised(engine, book, model_dir):
    expected = fresh_engine(model_dir).ask(book, "Where is the violin?", max_new_tokens=12)
    results = []

    def worker():
        results.append(engine.ask(book, "Where is the violin?", max_new_tokens=12).token_ids)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected.token_ids] * 3


def test_cancelled_stream_frees_the_engine(engine, book):
    stream = engine.stream_ask(book, "Tell me everything.", max_new_tokens=50)
    next(iter(stream), None)
    stream.close()
    assert engine.ask(book, "Where?", max_new_tokens=2).completion_tokens <= 2


def test_stop_strings_cut_the_answer(engine, book):
    free = engine.ask(book, "Which page mentions copper?", max_new_tokens=24)
    assert len(free.text) > 6
    stop = free.text[3:6]  # spans several characters, maybe several tokens
    cut = engine.ask(book, "Which page mentions copper?", max_new_tokens=24, stop=[stop])
    assert cut.text == free.text[: free.text.find(stop)]
    assert cut.finish_reason == "stop"


def whole_text_decoding(tokenizer, ids, stops):
    """(deltas, text, stopped) as when the engine decoded the whole answer at every token."""
    deltas, emitted, text = [], 0, ""
    for n in range(1, len(ids) + 1):
        full = tokenizer.decode(ids[:n], skip_special_tokens=True)
        cut = min((full.find(s) for s in stops if s in full), default=-1)
        if cut >= 0:
            text, safe = full[:cut], cut
        else:
            text, safe = full, len(full.rstrip("\ufffd"))
            for stop in stops:
                for k in range(min(len(stop) - 1, len(full)), 0, -1):
                    if full.endswith(stop[:k]):
                        safe = min(safe, len(full) - k)
                        break
        if safe > emitted:
            deltas.append(text[emitted:safe])
            emitted = safe
        if cut >= 0:
            return deltas, text, True
    return deltas + ([text[emitted:]] if len(text) > emitted else []), text, False


def test_text_decoder_equals_decoding_the_whole_answer_every_token(engine):
    tokenizer = engine.tokenizer
    generator = torch.Generator().manual_seed(11)
    cases = [tokenizer.encode("naïve café, 日本語 🙂🚀 → done.\n" * 4, add_special_tokens=False)]
    cases += [torch.randint(len(tokenizer), (150,), generator=generator).tolist() for _ in range(4)]
    for ids in cases:
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        middle = len(whole) // 2
        stops = [whole[middle : middle + 4], whole[-3:], "日本", "🙂", "\n", "never there"]
        for stop_strings in [[], *([s] for s in stops if s), stops]:
            counting = CountingTokenizer(tokenizer)
            decoder = _TextDecoder(counting, stop_strings)
            deltas, stopped = [], False
            for token in ids:
                delta, stopped = decoder.add(token)
                deltas.append(delta)
                if stopped:
                    break
            deltas.append(decoder.flush())
            expected = whole_text_decoding(tokenizer, ids, stop_strings)
            assert ([d for d in deltas if d], decoder.text, stopped) == expected
            assert counting.decoded <= 8 * len(ids)  # a few tokens per token


def test_chat_and_completion_requests(engine, book):
    history = [{"role": "user", "content": "Which page mentions copper?"}]
    first = engine.chat(book, history, max_new_tokens=8)
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And?"}]
    second = engine.chat(book, history, max_new_tokens=8)
    assert second.cache_hit  # the document prefix of the first turn is reused
    completion = engine.complete("The river and the stone", max_new_tokens=5)
    assert completion.completion_tokens <= 5 and completion.prompt_tokens > 0
    with pytest.raises(ValueError, match="history"):
        engine.chat(book, [{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="question"):
        engine.ask(book, "   ")


def test_documents_from_files(engine, tmp_path):
    from pdf_factory import make_pdf

    path = tmp_path / "three.pdf"
    make_pdf(path, ["Alpha page text.", "Beta page text.", "Gamma page text."])
    document = load_document(path)
    info = engine.info([path])
    assert info.pages == 3 and info.names == [document.name]
    answer = engine.ask([path], "What is on page 2?", max_new_tokens=3)
    assert answer.prompt_tokens > engine.count_tokens("Beta page text.")
    assert text_document("plain words").pages[0].text == "plain words"


# ---------------------------------------------------------------------------------------------
# limits at a fixed ratio, the too-long message, timeouts, cancellation, condense


def in_thread(call):
    """Run `call` in a thread; returns (thread, result dict with "value" or "error")."""
    result: dict = {}

    def target():
        try:
            result["value"] = call()
        except BaseException as error:  # noqa: BLE001 (handed to the test)
            result["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def reach(engine: BeaconEngine, ratio: int) -> int:
    return (engine.native_context - engine.window) * ratio + engine.window


def test_a_fixed_ratio_is_checked_against_the_reach(model_dir, book):
    engine = fresh_engine(model_dir)
    tokens = engine.count_tokens(documents_text([book]))
    limit = reach(engine, 4) - engine.question_allowance
    assert tokens > limit  # the book overflows the model's positions at ratio 4
    info = engine.info(book, ratio=4)
    assert not info.fits and info.compression_ratio == 4
    with pytest.raises(DocumentTooLongError) as error:
        engine.ask(book, "Why?", ratio=4, max_new_tokens=2)
    message = str(error.value)
    assert message.startswith("book.txt: ") and f"{tokens} tokens" in message
    assert "ratio 4" in message and f"at most {limit} tokens" in message
    assert (error.value.tokens, error.value.ratio, error.value.limit) == (tokens, 4, limit)
    assert engine.info(book, ratio=16).fits
    # the engine's own ratio and a model whose ratio mix is fixed-N are checked the same way
    for fixed in (
        fresh_engine(model_dir, ratio=4),
        fresh_engine(model_dir, beacon_ratio_mix="fixed-4"),
    ):
        assert fixed.fixed_ratio == 4
        assert fixed.context_window == reach(engine, 4) < engine.context_window
        assert fixed.max_prompt_tokens(10) == reach(engine, 4) - 10
        info = fixed.info(book)
        assert not info.fits and info.compression_ratio == 4
        with pytest.raises(DocumentTooLongError, match="^book.txt: .* at ratio 4"):
            fixed.ask(book, "Why?", max_new_tokens=2)
        with pytest.raises(DocumentTooLongError, match="^the prompt: "):
            fixed.complete("river " * reach(engine, 4), max_new_tokens=2)
        assert (
            fixed.ask(
                make_document("short.txt", pages=1), "Why?", max_new_tokens=2
            ).compression_ratio
            == 4  # what fits at the fixed ratio is read at it
        )


def test_the_memory_budget_limits_a_fixed_ratio_and_the_advertised_context(model_dir, book):
    info = fresh_engine(model_dir, ratio=32).info(book)
    assert info.fits
    entry_bytes = info.memory_bytes // info.memory_entries
    budget = info.memory_bytes - 1
    tight = fresh_engine(model_dir, ratio=32, memory_budget_bytes=budget)
    assert not tight.info(book).fits
    with pytest.raises(DocumentTooLongError, match="memory budget"):
        tight.ask(book, "Why?", max_new_tokens=2)
    # exactly the longest prompt whose condensed memory stays within the budget
    capacity = (budget // entry_bytes - tight.window) * 32
    assert tight.context_window == capacity < reach(tight, 32)
    assert tight._entries(capacity, 32) * entry_bytes <= budget
    assert tight._entries(capacity + 1, 32) * entry_bytes > budget
    auto = fresh_engine(model_dir, memory_budget_bytes=budget)
    assert auto.context_window == capacity  # auto: the strongest ratio (32), within the budget


def test_too_long_message_names_the_real_limit_and_what_to_do(model_dir):
    huge = make_document("huge.txt", pages=80, words_per_page=200)
    for options in ({}, {"memory_budget_bytes": 2_000_000}):
        engine = fresh_engine(model_dir, **options)
        tokens = engine.count_tokens(documents_text([huge]))
        with pytest.raises(DocumentTooLongError, match="do not fit") as error:
            engine.ask(huge, "What?", max_new_tokens=2)
        message = str(error.value)
        limit = engine.max_prompt_tokens(engine.question_allowance)
        assert f"at most {limit} tokens" in message and error.value.limit == limit
        assert message.startswith(f"huge.txt: {tokens} tokens") and "ratio 32" in message
        assert "fewer or shorter documents" in message and "summary" in message
        assert tokens > limit and engine.info(huge).tokens == tokens


def test_a_summary_at_a_ratio_that_does_not_fit_is_map_reduced(model_dir, book):
    engine = fresh_engine(model_dir, question_allowance=64)
    summary = engine.summarize(book, "short", ratio=2, max_new_tokens=4)
    assert any("ratio 2" in notice and "map-reduce" in notice for notice in summary.notices)
    assert summary.compression_ratio == 2 and summary.completion_tokens <= 4


def test_timeouts_cover_summaries_and_waiting_for_the_engine(model_dir, book):
    engine = fresh_engine(model_dir)
    huge = make_document("huge.txt", pages=80, words_per_page=200)
    calls = [
        lambda: engine.ask(book, "Why?", max_new_tokens=2, timeout=0.01),
        lambda: engine.summarize(book, "short", max_new_tokens=2, timeout=0.01),
        lambda: engine.summarize(huge, "short", max_new_tokens=2, timeout=0.01),  # map-reduce
    ]
    for call in calls:
        with engine._lock:  # another request holds the engine past the deadline
            thread, result = in_thread(call)
            thread.join(timeout=60)  # (only so that a regression fails instead of hanging)
        thread.join()
        assert isinstance(result.get("error"), TimeoutError), result


def test_a_stream_cancelled_while_waiting_does_no_work(model_dir, book):
    engine = fresh_engine(model_dir)
    progress = []
    stream = engine.stream_ask(
        book, "Why?", max_new_tokens=4, on_progress=lambda done, total: progress.append(done)
    )
    with engine._lock:  # the engine is busy: the request waits, then is cancelled
        thread, result = in_thread(stream.consume)
        stream.cancel()
        thread.join(timeout=60)
        waited_out = not thread.is_alive()
    thread.join()
    assert waited_out  # it did not wait for the engine once cancelled
    answer = result["value"]
    assert answer.finish_reason == "cancelled" and answer.text == ""
    assert answer.completion_tokens == answer.cached_tokens == 0 and progress == []
    assert engine.ask(book, "Why?", max_new_tokens=2).completion_tokens <= 2


def test_overlapping_windows_prefill_reports_progress_and_cancels(model_dir, book):
    engine = fresh_engine(model_dir, beacon_pos="append", beacon_stride=32)
    question = "Where is the harbor?"
    ids, _, _ = engine._document_prompt(
        documents_text([book]), [{"role": "user", "content": question}], QA_SYSTEM_PROMPT
    )
    progress = []
    answer = engine.ask(
        book, question, max_new_tokens=8, on_progress=lambda done, total: progress.append(done)
    )
    last = 64 + (len(ids) - 1 - 64) // 32 * 32  # step boundaries: the window, then each stride
    assert progress == [*range(64, last + 1, 32), len(ids)]
    # reading in steps is exactly reading in one call
    model = engine.model
    model.memory.config = engine.beacon_config.replace(
        beacon_ratio_mix=f"fixed-{answer.compression_ratio}"
    )
    settings = GenerationSettings(max_new_tokens=8, eos_token_ids=engine.eos_token_ids)
    assert generate(model, torch.tensor([ids]), settings) == answer.token_ids

    seen = []

    def cancel_at_second(done, total):
        seen.append(done)
        if len(seen) == 2:
            stream.cancel()

    stream = engine.stream_ask(book, question, max_new_tokens=8, on_progress=cancel_at_second)
    cancelled = stream.consume()
    assert cancelled.finish_reason == "cancelled" and seen == [64, 96]
    assert cancelled.completion_tokens == 0


def test_condense_reads_exactly_the_document(model_dir):
    engine = fresh_engine(model_dir, cache=CondensedCache())
    window = engine.window
    for extra in range(window):  # a document whose prompt tail crosses a window boundary
        document = text_document("river stone lamp " * (100 + extra), "doc.txt")
        ids, document_end, _ = engine._document_prompt(
            documents_text([document]), [{"role": "user", "content": ""}], QA_SYSTEM_PROMPT
        )
        boundary = document_end // window * window
        if (len(ids) - 1) // window * window > boundary:
            break
    else:
        pytest.fail("no document with a tail across a window boundary")
    progress = []
    answer = engine.condense(
        document, on_progress=lambda done, total: progress.append((done, total))
    )
    assert answer.finish_reason == "condensed" and answer.text == ""
    assert answer.completion_tokens == 0 and answer.cached_tokens == 0
    assert answer.prompt_tokens == boundary == engine.model.memory.num_tokens
    assert progress[-1] == (boundary, boundary)
    again = engine.condense(document)
    assert again.cached_tokens == again.prompt_tokens == boundary
    assert engine.ask(document, "Where?", max_new_tokens=2).cached_tokens == boundary
