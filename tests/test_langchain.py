"""LangChain adapters: BeaconLLM and ChatBeacon over one tiny engine, loader and chains.

The tiny model has random weights, so tests check mechanics against the model's own greedy
output (equal text across invoke/stream/async/batch, stop strings cut where they first appear,
every token reaching callbacks), never the content of answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.prompts import PromptTemplate
from pdf_factory import make_pdf
from pydantic import ValidationError

from beacon_apps.documents import documents_text, load_document
from beacon_apps.engine import BeaconEngine
from integrations.langchain import (
    BeaconDocumentLoader,
    BeaconLLM,
    ChatBeacon,
    format_documents,
    qa_prompt,
    summarize_chain,
    summary_prompt,
    whole_document_qa_chain,
)

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    "The lighthouse keeper wrote a letter every winter. " * 8,
    "The harbor froze in January and the copper bell rang twice. " * 8,
    "In spring the violin maker repaired the signal lamp with a ribbon. " * 8,
]
LONG_PROMPT = " ".join(f"Line {i}: the river keeps its stones." for i in range(80))


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> BeaconEngine:
    return BeaconEngine(tiny_model_dir())


@pytest.fixture(scope="module")
def llm(engine) -> BeaconLLM:
    return BeaconLLM(engine=engine, max_tokens=24)


@pytest.fixture(scope="module")
def chat(engine) -> ChatBeacon:
    return ChatBeacon(engine=engine, max_tokens=24)


@pytest.fixture(scope="module")
def pdf(tmp_path_factory) -> Path:
    return make_pdf(tmp_path_factory.mktemp("pdf") / "keeper.pdf", PAGES)


class Tokens(BaseCallbackHandler):
    """Collects what `on_llm_new_token` receives and the messages chat models start with."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.prompts: list = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)

    def on_chat_model_start(self, serialized, messages, **kwargs) -> None:
        self.prompts.append(messages[0])


def words(text: str) -> str:
    return " ".join(text.split())


async def assert_loop_keeps_ticking(awaitable: Awaitable) -> Any:
    """Await `awaitable` while a task ticks every 5 ms; a blocked event loop would not tick."""
    ticks, done = 0, asyncio.Event()

    async def tick() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    ticker = asyncio.create_task(tick())
    started = time.perf_counter()
    result = await awaitable
    elapsed = time.perf_counter() - started
    done.set()
    await ticker
    assert elapsed > 0.1  # long enough that a blocked loop would show
    assert ticks >= max(5, elapsed / 0.005 / 10)
    return result


# ---------------------------------------------------------------------- BeaconLLM
def test_llm_invoke_stream_batch_agree(llm):
    text = llm.invoke("Hello")
    assert text and text == "".join(llm.stream("Hello"))
    assert llm.batch(["Hello", "Hey"]) == [text, llm.invoke("Hey")]


async def test_llm_async_agrees_with_sync(llm):
    text = llm.invoke("Hello")
    assert await llm.ainvoke("Hello") == text
    assert "".join([chunk async for chunk in llm.astream("Hello")]) == text
    assert await llm.abatch(["Hello", "Hello"]) == [text, text]


def test_llm_callbacks_get_every_token(llm):
    handler = Tokens()
    text = llm.invoke("Hello", config={"callbacks": [handler]})
    assert len(handler.tokens) > 5 and "".join(handler.tokens) == text


async def test_llm_async_callbacks_get_every_token(llm):
    handler = Tokens()
    text = await llm.ainvoke("Hello", config={"callbacks": [handler]})
    assert len(handler.tokens) > 5 and "".join(handler.tokens) == text


def test_llm_stop_string_spanning_several_tokens(llm):
    prompt = "The river"
    deltas = [d for d in llm.stream(prompt, max_tokens=40) if d]
    full = "".join(deltas)
    # A stop string that starts inside one streamed piece and ends inside the piece after next.
    i = next(k for k in range(3, len(deltas) - 2) if len(deltas[k]) > 1 and deltas[k + 2])
    stop = deltas[i][-2:] + deltas[i + 1] + deltas[i + 2][:1]
    expected = full[: full.find(stop)]
    assert llm.invoke(prompt, max_tokens=40, stop=[stop]) == expected
    streamed = list(llm.stream(prompt, max_tokens=40, stop=[stop]))
    assert "".join(streamed) == expected
    assert BeaconLLM(engine=llm.engine, stop=[stop]).invoke(prompt, max_tokens=40) == expected
    info = llm.generate([prompt], stop=[stop], max_tokens=40).generations[0][0].generation_info
    assert info["finish_reason"] == "stop"


async def test_llm_ainvoke_does_not_block_the_event_loop(llm):
    assert await assert_loop_keeps_ticking(llm.ainvoke(LONG_PROMPT, max_tokens=128))


def test_llm_counts_tokens_with_the_model_tokenizer(llm, engine):
    text = "Tokenizers differ: café, naïve, 1234."
    assert llm.get_token_ids(text) == engine.tokenizer.encode(text, add_special_tokens=False)
    assert llm.get_num_tokens(text) == engine.count_tokens(text)


def test_llm_identity_and_generation_info(llm, engine):
    params = llm._identifying_params
    assert params["model"] == engine.model_name and params["max_tokens"] == 24
    assert params["context_window"] == engine.context_window
    info = llm.generate(["Hello"]).generations[0][0].generation_info
    assert info["completion_tokens"] == 24 and info["finish_reason"] == "length"
    assert {"cached_tokens", "cache_hit", "compression_ratio", "total_seconds"} <= set(info)


def test_wrappers_load_a_model_or_share_an_engine(tiny_model_dir, engine):
    own = BeaconLLM(model=str(tiny_model_dir()), max_tokens=4)
    assert own.engine is not engine and own.model == str(tiny_model_dir())
    shared = ChatBeacon(engine=own.engine)
    assert shared.engine is own.engine and shared.model == own.model
    with pytest.raises(ValidationError, match="differs from the engine"):
        ChatBeacon(engine=engine, model="another/model")


# ---------------------------------------------------------------------- ChatBeacon
def test_chat_uses_the_chat_template_with_system_and_history(chat, engine):
    messages = [
        SystemMessage("You are terse."),
        HumanMessage("Hello"),
        AIMessage("Hi."),
        HumanMessage("What now?"),
    ]
    roles = [("system", "You are terse."), ("user", "Hello"), ("assistant", "Hi.")]
    rendered = engine.tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in [*roles, ("user", "What now?")]],
        tokenize=False,
        add_generation_prompt=True,
    )
    result = chat.invoke(messages)
    assert result.usage_metadata["input_tokens"] == engine.count_tokens(rendered)
    assert chat.get_num_tokens_from_messages(messages) == engine.count_tokens(rendered)


def test_chat_stream_chunks_and_metadata(chat, engine):
    chunks = list(chat.stream("Hello"))
    assert all(c.content for c in chunks[:-1]) and len(chunks) > 5
    last = chunks[-1]
    assert last.chunk_position == "last" and last.usage_metadata["output_tokens"] == 24
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    invoked = chat.invoke("Hello")
    assert full.content == invoked.content
    metadata = invoked.response_metadata
    assert metadata["model_name"] == engine.model_name
    assert metadata["finish_reason"] == "length"
    assert metadata["compression_ratio"] in engine.beacon_config.beacon_ratio
    assert metadata["cached_tokens"] == 0 and metadata["cache_hit"] is False
    assert metadata["prefill_seconds"] <= metadata["total_seconds"]
    usage = invoked.usage_metadata
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


async def test_chat_astream_does_not_block_and_reports_tokens(chat):
    handler = Tokens()

    async def stream() -> list:
        config = {"callbacks": [handler]}
        return [c async for c in chat.astream(LONG_PROMPT, config=config, max_tokens=128)]

    chunks = await assert_loop_keeps_ticking(stream())
    assert "".join(handler.tokens) == "".join(c.content for c in chunks)
    assert chunks[-1].response_metadata["finish_reason"] == "length"


def test_chat_advertises_the_extended_context(chat, engine):
    assert chat.context_window == engine.context_window > engine.native_context
    # The longest prompt that leaves room for the answer: max_tokens here, 256 by default.
    assert chat.profile["max_input_tokens"] == engine.max_prompt_tokens(24)
    assert ChatBeacon(engine=engine).profile["max_input_tokens"] == engine.max_prompt_tokens(256)
    assert engine.max_prompt_tokens(256) > engine.native_context
    assert chat.profile["tool_calling"] is False and chat.profile["image_inputs"] is False


def test_chat_timeout_none_by_default_and_enforced_when_set(chat, engine):
    assert chat.timeout is None
    with pytest.raises(TimeoutError):
        ChatBeacon(engine=engine, timeout=1e-9).invoke(LONG_PROMPT)
    with pytest.raises(TimeoutError):  # per call too, and while streaming
        list(chat.stream(LONG_PROMPT, timeout=1e-9))
    assert chat.invoke("Hello").content  # the engine was freed


async def test_async_timeout_and_unknown_settings(chat, llm):
    with pytest.raises(TimeoutError):
        await chat.ainvoke(LONG_PROMPT, timeout=1e-9)
    with pytest.raises(ValueError, match="top_q"):
        await chat.ainvoke("Hello", top_q=0.5)
    with pytest.raises(ValueError, match="top_q"):
        llm.invoke("Hello", top_q=0.5)
    assert await chat.ainvoke("Hello")  # the engine was freed


async def test_astream_stopped_early_cancels_the_request(chat, engine, monkeypatch):
    streams = []
    original = engine.stream_chat_messages
    monkeypatch.setattr(
        engine,
        "stream_chat_messages",
        lambda *a, **k: streams.append(original(*a, **k)) or streams[-1],
    )
    chunks = chat.astream(LONG_PROMPT, max_tokens=2000)
    async for _ in chunks:
        break
    await chunks.aclose()
    assert (await chat.ainvoke("Hello")).content  # the engine was freed
    assert streams[0].answer.finish_reason == "cancelled"
    assert streams[0].answer.completion_tokens < 2000


def test_chat_rejects_images(chat):
    image = {"type": "image", "url": "https://example.org/cat.png"}
    with pytest.raises(ValueError, match="text only"):
        chat.invoke([HumanMessage(content=[{"type": "text", "text": "What?"}, image])])


# ---------------------------------------------------------------------- loader and chains
def test_loader_one_document_per_page_with_metadata(pdf):
    pages = BeaconDocumentLoader(pdf).load()
    assert [words(p.page_content) for p in pages] == [words(t) for t in PAGES]
    for number, page in enumerate(pages, 1):
        assert page.metadata["page_number"] == number
        assert page.metadata["page_label"] == str(number)
        assert page.metadata["total_pages"] == 3
        assert page.metadata["file_name"] == "keeper.pdf"
        assert page.metadata["source"] == str(pdf)


def test_loader_single_mode_keeps_page_markers(pdf):
    (whole,) = BeaconDocumentLoader([pdf], mode="single").load()
    assert whole.metadata["total_pages"] == 3 and "page_label" not in whole.metadata
    for number, text in enumerate(PAGES, 1):
        assert f"[page {number}]" in whole.page_content
        assert words(text) in words(whole.page_content)


def test_documents_are_formatted_exactly_as_the_engine_formats_them(pdf, tmp_path):
    other = make_pdf(tmp_path / "other.pdf", ["A second file.", "Its second page."])
    expected = documents_text([load_document(pdf), load_document(other)])
    assert format_documents(BeaconDocumentLoader([pdf, other]).load()) == expected
    single = BeaconDocumentLoader([pdf, other], mode="single").load()
    assert format_documents(single) == expected


def test_qa_chain_puts_every_page_in_one_prompt(pdf, chat):
    pages = BeaconDocumentLoader(pdf).load()
    handler = Tokens()
    answer = whole_document_qa_chain(chat).invoke(
        {"context": pages, "question": "Who rang the bell?"}, config={"callbacks": [handler]}
    )
    assert isinstance(answer, str) and answer
    (prompt,) = handler.prompts  # one model call
    system, human = prompt
    assert "[page N]" in system.content
    for number, text in enumerate(PAGES, 1):
        assert f"[page {number}]" in human.content and words(text) in words(human.content)
    assert human.content.rstrip().endswith("Who rang the bell?")


def test_second_question_on_the_same_document_reuses_the_cache(pdf, tiny_model_dir):
    engine = BeaconEngine(tiny_model_dir())  # its own (empty) cache
    chat = ChatBeacon(engine=engine, max_tokens=8)
    pages = BeaconDocumentLoader(pdf).load()
    ask = qa_prompt() | chat
    first = ask.invoke({"context": pages, "question": "Who wrote a letter?"})
    second = ask.invoke({"context": pages, "question": "When did the harbor freeze?"})
    assert first.response_metadata["cache_hit"] is False
    assert second.response_metadata["cache_hit"] is True
    assert second.response_metadata["cached_tokens"] > 0
    assert second.usage_metadata["input_token_details"]["cache_read"] > 0
    assert engine.cache.hits == 1


def test_shorter_follow_up_question_reuses_the_cache(pdf, tiny_model_dir):
    chat = ChatBeacon(engine=BeaconEngine(tiny_model_dir()), max_tokens=4)
    pages = BeaconDocumentLoader(pdf).load()
    ask = qa_prompt() | chat
    long_question = "In as much detail as the pages allow, " * 12 + "who wrote the letter?"
    ask.invoke({"context": pages, "question": long_question})
    second = ask.invoke({"context": pages, "question": "Who?"})
    assert second.response_metadata["cache_hit"] is True


def test_summary_and_questions_share_the_condensed_pages(pdf, tiny_model_dir):
    chat = ChatBeacon(engine=BeaconEngine(tiny_model_dir()), max_tokens=4)
    pages = BeaconDocumentLoader(pdf).load()
    (qa_prompt() | chat).invoke({"context": pages, "question": "Who wrote the letter?"})
    summary = (summary_prompt("short") | chat).invoke({"context": pages})
    assert summary.response_metadata["cache_hit"] is True


def test_summarize_chain_with_chat_and_plain_llm(pdf, chat, llm):
    pages = BeaconDocumentLoader(pdf).load()
    handler = Tokens()
    summary = summarize_chain(chat, "short").invoke(
        {"context": pages}, config={"callbacks": [handler]}
    )
    assert isinstance(summary, str) and summary
    (prompt,) = handler.prompts
    assert prompt[-1].content.endswith("Summarize the document above in 3 to 5 sentences.")
    assert summarize_chain(llm, "short").invoke({"context": pages})
    with pytest.raises(ValueError, match="length"):
        summarize_chain(chat, "epic")


def test_plain_llm_in_a_prompt_chain(llm):
    chain = PromptTemplate.from_template("Page {n} says:") | llm
    assert chain.invoke({"n": 3}) == llm.invoke("Page 3 says:")
