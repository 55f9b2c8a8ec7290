"""The streaming path's pieces, alone: the hand-written chunk JSON against pydantic's, and a
request's outputs coalescing while its consumer lags.

The server writes each token's chunk from a template (edgepaged/server/chunks.py) instead of
dumping a pydantic model per token; the wire format must stay byte for byte what the models
in protocol.py give, for any text a detokenizer can produce.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from edgepaged.outputs import CompletionOutput, RequestOutput
from edgepaged.server.async_engine import RequestStream
from edgepaged.server.chunks import TextChunks, chat_choice, completion_choice
from edgepaged.server.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
)

TEXTS = [
    "", " Paris", 'say "hi"', "back\\slash", "line\nbreak\ttab\r", "\x00\x01\x1f\x7f", "\u2028\u2029",
    "é ü 日本語", "🙂 emoji", "</script>", "'single'", "\b\f",
]
FINISHES = [None, "stop", "length"]
MODELS = ["tiny", 'mo"del', "modèle/ü", "a\\b"]


def _completion_pair(model: str, deltas: list[tuple[int, str, str | None]]) -> tuple[str, str]:
    def response(items: list[CompletionChoice]) -> CompletionResponse:
        return CompletionResponse(id="cmpl-1f", created=1764800000, model=model, choices=items)

    chunks = TextChunks.around(response([]).model_dump_json(), completion_choice)
    expected = response([CompletionChoice(index=i, text=t, finish_reason=f) for i, t, f in deltas]).model_dump_json()
    return chunks(deltas), expected


def _chat_pair(model: str, deltas: list[tuple[int, str, str | None]]) -> tuple[str, str]:
    def chunk(items: list[ChatChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(id="chatcmpl-1f", created=1764800000, model=model, choices=items)

    chunks = TextChunks.around(chunk([]).model_dump_json(), chat_choice)
    items = [ChatChunkChoice(index=i, delta=DeltaMessage(content=t or None), finish_reason=f) for i, t, f in deltas]
    return chunks(deltas), chunk(items).model_dump_json()


@pytest.mark.parametrize("pair", [_completion_pair, _chat_pair], ids=["completion", "chat"])
@pytest.mark.parametrize("model", MODELS)
def test_text_chunks_are_pydantics_json_byte_for_byte(pair, model):
    for text in TEXTS:
        for finish in FINISHES:
            written, expected = pair(model, [(0, text, finish)])
            assert written == expected, (text, finish)
            json.loads(written)
    # several choices in one chunk, as n > 1 streams them
    written, expected = pair(model, [(0, "a", None), (2, 'b"', "stop"), (5, "", "length")])
    assert written == expected


def test_a_chunk_without_an_empty_choices_list_is_refused():
    with pytest.raises(ValueError, match="choices"):
        TextChunks.around('{"id":"x","usage":null}', completion_choice)


class _Owner:
    """Stands in for the AsyncEngine: records aborts."""

    def __init__(self) -> None:
        self.aborted: list[str] = []

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def _delta(text: str, tokens: list[int], finish: str | None = None) -> RequestOutput:
    return RequestOutput("r", [1, 2, 3], [CompletionOutput(0, text, tokens, finish)], finished=finish is not None)


def test_outputs_queued_while_the_consumer_lags_come_as_one_with_every_token():
    async def scenario() -> tuple[list[RequestOutput], list[str]]:
        owner = _Owner()
        stream = RequestStream(owner, "r")
        stream._push(_delta("Hel", [10]))
        got = [await stream.__anext__()]  # one output waiting: it comes alone
        for piece, token in (("lo", 11), (",", 12), (" wor", 13)):  # the consumer lags three steps
            stream._push(_delta(piece, [token]))
        got.append(await stream.__anext__())
        waiter = asyncio.ensure_future(stream.__anext__())  # now it waits, and the next push wakes it
        await asyncio.sleep(0)
        assert not waiter.done()
        stream._push(_delta("ld", [14], finish="length"))
        got.append(await waiter)
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        stream.close()  # finished: nothing to abort
        return got, owner.aborted

    got, aborted = asyncio.run(scenario())
    assert [o.outputs[0].text for o in got] == ["Hel", "lo, wor", "ld"]
    assert [o.outputs[0].token_ids for o in got] == [[10], [11, 12, 13], [14]]
    assert [o.finished for o in got] == [False, False, True] and got[-1].outputs[0].finish_reason == "length"
    assert aborted == []


def test_closing_a_waiting_stream_aborts_it_and_ends_the_wait():
    async def scenario() -> list[str]:
        owner = _Owner()
        stream = RequestStream(owner, "r")
        waiter = asyncio.ensure_future(anext(stream, None))
        await asyncio.sleep(0)
        stream.close()  # what the disconnect watcher does
        assert await asyncio.wait_for(waiter, 1) is None
        return owner.aborted

    assert asyncio.run(scenario()) == ["r"]


def test_an_engine_failure_reaches_the_consumer_after_the_outputs_before_it():
    async def scenario() -> tuple[str, BaseException]:
        stream = RequestStream(_Owner(), "r")
        stream._push(_delta("partial", [7]))
        stream._fail(RuntimeError("engine gone"))
        first = await stream.__anext__()
        with pytest.raises(RuntimeError) as failure:
            await stream.__anext__()
        return first.outputs[0].text, failure.value

    text, error = asyncio.run(scenario())
    assert text == "partial" and str(error) == "engine gone"
