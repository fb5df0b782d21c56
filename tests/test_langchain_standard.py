"""LangChain's own standard test suites for `ChatBeacon`, against a tiny random-weight model.

Capabilities are declared as they are: text in, text out, streaming, usage metadata (with
`cache_read` from the condensed-document cache); no tools, structured output or images.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from beacon_apps.engine import BeaconEngine
from integrations.langchain import ChatBeacon

LONG_TEXT = " ".join(
    f"Line {i}: the river keeps its stones and the lamp its light." for i in range(60)
)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> BeaconEngine:
    return BeaconEngine(tiny_model_dir())


class _Params:
    """Both suites build `ChatBeacon(engine=...)` over the module's one engine."""

    _engine: BeaconEngine

    @pytest.fixture(autouse=True)
    def _share_engine(self, engine: BeaconEngine) -> None:
        type(self)._engine = engine

    @property
    def chat_model_class(self) -> type[ChatBeacon]:
        return ChatBeacon

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": self._engine}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        return False  # one wrapper serves one loaded model

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict[str, list[str]]:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}


class TestChatBeaconUnit(_Params, ChatModelUnitTests):
    pass


class TestChatBeaconIntegration(_Params, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": self._engine, "max_tokens": 32}  # the engine's 256 only costs time

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """The same long document twice: the second call restores it from the cache."""
        chat = ChatBeacon(engine=self._engine, max_tokens=4)
        chat.invoke(f"{LONG_TEXT}\n\nWhat keeps its stones?")
        question = f"{LONG_TEXT}\n\nWhat keeps its light?"
        if not stream:
            message = chat.invoke(question)
        else:
            message = None
            for chunk in chat.stream(question):
                message = chunk if message is None else message + chunk
        assert message.usage_metadata["input_token_details"]["cache_read"] > 0
        return message
