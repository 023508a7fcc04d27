"""Tool-call parsers: the function calls in a model's text, whole or while it streams.

Each chat-template family writes calls its own way:

- ``hermes`` (Hermes, Qwen 2.5 / 3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one block per call;
- ``llama3_json`` (Llama 3.1 / 3.2 / 3.3): ``{"name": ..., "parameters": {...}}``, after
  ``<|python_tag|>`` or as the whole answer, calls separated by ``;``;
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.

Calls forced by ``tool_choice`` are parsed here too: a named function (the whole answer is the
arguments object) and "required" (a JSON array of ``{"name", "parameters"}`` objects).

A parser reads the text generated so far and says which part of it is settled content and which
calls it holds, with their arguments' JSON text as far as it is written. Parsing a text whole,
or any sequence of growing prefixes of it, gives the same result, so a streamed answer
reassembles to the whole one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(slots=True)
class ParsedCall:
    """One function call: its name once written, and its arguments' JSON text so far."""

    name: str | None
    arguments: str = ""
    #: The call's JSON is complete (its arguments are final).
    complete: bool = False


@dataclass(slots=True)
class ParsedText:
    """What a parser found in a text: the settled content before any call, and the calls."""

    content: str
    calls: list[ParsedCall] = field(default_factory=list)
    #: A call's JSON is broken; the calls before it are in ``calls``.
    malformed: bool = False


# ----------------------------------------------------------------------------------------------
# parsers
# ----------------------------------------------------------------------------------------------


class ToolParser:
    """Finds the function calls in a model's answer; one subclass per way of writing them."""

    #: The name ``--tool-call-parser`` takes.
    name: ClassVar[str] = ""
    #: Text that starts the calls.
    marker: ClassVar[str] = ""
    #: Keys of a call object that hold the arguments (the first found is used).
    argument_keys: ClassVar[tuple[str, ...]] = ("arguments", "parameters")
    #: Substrings of a chat template that say it writes calls this way.
    template_hints: ClassVar[tuple[str, ...]] = ()

    def __init__(self, tool_names: Iterable[str] = ()):
        self.tool_names = set(tool_names)

    def parse(self, text: str, final: bool) -> ParsedText:
        """The content and calls in ``text``. Unless ``final``, the text may still grow: content
        that a call could yet follow (a partial marker, trailing whitespace) is held back."""
        begin, settled = self._locate(text, final)
        if begin is None:
            return ParsedText(text if final else text[:settled])
        calls: list[ParsedCall] = []
        try:
            self._read_calls(text, begin, calls)
        except _Invalid:
            return ParsedText(text[:begin].rstrip(), calls, malformed=True)
        return ParsedText(text[:begin].rstrip(), calls)

    def new_call_id(self) -> str:
        """An id for a call this parser found (OpenAI's form)."""
        return _call_id()

    # ---- what a subclass says --------------------------------------------------------------

    def _locate(self, text: str, final: bool) -> tuple[int | None, int]:
        """Where the calls begin (None: nowhere yet), and how much of the text is settled
        content when they do not."""
        search = 0
        while True:
            at = text.find(self.marker, search)
            if at < 0:
                return None, _settled(text, self.marker, search)
            i = _skip_ws(text, at + len(self.marker))
            if i == len(text):
                return None, len(text[:at].rstrip())  # what follows the marker decides
            if text[i] in "{[":
                return at, at
            search = at + len(self.marker)  # the marker is only mentioned: plain text

    def _read_calls(self, text: str, begin: int, calls: list[ParsedCall]) -> None:
        """Append the calls that start at ``begin`` to ``calls``; raise _Invalid at broken
        JSON (the calls before it stay)."""
        raise NotImplementedError

    # ---- shared readers --------------------------------------------------------------------

    def _read_object(self, text: str, i: int, calls: list[ParsedCall]) -> int | None:
        """Read the call object at ``text[i]``; the index after it, or None if unfinished."""
        if i >= len(text):
            return None
        if text[i] != "{":
            raise _Invalid
        obj = _scan_object(text, i)
        calls.append(_call_of(text, obj, self.argument_keys))
        return obj.end

    def _read_array(self, text: str, i: int, calls: list[ParsedCall]) -> int | None:
        """Read ``[obj, obj, ...]`` at ``text[i]``; the index after it, or None if unfinished."""
        i = _skip_ws(text, i + 1)
        if i < len(text) and text[i] == "]":
            return i + 1
        while True:
            end = self._read_object(text, i, calls)
            if end is None:
                return None
            i = _skip_ws(text, end)
            if i >= len(text):
                return None
            if text[i] == "]":
                return i + 1
            if text[i] != ",":
                raise _Invalid
            i = _skip_ws(text, i + 1)

    def _names_a_tool(self, text: str, i: int) -> bool | None:
        """Whether the object at ``text[i]`` starts with ``"name": <one of the tools>`` (None:
        not written far enough to say). Answers that are JSON but no call stay content."""
        j = _skip_ws(text, i + 1)
        if j >= len(text):
            return None
        if text[j] != '"':
            return False
        try:
            if json.loads(text[j : _string_end(text, j)]) != "name":
                return False
            start = _member_value(text, j)
            if start >= len(text):
                return None
            if text[start] != '"':
                return False
            return json.loads(text[start : _string_end(text, start)]) in self.tool_names
        except _Incomplete:
            return None
        except _Invalid:
            return False


class HermesToolParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, once per call (Hermes 2 Pro,
    Qwen 2.5, Qwen 3). Text after the last call is dropped."""

    name = "hermes"
    marker = "<tool_call>"
    end_marker = "</tool_call>"
    template_hints = ("<tool_call>",)

    def _read_calls(self, text: str, begin: int, calls: list[ParsedCall]) -> None:
        i = begin
        while text.startswith(self.marker, i):
            end = self._read_object(text, _skip_ws(text, i + len(self.marker)), calls)
            if end is None:
                return
            i = _skip_ws(text, end)
            if text.startswith(self.end_marker, i):
                i = _skip_ws(text, i + len(self.end_marker))


class Llama3JsonToolParser(ToolParser):
    """``{"name": ..., "parameters": {...}}`` (Llama 3.1 / 3.2 / 3.3 JSON tool calling), after
    ``<|python_tag|>`` or as the whole answer; several calls are separated by ``;``. Without
    the tag, an answer is a call only if it begins with ``{"name": `` and one of the request's
    function names."""

    name = "llama3_json"
    marker = "<|python_tag|>"
    argument_keys = ("parameters", "arguments")
    template_hints = ("<|python_tag|>", '"parameters": dictionary of argument name')

    def _locate(self, text: str, final: bool) -> tuple[int | None, int]:
        if self.marker in text:
            return text.index(self.marker), 0
        start = len(text) - len(text.lstrip())
        if start == len(text) or self.marker.startswith(text[start:]):
            return None, 0  # nothing yet, or perhaps the tag
        if text[start] == "{":
            is_call = self._names_a_tool(text, start)
            if is_call:
                return start, 0
            if is_call is None:
                return None, 0
        return super()._locate(text, final)

    def _read_calls(self, text: str, begin: int, calls: list[ParsedCall]) -> None:
        i = begin + len(self.marker) if text.startswith(self.marker, begin) else begin
        while True:
            end = self._read_object(text, _skip_ws(text, i), calls)
            if end is None:
                return
            i = _skip_ws(text, end)
            if text.startswith(";", i):
                i = _skip_ws(text, i + 1)
            if not text.startswith("{", i):
                return


class MistralToolParser(ToolParser):
    """``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (Mistral's v3 tokenizer). The
    tag is a special token, dropped from the text unless ``skip_special_tokens`` is false, so a
    whole answer that is such an array of calls to the request's functions counts too. Call
    ids are 9 letters and digits, as Mistral's chat templates require."""

    name = "mistral"
    marker = "[TOOL_CALLS]"
    template_hints = ("[TOOL_CALLS]",)

    def _locate(self, text: str, final: bool) -> tuple[int | None, int]:
        if self.marker in text:
            return text.index(self.marker), 0
        start = len(text) - len(text.lstrip())
        if start == len(text) or self.marker.startswith(text[start:]):
            return None, 0
        if text[start] == "[":
            i = _skip_ws(text, start + 1)
            if i == len(text):
                return None, 0
            is_call = text[i] == "{" and self._names_a_tool(text, i)
            if is_call:
                return start, 0
            if is_call is None:
                return None, 0
        return super()._locate(text, final)

    def _read_calls(self, text: str, begin: int, calls: list[ParsedCall]) -> None:
        i = begin + len(self.marker) if text.startswith(self.marker, begin) else begin
        i = _skip_ws(text, i)
        if text.startswith("[", i):
            self._read_array(text, i, calls)
        else:
            self._read_object(text, i, calls)

    def new_call_id(self) -> str:
        return _call_id()[-9:]


class NamedCallParser(ToolParser):
    """``tool_choice: {"type": "function", "function": {"name": NAME}}``: the whole answer is
    the arguments object of NAME (guided decoding forces it)."""

    name = "named"

    def __init__(self, function: str, id_style: ToolParser | None = None):
        super().__init__([function])
        self.function = function
        self.id_style = id_style

    def parse(self, text: str, final: bool) -> ParsedText:
        i = _skip_ws(text, 0)
        call = ParsedCall(self.function)
        if i == len(text):
            return ParsedText("", [call])
        if text[i] != "{":
            return ParsedText("", [], malformed=True)
        try:
            end = _value_end(text, i)
        except _Incomplete:
            call.arguments = text[i:]
        except _Invalid:
            return ParsedText("", [], malformed=True)
        else:
            call.arguments, call.complete = text[i:end], True
        return ParsedText("", [call])

    def new_call_id(self) -> str:
        return self.id_style.new_call_id() if self.id_style else _call_id()


class RequiredCallsParser(ToolParser):
    """``tool_choice: "required"``: the whole answer is a JSON array of ``{"name": ...,
    "parameters": {...}}`` objects (guided decoding forces it)."""

    name = "required"
    argument_keys = ("parameters",)

    def __init__(self, tool_names: Iterable[str], id_style: ToolParser | None = None):
        super().__init__(tool_names)
        self.id_style = id_style

    def _locate(self, text: str, final: bool) -> tuple[int | None, int]:
        i = _skip_ws(text, 0)
        return (i, 0) if i < len(text) else (None, 0)

    def _read_calls(self, text: str, begin: int, calls: list[ParsedCall]) -> None:
        if text[begin] != "[":
            raise _Invalid
        self._read_array(text, begin, calls)

    def new_call_id(self) -> str:
        return self.id_style.new_call_id() if self.id_style else _call_id()


#: The parsers ``--tool-call-parser`` names, in the order detection tries them.
TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (MistralToolParser, HermesToolParser, Llama3JsonToolParser)
}


def tool_parser_class(name: str) -> type[ToolParser]:
    """The parser called ``name``; ValueError listing the known ones otherwise."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown tool-call parser {name!r}; choose one of {', '.join(TOOL_PARSERS)}"
        ) from None


def detect_tool_parser(chat_template: str | None) -> type[ToolParser] | None:
    """The parser for the call format a chat template writes, or None if it writes none that
    a parser knows (``<tool_call>``: hermes; ``[TOOL_CALLS]``: mistral; ``<|python_tag|>`` or
    Llama 3's JSON instructions: llama3_json)."""
    if not chat_template:
        return None
    for parser in TOOL_PARSERS.values():
        if any(hint in chat_template for hint in parser.template_hints):
            return parser
    return None


# ----------------------------------------------------------------------------------------------
# an incremental JSON scanner: where values end, or that the text stops before they do
# ----------------------------------------------------------------------------------------------


class _Incomplete(Exception):
    """The text ends inside the value."""


class _Invalid(Exception):
    """The text is not JSON."""


@dataclass(slots=True)
class _Object:
    #: key -> (start of its value, end of its value or None while unfinished), in text order
    members: dict[str, tuple[int, int | None]]
    #: The index after the closing brace; None while unfinished.
    end: int | None = None


_WS = re.compile(r"[ \t\n\r]*")
_STRING_BODY = re.compile(r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')
_PARTIAL_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{0,3})?")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_PARTIAL_NUMBER = re.compile(r"-?[0-9]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]*)?")
_LITERALS = ("true", "false", "null")


def _skip_ws(text: str, i: int) -> int:
    return _WS.match(text, i).end()  # type: ignore[union-attr]  # always matches


def _string_end(text: str, i: int) -> int:
    """The index after the string that opens at ``text[i]``."""
    j = _STRING_BODY.match(text, i + 1).end()  # type: ignore[union-attr]
    if j < len(text) and text[j] == '"':
        return j + 1
    if j == len(text) or _PARTIAL_ESCAPE.fullmatch(text, j):
        raise _Incomplete
    raise _Invalid


def _scalar_end(text: str, i: int) -> int:
    """The index after the number or literal at ``text[i]``; a number that reaches the end
    of the text is unfinished (more digits may come)."""
    number = _NUMBER.match(text, i)
    if number is not None and number.end() < len(text):
        return number.end()
    if _PARTIAL_NUMBER.fullmatch(text, i) and i < len(text):
        raise _Incomplete
    for literal in _LITERALS:
        if text.startswith(literal, i):
            return i + len(literal)
        if literal.startswith(text[i:]):
            raise _Incomplete
    raise _Invalid


def _value_end(text: str, i: int) -> int:
    """The index after the JSON value that starts at ``text[i]`` (iterative: no recursion
    limit however deep the value nests)."""
    closers: list[str] = []
    n = len(text)
    while True:
        # a value starts at i
        if i >= n:
            raise _Incomplete
        c = text[i]
        if c in "{[":
            i = _skip_ws(text, i + 1)
            closer = "}" if c == "{" else "]"
            if i < n and text[i] == closer:
                i += 1
            else:
                closers.append(closer)
                i = _member_value(text, i) if closer == "}" else i
                continue
        elif c == '"':
            i = _string_end(text, i)
        else:
            i = _scalar_end(text, i)
        # after a value: close what ends here, then find where the next value starts
        while True:
            if not closers:
                return i
            i = _skip_ws(text, i)
            if i >= n:
                raise _Incomplete
            if text[i] == closers[-1]:
                closers.pop()
                i += 1
                continue
            if text[i] != ",":
                raise _Invalid
            i = _skip_ws(text, i + 1)
            if closers[-1] == "}":
                i = _member_value(text, i)
            break


def _member_value(text: str, i: int) -> int:
    """Skip ``"key" :`` at ``text[i]``; the index where the member's value starts."""
    if i >= len(text):
        raise _Incomplete
    if text[i] != '"':
        raise _Invalid
    i = _skip_ws(text, _string_end(text, i))
    if i >= len(text):
        raise _Incomplete
    if text[i] != ":":
        raise _Invalid
    return _skip_ws(text, i + 1)


def _scan_object(text: str, i: int) -> _Object:
    """The members of the object that opens at ``text[i]``, as far as they are written."""
    obj = _Object({})
    n = len(text)
    i = _skip_ws(text, i + 1)
    if i < n and text[i] == "}":
        obj.end = i + 1
        return obj
    while True:
        if i >= n:
            return obj
        if text[i] != '"':
            raise _Invalid
        try:
            key_end = _string_end(text, i)
            start = _member_value(text, i)
        except _Incomplete:
            return obj
        key = json.loads(text[i:key_end])
        if start >= n:
            return obj
        try:
            end = _value_end(text, start)
        except _Incomplete:
            obj.members[key] = (start, None)
            return obj
        obj.members[key] = (start, end)
        i = _skip_ws(text, end)
        if i >= n:
            return obj
        if text[i] == "}":
            obj.end = i + 1
            return obj
        if text[i] != ",":
            raise _Invalid
        i = _skip_ws(text, i + 1)


def _call_of(text: str, obj: _Object, argument_keys: Sequence[str]) -> ParsedCall:
    """The call a (possibly unfinished) ``{"name": ..., "arguments": ...}`` object holds."""
    call = ParsedCall(None, complete=obj.end is not None)
    name = obj.members.get("name")
    if name is not None and name[1] is not None:
        value: Any = json.loads(text[name[0] : name[1]])
        if not isinstance(value, str):
            raise _Invalid
        call.name = value
    elif call.complete:
        raise _Invalid  # a finished call with no name
    key = next((k for k in obj.members if k in argument_keys), None)
    if key is None:
        call.arguments = "{}" if call.complete else ""
        return call
    start, end = obj.members[key]
    if text[start] in "{[":  # the arguments' own JSON text, streamed as it is written
        call.arguments = text[start : len(text) if end is None else end]
    elif end is not None:  # a string holding the JSON text, or null
        value = json.loads(text[start:end])
        if value is None:
            call.arguments = "{}"
        elif isinstance(value, str):
            call.arguments = value
        else:
            raise _Invalid
    return call


def _settled(text: str, marker: str, search: int) -> int:
    """How much of ``text`` cannot begin ``marker`` any more (nor be whitespace a marker could
    follow). ``search``: where the last marker search started."""
    hold = len(text)
    for size in range(min(len(marker) - 1, len(text) - search), 0, -1):
        if marker.startswith(text[len(text) - size :]):
            hold = len(text) - size
            break
    return len(text[:hold].rstrip())


def _call_id() -> str:
    import uuid

    return f"call_{uuid.uuid4().hex[:24]}"
