"""LangChain adapters over `beacon_apps.engine`: a whole book in one prompt, in standard parts.

LangChain code written for any chat model keeps working: `ChatBeacon` is a `BaseChatModel`
(chat template, streaming, usage and response metadata), `BeaconLLM` is a plain-text `LLM`,
`BeaconDocumentLoader` is a `BaseLoader`, and the chains below are `ChatPromptTemplate | model |
StrOutputParser()`. What is different is what the model can read: the extended context of
Activation Beacon (`context_window`; `profile["max_input_tokens"]` is the longest prompt that
leaves room for `max_tokens`) instead of the native one, so a whole document goes into one prompt
and there is no retrieval to tune.

Every wrapper is a translation layer over one `BeaconEngine` (one loaded model). Several wrappers
share one model through `engine=`; the engine serves one request at a time and keeps the
condensed-document cache, so a second question about the same document only reads the question
(`response_metadata["cached_tokens"]`, `usage_metadata["input_token_details"]["cache_read"]`).

    from integrations.langchain import ChatBeacon, BeaconDocumentLoader, whole_document_qa_chain

    chat = ChatBeacon(model="namespace-Pt/beacon-qwen-2-7b-instruct")
    pages = BeaconDocumentLoader("book.pdf").load()
    qa = whole_document_qa_chain(chat)
    qa.invoke({"context": pages, "question": "Who wrote the letter on page 12?"})
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.document_loaders import BaseLoader
from langchain_core.documents import Document as LCDocument
from langchain_core.language_models import LLM, BaseChatModel, BaseLanguageModel
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessageChunk, BaseMessage, ChatMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import (
    ChatGenerationChunk,
    ChatResult,
    Generation,
    GenerationChunk,
    LLMResult,
)
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate, format_document
from langchain_core.runnables import Runnable, RunnablePassthrough
from pydantic import BaseModel, ConfigDict, Field, model_validator

from beacon_apps.beacon import GenerationSettings
from beacon_apps.default_model import default_model
from beacon_apps.documents import load_document
from beacon_apps.engine import (
    QA_SYSTEM_PROMPT,
    SUMMARY_INSTRUCTIONS,
    Answer,
    AnswerStream,
    BeaconEngine,
    aiterate,
)

__all__ = [
    "BeaconDocumentLoader",
    "BeaconLLM",
    "ChatBeacon",
    "format_documents",
    "qa_prompt",
    "summarize_chain",
    "summary_prompt",
    "whole_document_qa_chain",
]

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}


class _BeaconParams(BaseModel):
    """Fields and engine plumbing shared by `BeaconLLM` and `ChatBeacon`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: BeaconEngine = Field(default=None, exclude=True)
    """The loaded model. Pass one to share it between wrappers; otherwise `model` is loaded."""
    model: str | None = None
    """Model id on the Hugging Face Hub or a local folder (default: the engine's model)."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """`BeaconEngine` options used when loading `model`: device, dtype, ratio, cache_dir, ..."""
    temperature: float | None = None
    """0 or None: greedy. Above 0: sampling."""
    max_tokens: int | None = None
    """New tokens at most (None: the engine's default, 256)."""
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    """Stop strings of any length; they are matched on the text, not on token ids."""
    timeout: float | None = None
    """Seconds one call may take, reading included (the engine checks it every window and
    token). None (default): no limit, because reading a long book takes minutes."""

    @model_validator(mode="before")
    @classmethod
    def _load_engine(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        engine, model = values.get("engine"), values.get("model")
        if engine is None:
            model = model or default_model()
            engine = BeaconEngine(model, **values.get("engine_kwargs", {}))
        elif model is not None and str(model) != engine.model_name:
            raise ValueError(
                f"model: {model!r} differs from the engine's model {engine.model_name!r}; "
                "give one or the other"
            )
        return {**values, "engine": engine, "model": str(model or engine.model_name)}

    @property
    def context_window(self) -> int:
        """Tokens the model reads at its strongest compression: the extended context."""
        return self.engine.context_window

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "context_window": self.engine.context_window,
            "ratio": self.engine.ratio,
            **self._defaults(),
        }

    def _defaults(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "stop": self.stop,
            "timeout": self.timeout,
        }

    def _generation(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Engine generation settings: the instance's, overridden by the call's."""
        kwargs = dict(kwargs)
        model = kwargs.pop("model", None)
        if model is not None and model != self.model:
            raise ValueError(
                f"model: this wrapper serves the loaded model {self.model!r}; make another "
                f"wrapper (or engine) for {model!r}"
            )
        kwargs.pop("stream", None)  # LangChain's routing flag, not a generation setting
        settings = {**self._defaults(), **kwargs}
        if stop is not None:
            settings["stop"] = stop
        settings.setdefault("max_new_tokens", settings.pop("max_tokens"))  # the engine's name
        return {k: v for k, v in settings.items() if v is not None and v != []}

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids from the model's own tokenizer (not GPT-2's, LangChain's fallback)."""
        return self.engine.tokenizer.encode(text, add_special_tokens=False)

    def get_num_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    @staticmethod
    def _deltas(stream: AnswerStream) -> Iterator[str]:
        try:
            yield from stream
        finally:
            stream.close()  # frees the engine if the caller stops early


class BeaconLLM(_BeaconParams, LLM):
    """Plain text continuation with a beacon model (no chat template), as a LangChain `LLM`.

    Use it where a chain wants a string-in, string-out model; for instruction-tuned chat use
    `ChatBeacon`. Each generated piece of text reaches `on_llm_new_token` callbacks, and
    `generate()` results carry the engine's numbers in `generation_info` (cached tokens,
    compression ratio, timings).

        llm = BeaconLLM(model="path/to/model", max_tokens=64)
        llm.invoke("The first law of thermodynamics states", stop=["\\n\\n"])
        chat = ChatBeacon(engine=llm.engine)  # the same loaded model
    """

    @property
    def _llm_type(self) -> str:
        return "beacon"

    def _open(self, prompt: str, stop, kwargs) -> AnswerStream:
        return self.engine.stream_complete(prompt, **self._generation(stop, kwargs))

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        stream = self._open(prompt, stop, kwargs)
        for delta in self._deltas(stream):
            chunk = GenerationChunk(text=delta)
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield GenerationChunk(text="", generation_info=stream.answer.metadata())

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        stream = self._open(prompt, stop, kwargs)  # lazy: the work happens in aiterate's thread
        async for delta in aiterate(stream):
            chunk = GenerationChunk(text=delta)
            if run_manager:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield GenerationChunk(text="", generation_info=stream.answer.metadata())

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        generations = []
        for prompt in prompts:
            chunks = list(self._stream(prompt, stop, run_manager, **kwargs))
            generations.append([_as_generation(chunks)])
        return LLMResult(generations=generations, llm_output={"model_name": self.model})

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        generations = []
        for prompt in prompts:
            chunks = [c async for c in self._astream(prompt, stop, run_manager, **kwargs)]
            generations.append([_as_generation(chunks)])
        return LLMResult(generations=generations, llm_output={"model_name": self.model})

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return self._generate([prompt], stop, run_manager, **kwargs).generations[0][0].text


def _as_generation(chunks: list[GenerationChunk]) -> Generation:
    """Streamed pieces as one generation; the last piece holds the engine's numbers."""
    text = "".join(chunk.text for chunk in chunks)
    return Generation(text=text, generation_info=chunks[-1].generation_info)


class ChatBeacon(_BeaconParams, BaseChatModel):
    """A beacon model as a LangChain chat model: whole documents in the prompt, streamed answers.

    Messages go through the model's chat template (system messages and multi-turn history
    included). Streaming yields text chunks as they are decoded; the last chunk carries
    `usage_metadata` (input/output/total tokens, with `cache_read` = prompt tokens restored from
    the condensed-document cache) and `response_metadata` (model_name, finish_reason,
    compression_ratio, cached_tokens, cache_hit, prefill_seconds, total_seconds, ...).

    Text only: no tool calling, structured output or images (the profile says so). `timeout`
    defaults to None because reading a long document legitimately takes minutes.

        chat = ChatBeacon(model="namespace-Pt/beacon-qwen-2-7b-instruct", max_tokens=512)
        chat.context_window  # e.g. 128K+ tokens, not the 32K the base model was trained on
        for chunk in chat.stream([("system", "Be brief."), ("human", book_text + "\\n\\nWho?")]):
            print(chunk.content, end="")
    """

    streaming: bool = False
    """Make `invoke` go through `stream()` (LangChain's routing); tokens reach callbacks either
    way, and the result is the same."""

    @property
    def _llm_type(self) -> str:
        return "beacon-chat"

    def _resolve_model_profile(self) -> ModelProfile | None:
        answer_room = self.max_tokens or GenerationSettings.max_new_tokens
        return ModelProfile(
            max_input_tokens=self.engine.max_prompt_tokens(answer_room),
            text_inputs=True,
            text_outputs=True,
            image_inputs=False,
            image_url_inputs=False,
            pdf_inputs=False,
            audio_inputs=False,
            video_inputs=False,
            tool_calling=False,
            structured_output=False,
            open_weights=True,
        )

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence | None = None
    ) -> int:
        """Prompt tokens of `messages` as the model sees them: chat template included."""
        if tools:
            raise ValueError("tools: ChatBeacon has no tool calling")
        return self.engine.count_message_tokens(_engine_messages(messages))

    def _open(self, messages: list[BaseMessage], stop, kwargs) -> AnswerStream:
        return self.engine.stream_chat_messages(
            _engine_messages(messages), **self._generation(stop, kwargs)
        )

    def _last_chunk(self, answer: Answer) -> ChatGenerationChunk:
        usage = UsageMetadata(
            input_tokens=answer.prompt_tokens,
            output_tokens=answer.completion_tokens,
            total_tokens=answer.prompt_tokens + answer.completion_tokens,
            input_token_details={"cache_read": answer.cached_tokens},
        )
        metadata = {"model_name": self.model, **answer.metadata()}
        message = AIMessageChunk(
            content="", usage_metadata=usage, response_metadata=metadata, chunk_position="last"
        )
        return ChatGenerationChunk(message=message)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        stream = self._open(messages, stop, kwargs)
        for delta in self._deltas(stream):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield self._last_chunk(stream.answer)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        stream = self._open(messages, stop, kwargs)  # lazy: the work happens in aiterate's thread
        async for delta in aiterate(stream):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield self._last_chunk(stream.answer)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))


def _engine_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as the engine's {"role", "content"} dicts (text content only)."""
    converted = []
    for message in messages:
        if isinstance(message.content, list):
            for block in message.content:
                if isinstance(block, dict) and block.get("type") != "text":
                    raise ValueError(
                        f"content: ChatBeacon reads text only, got a {block.get('type')!r} block"
                    )
        role = message.role if isinstance(message, ChatMessage) else _ROLES[message.type]
        converted.append({"role": role, "content": message.text})
    return converted


class BeaconDocumentLoader(BaseLoader):
    """PDFs and text files through the project's ingestion (`beacon_apps.documents`).

    `mode="page"` (default): one LangChain `Document` per page, with metadata `source`,
    `file_name`, `page_number` (1-based), `page_label` (the number printed on the page, what
    answers cite) and `total_pages`, plus what the file itself says (title, author, ...).
    `mode="single"`: one `Document` per file whose text keeps the `[page N]` markers.

    With a whole-document model there is no splitting step: pass the pages to
    `whole_document_qa_chain` or `summarize_chain` as they are.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        mode: Literal["page", "single"] = "page",
        on_page: Any = None,
    ) -> None:
        if mode not in ("page", "single"):
            raise ValueError(f"mode: 'page' or 'single' (got {mode!r})")
        self.paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self.mode = mode
        self.on_page = on_page  # on_page(done, total) while a file is read

    def lazy_load(self) -> Iterator[LCDocument]:
        for path in self.paths:
            document = load_document(path, on_page=self.on_page)
            metadata = {
                **document.metadata,
                "source": document.source,
                "file_name": document.name,
                "total_pages": len(document.pages),
            }
            if self.mode == "single":
                yield LCDocument(page_content=document.text(), metadata=metadata)
                continue
            for page in document.pages:
                yield LCDocument(
                    page_content=page.text,
                    metadata={**metadata, "page_number": page.number, "page_label": page.label},
                )


PAGE_PROMPT = PromptTemplate.from_template("[page {page_label}]\n{page_content}")
"""How a page enters the prompt: the `[page N]` marker the engine uses, so answers cite it."""
_AS_IS = PromptTemplate.from_template("{page_content}")


def format_documents(documents: Sequence[LCDocument]) -> str:
    """Pages as one text, laid out as the engine lays out documents (`documents_text`).

    Each page follows its `[page N]` marker (`format_document` with `PAGE_PROMPT`) and each file
    starts with a `[document: name]` line, so citations mean the same as in `engine.ask`.
    Documents without a page label (`mode="single"`, other loaders) go in as they are.
    """
    parts, source = [], None
    for document in documents:
        metadata = document.metadata
        text = format_document(document, PAGE_PROMPT if "page_label" in metadata else _AS_IS)
        if "file_name" in metadata and metadata.get("source") != source:
            text = f"[document: {metadata['file_name']}]\n{text}"
        source = metadata.get("source")
        parts.append(text)
    return "\n\n".join(parts)


def qa_prompt() -> Runnable:
    """`{"context": [Document, ...], "question": str}` -> chat messages, all pages first.

    The stuff-documents pattern from standard parts: every page (formatted with `[page N]`
    markers) goes into the prompt before the question, with the engine's own QA instructions.
    Document first, question last keeps the document a shared prefix, so the next question
    about the same pages reuses the condensed document from the cache. Compose it yourself
    (`qa_prompt() | chat`) to keep the `AIMessage` and its metadata.
    """
    prompt = ChatPromptTemplate.from_messages(
        [SystemMessage(QA_SYSTEM_PROMPT), ("human", "{context}\n\n{question}")]
    )
    return _with_context(prompt)


def summary_prompt(length: str = "medium") -> Runnable:
    """`{"context": [Document, ...]}` -> chat messages asking for a summary of all pages.

    `length` is the engine's: short, medium or long. The messages start like `qa_prompt`'s
    (same system message, pages first), as the engine's summaries do, so a summary and the
    questions about the same pages share the condensed pages in the cache.
    """
    if length not in SUMMARY_INSTRUCTIONS:
        raise ValueError(f"length: choose one of {', '.join(SUMMARY_INSTRUCTIONS)}")
    prompt = ChatPromptTemplate.from_messages(
        [SystemMessage(QA_SYSTEM_PROMPT), ("human", "{context}\n\n{instruction}")]
    )
    return _with_context(prompt.partial(instruction=SUMMARY_INSTRUCTIONS[length][0]))


def whole_document_qa_chain(llm: BaseLanguageModel) -> Runnable:
    """`{"context": [Document, ...], "question": str}` -> answer text citing `[page N]`."""
    return qa_prompt() | llm | StrOutputParser()


def summarize_chain(llm: BaseLanguageModel, length: str = "medium") -> Runnable:
    """`{"context": [Document, ...]}` -> a summary of the whole document in one pass.

    The output budget is the engine's for that length unless the model sets `max_tokens`.
    """
    prompt = summary_prompt(length)
    if getattr(llm, "max_tokens", None) is None:
        llm = llm.bind(max_tokens=SUMMARY_INSTRUCTIONS[length][1])
    return prompt | llm | StrOutputParser()


def _with_context(prompt: ChatPromptTemplate) -> Runnable:
    return RunnablePassthrough.assign(context=lambda x: format_documents(x["context"])) | prompt
