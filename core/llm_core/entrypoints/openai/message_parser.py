"""MessageParser: one chat answer's text as an assistant message, whole or streamed.

The text goes through the reasoning parser (``<think>...</think>`` to ``reasoning_content``),
then the tool-call parser (function calls to ``tool_calls``); what is left is ``content``. The
streamed deltas of an answer add up to its whole message: both come from the same parse.
"""

from __future__ import annotations

from llm_core.entrypoints.openai.protocol import (
    AssistantMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from llm_core.entrypoints.openai.reasoning import ReasoningParser
from llm_core.entrypoints.openai.tool_parsers import ParsedCall, ToolParser


class MessageParser:
    """Parses one choice's answer. ``tools``: None when the request uses no tools.
    ``forced``: the calls are forced by tool_choice (named or "required"), so an unfinished
    call is still a call. ``max_calls``: 1 when parallel_tool_calls is false."""

    def __init__(
        self,
        reasoning: ReasoningParser | None = None,
        tools: ToolParser | None = None,
        *,
        forced: bool = False,
        max_calls: int | None = None,
    ):
        self.reasoning = reasoning
        self.tools = tools
        self.forced = forced
        self.max_calls = max_calls
        # what has been streamed
        self._reasoning_sent = 0
        self._content_sent = 0
        self._call_ids: list[str] = []
        self._arguments_sent: list[int] = []
        self._calls_complete = True

    @property
    def passthrough(self) -> bool:
        """Nothing to parse: the text is the content."""
        return self.reasoning is None and self.tools is None

    # ---- whole -----------------------------------------------------------------------------

    def message(self, text: str, finish_reason: str | None) -> tuple[AssistantMessage, str | None]:
        """The assistant message of a finished answer, and its finish reason ("tool_calls"
        when it ends in complete calls)."""
        reasoning, content = self._split(text, final=True)
        if self.tools is None:
            return AssistantMessage(content=content, reasoning_content=reasoning), finish_reason
        parsed = self.tools.parse(content, final=True)
        calls = self._limited(parsed.calls)
        usable = not parsed.malformed and all(call.name is not None for call in calls)
        if not self.forced:  # a broken or unfinished call of the model's own stays text
            usable = usable and all(call.complete for call in calls)
        if not calls or not usable:
            if self.forced:
                return AssistantMessage(content=None, reasoning_content=reasoning), finish_reason
            return AssistantMessage(content=content, reasoning_content=reasoning), finish_reason
        tool_calls = [
            ToolCall(
                id=self.tools.new_call_id(),
                function=FunctionCall(name=call.name or "", arguments=call.arguments),
            )
            for call in calls
        ]
        message = AssistantMessage(
            content=parsed.content or None, reasoning_content=reasoning, tool_calls=tool_calls
        )
        return message, _finish(finish_reason, all(call.complete for call in calls))

    # ---- streamed --------------------------------------------------------------------------

    def deltas(self, text: str, final: bool) -> list[DeltaMessage]:
        """What ``text`` (all of the answer so far) adds to what was streamed before; one
        delta per kind of news, a call's first delta (id, type, name) on its own."""
        reasoning, content = self._split(text, final)
        out: list[DeltaMessage] = []
        if len(reasoning or "") > self._reasoning_sent:
            out.append(DeltaMessage(reasoning_content=(reasoning or "")[self._reasoning_sent :]))
            self._reasoning_sent = len(reasoning or "")
        calls: list[ParsedCall] = []
        if self.tools is not None:
            parsed = self.tools.parse(content, final)
            content, calls = parsed.content, self._limited(parsed.calls)
        if len(content) > self._content_sent:
            out.append(DeltaMessage(content=content[self._content_sent :]))
            self._content_sent = len(content)
        for index, call in enumerate(calls):
            if call.name is None:
                break
            if index == len(self._call_ids):
                assert self.tools is not None
                self._call_ids.append(self.tools.new_call_id())
                self._arguments_sent.append(0)
                function = DeltaFunctionCall(name=call.name, arguments="")
                first = DeltaToolCall(
                    index=index, id=self._call_ids[index], type="function", function=function
                )
                out.append(DeltaMessage(tool_calls=[first]))
            sent = self._arguments_sent[index]
            if len(call.arguments) > sent:
                more = DeltaFunctionCall(arguments=call.arguments[sent:])
                out.append(DeltaMessage(tool_calls=[DeltaToolCall(index=index, function=more)]))
                self._arguments_sent[index] = len(call.arguments)
        if self._call_ids:
            self._calls_complete = len(calls) >= len(self._call_ids) and all(
                call.complete for call in calls[: len(self._call_ids)]
            )
        return out

    def stream_finish_reason(self, finish_reason: str | None) -> str | None:
        """The finish reason of a streamed answer, once :meth:`deltas` saw all of it."""
        if not self._call_ids:
            return finish_reason
        return _finish(finish_reason, self._calls_complete)

    # ------------------------------------------------------------------------------------------

    def _split(self, text: str, final: bool) -> tuple[str | None, str]:
        if self.reasoning is None:
            return None, text
        reasoning, content = self.reasoning.split(text, final)
        return reasoning or None, content

    def _limited(self, calls: list[ParsedCall]) -> list[ParsedCall]:
        return calls if self.max_calls is None else calls[: self.max_calls]


def _finish(finish_reason: str | None, complete: bool) -> str | None:
    """An answer that stopped after complete calls ends with "tool_calls"; one cut short
    (max_tokens, a stop string) keeps its own reason."""
    return "tool_calls" if finish_reason == "stop" and complete else finish_reason
