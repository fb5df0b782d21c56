"""The engine: prompts, pinned ratios, the condensed-document cache and its exactness."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from beacon_apps.beacon.tiny import write_tiny_model
from beacon_apps.cache import CondensedCache
from beacon_apps.documents import Document, Page, documents_text, load_document
from beacon_apps.engine import BeaconEngine, DocumentTooLongError, text_document

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
    # a fixed ratio is used as given
    assert (
        fresh_engine(model_dir, ratio=8).ask(book, "Why?", max_new_tokens=2).compression_ratio == 8
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
