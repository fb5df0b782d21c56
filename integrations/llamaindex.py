"""LlamaIndex adapters over `beacon_apps.engine`: whole documents instead of retrieved chunks.

A beacon model reads far more than its native window (`metadata.context_window` is the extended
context), so LlamaIndex's stock parts already do whole-document QA once they know it:
`SummaryIndex(...).as_query_engine(response_mode="compact")` packs every page into ONE prompt
when the document fits, instead of refining over many calls. Two things make LlamaIndex see the
real budget: `BeaconLLM.metadata` (context window, output tokens, chat model) and
`Settings.tokenizer = llm.tokenizer_fn()` (count with the model's tokenizer, not tiktoken).

* `BeaconLLM`: `CustomLLM` with complete/chat, streaming and async (the model runs in a worker
  thread, so the event loop keeps going); chat messages go through the model's chat template.
* `BeaconReader`: PDFs/text through the project's ingestion; one `Document` per page
  (`page_label`, `page_number`, `file_name`, ...) or per file.
* `WholeDocumentQueryEngine`: question -> answer over the entire text (no retrieval), citing
  `[page N]`, streaming or not, plus `summarize()`.

Every wrapper translates calls into one `BeaconEngine`: share it (`BeaconLLM(engine=...)`) and the
condensed-document cache makes the second query about a document cheap; the numbers are in
`additional_kwargs` (`cached_tokens`, `cache_hit`, `compression_ratio`, timings).
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
)
from llama_index.core.base.response.schema import (
    AsyncStreamingResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.readers.base import BaseReader
from llama_index.core.schema import BaseNode, NodeWithScore
from llama_index.core.schema import Document as LIDocument

from beacon_apps.default_model import default_model
from beacon_apps.documents import Document, Page, load_document
from beacon_apps.engine import Answer, AnswerStream, BeaconEngine, aiterate

__all__ = ["BeaconLLM", "BeaconReader", "WholeDocumentQueryEngine"]


def _final(answer: Answer) -> CompletionResponse:
    """The closing response: full text, the engine's numbers, and OpenAI-shaped usage in `raw`
    (where LlamaIndex's TokenCountingHandler looks for real token counts)."""
    usage = {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }
    return CompletionResponse(
        text=answer.text, delta="", additional_kwargs=answer.metadata(), raw={"usage": usage}
    )


def _chat(response: CompletionResponse) -> ChatResponse:
    return ChatResponse(
        message=ChatMessage(role=MessageRole.ASSISTANT, content=response.text),
        delta=response.delta,
        raw=response.raw,
        additional_kwargs=response.additional_kwargs,
    )


def _engine_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """LlamaIndex messages as the engine's {"role", "content"} dicts (text blocks only)."""
    for message in messages:
        for block in message.blocks:
            if not isinstance(block, TextBlock):
                raise ValueError(
                    f"content: BeaconLLM reads text only, got a {type(block).__name__}"
                )
    return [{"role": m.role.value, "content": m.content or ""} for m in messages]


class BeaconLLM(CustomLLM):
    """A beacon model as a LlamaIndex LLM whose context window is the extended one.

        llm = BeaconLLM(model="namespace-Pt/beacon-qwen-2-7b-instruct", max_new_tokens=512)
        Settings.llm, Settings.tokenizer = llm, llm.tokenizer_fn()
        llm.metadata.context_window  # what the model reads with beacons, e.g. 128K+

    `complete` continues text as is; `chat` applies the model's chat template. Streaming
    responses end with one extra response (`delta=""`) that carries the engine's numbers in
    `additional_kwargs`. Build several wrappers over one loaded model with `engine=`.
    """

    model: str = Field(
        default="", description="Hub id or folder of the model (default: see default_model)."
    )
    temperature: float = Field(default=0.0, ge=0.0, description="0: greedy; above 0: sampling.")
    max_new_tokens: int = Field(default=256, gt=0, description="New tokens at most.")
    generate_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="More engine generation settings: top_p, top_k, repetition_penalty, stop, "
        "seed, timeout (seconds per call, reading included; none by default).",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="BeaconEngine options used when loading `model` (device, dtype, ratio, ...).",
    )
    _engine: BeaconEngine = PrivateAttr()

    def __init__(
        self, model: str | None = None, *, engine: BeaconEngine | None = None, **kwargs: Any
    ) -> None:
        if engine is None:
            model = str(model or default_model())
            engine = BeaconEngine(model, **kwargs.get("engine_kwargs", {}))
        elif model is not None and str(model) != engine.model_name:
            raise ValueError(
                f"model: {model!r} differs from the engine's model {engine.model_name!r}; "
                "give one or the other"
            )
        super().__init__(model=engine.model_name, **kwargs)
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "BeaconLLM"

    @property
    def engine(self) -> BeaconEngine:
        """The loaded model; pass it to other wrappers (`engine=`) to share it."""
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        """The extended context window and `num_output`: LlamaIndex packs prompts up to
        `context_window - num_output`, which is `engine.max_prompt_tokens(max_new_tokens)`."""
        return LLMMetadata(
            context_window=self._engine.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=False,
            model_name=self.model,
        )

    def tokenizer_fn(self) -> Callable[[str], list[int]]:
        """The model's tokenizer as LlamaIndex wants it: `Settings.tokenizer = llm.tokenizer_fn()`.

        LlamaIndex counts with tiktoken otherwise, and its prompt packing (compact,
        tree_summarize, chat memory) then misjudges how much of the window a document takes.
        """
        return functools.partial(self._engine.tokenizer.encode, add_special_tokens=False)

    def _generation(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "max_new_tokens": self.max_new_tokens,
            **self.generate_kwargs,
            **kwargs,
        }

    # ------------------------------------------------------------------ shared stream plumbing
    @staticmethod
    def _responses(stream: AnswerStream) -> Iterator[CompletionResponse]:
        text = ""
        try:
            for delta in stream:
                text += delta
                yield CompletionResponse(text=text, delta=delta)
        finally:
            stream.close()  # frees the engine if the caller stops early
        yield _final(stream.answer)

    @staticmethod
    async def _aresponses(stream: AnswerStream) -> AsyncIterator[CompletionResponse]:
        text = ""
        async for delta in aiterate(stream):
            text += delta
            yield CompletionResponse(text=text, delta=delta)
        yield _final(stream.answer)

    def _open_completion(self, prompt: str, formatted: bool, kwargs) -> AnswerStream:
        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        return self._engine.stream_complete(prompt, **self._generation(kwargs))

    def _open_chat(self, messages: Sequence[ChatMessage], kwargs) -> AnswerStream:
        return self._engine.stream_chat_messages(
            _engine_messages(messages), **self._generation(kwargs)
        )

    # ------------------------------------------------------------------ completion
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        answer = self._open_completion(prompt, formatted, kwargs).consume()
        return _final(answer)

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        return self._responses(self._open_completion(prompt, formatted, kwargs))

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        return await _last(await self._astream_completion(prompt, formatted, kwargs))

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        return await self._astream_completion(prompt, formatted, kwargs)

    async def _astream_completion(self, prompt, formatted, kwargs) -> CompletionResponseAsyncGen:
        return self._aresponses(self._open_completion(prompt, formatted, kwargs))

    # ------------------------------------------------------------------ chat
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return _chat(_final(self._open_chat(messages, kwargs).consume()))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return (_chat(r) for r in self._responses(self._open_chat(messages, kwargs)))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await _last(await self._astream_chat(messages, kwargs))

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        return await self._astream_chat(messages, kwargs)

    async def _astream_chat(self, messages, kwargs) -> ChatResponseAsyncGen:
        return (_chat(r) async for r in self._aresponses(self._open_chat(messages, kwargs)))


async def _last(responses: AsyncIterator[Any]) -> Any:
    """The closing response of a stream (it holds the whole text and the engine's numbers)."""
    last = None
    async for last in responses:  # noqa: B007 (the last one is the point)
        pass
    return last


class BeaconReader(BaseReader):
    """PDFs and text files through the project's ingestion (`beacon_apps.documents`).

    One `Document` per page (default) with metadata `page_label` (the number printed on the
    page, what answers cite), `page_number` (1-based), `file_name`, `file_path` and
    `total_pages`, plus what the file says about itself; or, with `return_full_document=True`,
    one `Document` per file whose text keeps the `[page N]` markers. Only `page_label` and
    `file_name` are shown to the LLM and embedders; the rest stays metadata. Works as a
    `SimpleDirectoryReader` file extractor too.
    """

    def __init__(self, return_full_document: bool = False, on_page: Any = None) -> None:
        self.return_full_document = return_full_document
        self.on_page = on_page  # on_page(done, total) while a file is read

    def lazy_load_data(
        self, file: str | os.PathLike, extra_info: dict[str, Any] | None = None, **_: Any
    ) -> Iterator[LIDocument]:
        document = load_document(file, on_page=self.on_page)
        metadata = {
            **document.metadata,
            **(extra_info or {}),
            "file_name": document.name,
            "file_path": document.source,
            "total_pages": len(document.pages),
        }
        if self.return_full_document:
            yield _li_document(document.text(), metadata)
            return
        for page in document.pages:
            yield _li_document(
                page.text, {**metadata, "page_label": page.label, "page_number": page.number}
            )


def _li_document(text: str, metadata: dict[str, Any]) -> LIDocument:
    hidden = [k for k in metadata if k not in ("page_label", "file_name")]
    return LIDocument(
        text=text,
        metadata=metadata,
        excluded_llm_metadata_keys=hidden,
        excluded_embed_metadata_keys=hidden,
    )


def _engine_documents(nodes: Sequence[BaseNode]) -> list[Document]:
    """LlamaIndex pages back into the engine's documents: grouped by file, in order."""
    files: dict[str, list[BaseNode]] = {}
    for node in nodes:
        key = node.metadata.get("file_path") or node.metadata.get("file_name") or node.node_id
        files.setdefault(key, []).append(node)
    return [
        Document(
            source=key,
            name=pages[0].metadata.get("file_name", key),
            pages=[
                Page(
                    page.metadata.get("page_number", number),
                    page.get_content(),
                    str(page.metadata.get("page_label", number)),
                )
                for number, page in enumerate(pages, 1)
            ],
            metadata={},
        )
        for key, pages in files.items()
    ]


class WholeDocumentQueryEngine(CustomQueryEngine):
    """Answers from the entire text of the documents: no retrieval, no chunks to tune.

        pages = BeaconReader().load_data("book.pdf")
        query_engine = WholeDocumentQueryEngine(llm=llm, documents=pages)
        query_engine.query("Who is the narrator?")  # cites [page N]
        query_engine.summarize("short")

    Every page goes into one prompt, document first and question last, with the engine's QA
    instructions; the condensed document is cached, so the next question about the same
    documents reads only the question (`response.metadata["cached_tokens"]`). `documents` are
    file paths or LlamaIndex documents/nodes, one per page as `BeaconReader` makes them (any
    other document counts as one page). With `streaming=True`, `metadata` fills in when the
    stream ends.
    """

    llm: BeaconLLM
    documents: list[Any]
    streaming: bool = False
    _pages: list[Document] = PrivateAttr()

    def model_post_init(self, __context: Any) -> None:
        loaded: list[BaseNode] = []
        for item in self.documents:
            if isinstance(item, (str, os.PathLike)):
                loaded.extend(BeaconReader().load_data(item))
            else:
                loaded.append(item)
        self.documents = loaded
        self._pages = _engine_documents(loaded)

    def custom_query(self, query_str: str) -> Response | StreamingResponse:
        return self._respond(self._ask(query_str))

    async def acustom_query(self, query_str: str) -> Response | AsyncStreamingResponse:
        return await self._arespond(self._ask(query_str))

    def summarize(self, length: str = "medium") -> Response | StreamingResponse:
        """One pass over the whole text (the engine falls back to map-reduce if it cannot fit).

        The output budget is the engine's for `length` unless the LLM sets `max_new_tokens`.
        """
        return self._respond(self._summarize(length))

    async def asummarize(self, length: str = "medium") -> Response | AsyncStreamingResponse:
        return await self._arespond(self._summarize(length))

    def _ask(self, question: str) -> AnswerStream:
        return self.llm.engine.stream_ask(self._pages, question, **self.llm._generation({}))

    def _summarize(self, length: str) -> AnswerStream:
        generation = self.llm._generation({})
        if "max_new_tokens" not in self.llm.model_fields_set:
            del generation["max_new_tokens"]
        return self.llm.engine.stream_summarize(self._pages, length, **generation)

    @property
    def _sources(self) -> list[NodeWithScore]:
        return [NodeWithScore(node=node) for node in self.documents]

    def _respond(self, stream: AnswerStream) -> Response | StreamingResponse:
        if not self.streaming:
            answer = stream.consume()
            return Response(answer.text, self._sources, answer.metadata())
        metadata: dict[str, Any] = {}

        def deltas() -> Iterator[str]:
            try:
                yield from stream
            finally:
                stream.close()  # frees the engine if the caller stops early
            metadata.update(stream.answer.metadata())

        return StreamingResponse(deltas(), self._sources, metadata)

    async def _arespond(self, stream: AnswerStream) -> Response | AsyncStreamingResponse:
        metadata: dict[str, Any] = {}

        async def deltas() -> AsyncIterator[str]:
            async for delta in aiterate(stream):
                yield delta
            metadata.update(stream.answer.metadata())

        if self.streaming:
            return AsyncStreamingResponse(deltas(), self._sources, metadata)
        text = "".join([delta async for delta in deltas()])
        return Response(text, self._sources, metadata)
