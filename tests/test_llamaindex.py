"""LlamaIndex adapters: BeaconLLM, BeaconReader, whole-document querying, stock SummaryIndex.

One tiny random-weight engine per module; the tests check mechanics (one LLM call with every
page in it, page labels kept, cache reuse, streaming/async agreeing with sync), not answers.
"""

from __future__ import annotations

from pathlib import Path

import llama_index.core
import pytest
from llama_index.core import Settings, SummaryIndex
from llama_index.core.llms import ChatMessage
from test_langchain import assert_loop_keeps_ticking, words

from beacon_apps.engine import BeaconEngine
from integrations.llamaindex import BeaconLLM, BeaconReader, WholeDocumentQueryEngine

# A preface numbered "i", then pages "1" and "2": labels differ from page numbers on purpose.
PAGES = [
    ("i", "Preface: the keeper's diary was found in a copper box. " * 6),
    ("1", "The lighthouse keeper wrote a letter every winter. " * 8),
    ("2", "The harbor froze in January and the violin maker rang the bell twice. " * 8),
]
LONG_PROMPT = " ".join(f"Line {i}: the river keeps its stones." for i in range(80))


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> BeaconEngine:
    return BeaconEngine(tiny_model_dir())


@pytest.fixture(scope="module")
def llm(engine) -> BeaconLLM:
    return BeaconLLM(engine=engine, max_new_tokens=16)


@pytest.fixture(scope="module")
def pdf(tmp_path_factory) -> Path:
    from fpdf import FPDF  # not pdf_factory: it makes no page labels

    document = FPDF()
    document.set_font("helvetica", size=11)
    for number, (_, text) in enumerate(PAGES):
        document.add_page()
        if number == 0:
            document.set_page_label(label_style="r")
        if number == 1:
            document.set_page_label(label_style="D", label_start=1)
        document.multi_cell(0, 6, text)
    path = tmp_path_factory.mktemp("pdf") / "diary.pdf"
    document.output(str(path))
    return path


@pytest.fixture
def model_tokenizer(llm, monkeypatch):
    """`Settings.tokenizer = llm.tokenizer_fn()` for one test (LlamaIndex keeps it global)."""
    monkeypatch.setattr(llama_index.core, "global_tokenizer", None)
    Settings.tokenizer = llm.tokenizer_fn()


@pytest.fixture
def calls(engine, monkeypatch) -> list:
    """Every request the engine gets from BeaconLLM: (messages or prompt, the AnswerStream)."""
    recorded = []
    for name in ("stream_chat_messages", "stream_complete"):
        original = getattr(engine, name)

        def record(prompt, *args, _original=original, **kwargs):
            stream = _original(prompt, *args, **kwargs)
            recorded.append((prompt, stream))
            return stream

        monkeypatch.setattr(engine, name, record)
    return recorded


def messages() -> list[ChatMessage]:
    return [
        ChatMessage(role="system", content="You are terse."),
        ChatMessage(role="user", content="Hello"),
        ChatMessage(role="assistant", content="Hi."),
        ChatMessage(role="user", content="What now?"),
    ]


# ---------------------------------------------------------------------- BeaconLLM
def test_metadata_advertises_the_extended_context(llm, engine):
    metadata = llm.metadata
    assert metadata.context_window == engine.context_window > engine.native_context
    assert metadata.num_output == 16
    assert metadata.is_chat_model is True and metadata.is_function_calling_model is False
    assert metadata.model_name == engine.model_name


def test_complete_and_stream_complete_agree(llm):
    response = llm.complete("Hello")
    assert response.text and response.additional_kwargs["completion_tokens"] == 16
    assert response.raw["usage"]["prompt_tokens"] == response.additional_kwargs["prompt_tokens"]
    streamed = list(llm.stream_complete("Hello"))
    assert "".join(r.delta for r in streamed) == response.text == streamed[-1].text
    assert streamed[-1].additional_kwargs["finish_reason"] == "length"


def test_chat_uses_the_chat_template(llm, engine):
    rendered = engine.tokenizer.apply_chat_template(
        [{"role": m.role.value, "content": m.content} for m in messages()],
        tokenize=False,
        add_generation_prompt=True,
    )
    response = llm.chat(messages())
    assert response.message.role == "assistant" and response.message.content
    assert response.additional_kwargs["prompt_tokens"] == engine.count_tokens(rendered)
    streamed = list(llm.stream_chat(messages()))
    assert "".join(r.delta for r in streamed) == response.message.content
    assert streamed[-1].additional_kwargs["cache_hit"] is False


async def test_async_variants_agree_with_sync(llm):
    text = llm.complete("Hello").text
    assert (await llm.acomplete("Hello")).text == text
    assert "".join([r.delta async for r in await llm.astream_complete("Hello")]) == text
    reply = llm.chat(messages()).message.content
    assert (await llm.achat(messages())).message.content == reply
    assert "".join([r.delta async for r in await llm.astream_chat(messages())]) == reply


async def test_async_chat_does_not_block_the_event_loop(llm):
    long_chat = [ChatMessage(role="user", content=LONG_PROMPT)]

    async def stream() -> list[str]:
        return [r.delta async for r in await llm.astream_chat(long_chat, max_new_tokens=128)]

    assert len(await assert_loop_keeps_ticking(stream())) > 10


def test_timeout_and_unknown_settings_reach_the_engine(llm, engine):
    slow = BeaconLLM(engine=engine, generate_kwargs={"timeout": 1e-9})
    with pytest.raises(TimeoutError):
        slow.complete(LONG_PROMPT)
    with pytest.raises(TimeoutError):
        list(llm.stream_chat([ChatMessage(role="user", content=LONG_PROMPT)], timeout=1e-9))
    with pytest.raises(ValueError, match="top_q"):
        llm.complete("Hello", top_q=0.5)
    assert llm.complete("Hello").text  # the engine was freed


async def test_async_stream_stopped_early_cancels_the_request(llm, calls):
    responses = await llm.astream_chat(
        [ChatMessage(role="user", content=LONG_PROMPT)], max_new_tokens=2000
    )
    async for _ in responses:
        break
    await responses.aclose()
    assert (await llm.acomplete("Hello")).text  # the engine was freed
    assert calls[0][1].answer.finish_reason == "cancelled"
    assert calls[0][1].answer.completion_tokens < 2000


def test_wrappers_share_one_engine(llm, engine):
    other = BeaconLLM(engine=engine, temperature=0.7, generate_kwargs={"seed": 1})
    assert other.engine is llm.engine is engine
    assert other.complete("Hello").text == other.complete("Hello").text  # seeded sampling
    with pytest.raises(ValueError, match="differs from the engine"):
        BeaconLLM("another/model", engine=engine)


def test_tokenizer_fn_is_the_model_tokenizer(llm, engine, model_tokenizer):
    text = "Tokenizers differ: café, naïve, 1234."
    expected = engine.tokenizer.encode(text, add_special_tokens=False)
    assert llm.tokenizer_fn()(text) == expected
    assert Settings.tokenizer(text) == expected


def test_second_chat_about_a_long_text_reuses_the_cache(tiny_model_dir):
    llm = BeaconLLM(engine=BeaconEngine(tiny_model_dir()), max_new_tokens=4)
    first = llm.chat([ChatMessage(role="user", content=f"{LONG_PROMPT}\n\nWhich line?")])
    second = llm.chat([ChatMessage(role="user", content=f"{LONG_PROMPT}\n\nWhich stones?")])
    assert first.additional_kwargs["cached_tokens"] == 0
    assert second.additional_kwargs["cached_tokens"] > 0 and second.additional_kwargs["cache_hit"]


# ---------------------------------------------------------------------- reader
def test_reader_one_document_per_page_with_labels(pdf):
    pages = BeaconReader().load_data(pdf)
    assert [words(p.text) for p in pages] == [words(text) for _, text in PAGES]
    for number, (page, (label, _)) in enumerate(zip(pages, PAGES, strict=True), 1):
        assert page.metadata["page_label"] == label
        assert page.metadata["page_number"] == number
        assert page.metadata["file_name"] == "diary.pdf"
        assert page.metadata["total_pages"] == 3
        shown = page.get_content(metadata_mode="llm")
        assert f"page_label: {label}" in shown and "file_path" not in shown


def test_reader_whole_file_keeps_page_markers(pdf):
    (whole,) = BeaconReader(return_full_document=True).load_data(pdf, extra_info={"shelf": 3})
    assert whole.metadata["shelf"] == 3 and "page_label" not in whole.metadata
    for label, text in PAGES:
        assert f"[page {label}]" in whole.text and words(text) in words(whole.text)


# ---------------------------------------------------------------------- SummaryIndex recipe
@pytest.mark.parametrize("mode", ["compact", "tree_summarize"])
def test_summary_index_makes_one_call_with_every_page(pdf, llm, calls, model_tokenizer, mode):
    index = SummaryIndex.from_documents(BeaconReader().load_data(pdf))
    assert sorted(n.metadata["page_label"] for n in index.docstore.docs.values()) == ["1", "2", "i"]
    response = index.as_query_engine(response_mode=mode, llm=llm).query("Who rang the bell?")
    assert str(response)
    assert len(calls) == 1
    prompt = words(calls[0][0][-1]["content"])
    for label, text in PAGES:
        assert f"page_label: {label}" in prompt and words(text) in prompt
    assert {n.metadata["page_label"] for n in response.source_nodes} == {"i", "1", "2"}


def test_summary_index_second_query_reuses_the_cache(pdf, tiny_model_dir, model_tokenizer):
    engine = BeaconEngine(tiny_model_dir())  # its own (empty) cache
    llm = BeaconLLM(engine=engine, max_new_tokens=4)
    query_engine = SummaryIndex.from_documents(BeaconReader().load_data(pdf)).as_query_engine(
        response_mode="compact", llm=llm
    )
    query_engine.query("Who rang the bell twice, and who wrote letters every winter?")
    hits = engine.cache.hits
    query_engine.query("Who?")  # shorter than the first: still finds the condensed pages
    assert engine.cache.hits == hits + 1


# ---------------------------------------------------------------------- WholeDocumentQueryEngine
def test_whole_document_query_engine_answers_and_reuses_the_cache(pdf, tiny_model_dir):
    llm = BeaconLLM(engine=BeaconEngine(tiny_model_dir()), max_new_tokens=8)
    pages = BeaconReader().load_data(pdf)
    query_engine = WholeDocumentQueryEngine(llm=llm, documents=pages)
    first = query_engine.query("Who rang the bell, and on which page is it said?")
    assert str(first) and first.metadata["completion_tokens"] == 8
    assert first.metadata["prompt_tokens"] > llm.engine.count_tokens(
        "".join(text for _, text in PAGES)
    )
    assert [n.node.metadata["page_label"] for n in first.source_nodes] == ["i", "1", "2"]
    second = query_engine.query("Who?")  # shorter: the document prefix is exact here
    assert second.metadata["cache_hit"] is True and second.metadata["cached_tokens"] > 0


def test_whole_document_query_engine_streams_from_paths(pdf, llm):
    query_engine = WholeDocumentQueryEngine(llm=llm, documents=[pdf], streaming=True)
    assert [n.node.metadata["page_label"] for n in query_engine._sources] == ["i", "1", "2"]
    response = query_engine.query("Who rang the bell?")
    assert response.metadata == {}  # filled in when the stream ends
    text = "".join(response.response_gen)
    assert text and response.metadata["finish_reason"] == "length"
    blocking = WholeDocumentQueryEngine(llm=llm, documents=[pdf]).query("Who rang the bell?")
    assert text == str(blocking)


async def test_whole_document_query_engine_async(pdf, llm):
    query_engine = WholeDocumentQueryEngine(llm=llm, documents=[pdf])
    expected = str(query_engine.query("Who rang the bell?"))
    assert str(await query_engine.aquery("Who rang the bell?")) == expected
    streaming = WholeDocumentQueryEngine(llm=llm, documents=[pdf], streaming=True)
    response = await streaming.aquery("Who rang the bell?")
    assert "".join([d async for d in response.async_response_gen()]) == expected
    assert response.metadata["cache_hit"] is True


def test_whole_document_summary(pdf, tiny_model_dir):
    llm = BeaconLLM(engine=BeaconEngine(tiny_model_dir()), max_new_tokens=16)
    query_engine = WholeDocumentQueryEngine(llm=llm, documents=[pdf])
    query_engine.query("Who rang the bell?")
    summary = query_engine.summarize("short")
    assert str(summary) and summary.metadata["completion_tokens"] <= 16  # the LLM's max_new_tokens
    assert summary.metadata["cache_hit"] is True  # the same condensed pages as the question
    with pytest.raises(ValueError, match="length"):
        query_engine.summarize("epic")
