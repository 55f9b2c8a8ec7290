"""The RAG prompt, laid out so that questions over the same documents share KV blocks.

Paged prefix caching reuses a block only when every token before it matches too, so the
order of a prompt's parts decides what can be shared. The layout is: the system prompt (the
same for every request), then the retrieved chunks sorted by (document path, chunk index),
then the question (different every time, so last). Sorting by document rather than by score
means two questions that retrieve the same chunks, in whatever score order, produce the same
prefix token for token. The score-ordered layout is kept as the benchmark's baseline.
Padding passages to KV-block boundaries was measured too, and dropped: it cost more tokens
than it saved (docs/rag.md).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from edgepaged.rag.retrieve import Hit

DEFAULT_SYSTEM_PROMPT = (
    "You answer questions about a local document collection. Use only the context passages "
    "in the user's message, and name the source of the passage you used. If the passages do "
    "not contain the answer, say that the documents do not say."
)


class ChunkOrder(str, Enum):
    CANONICAL = "canonical"  # by document path, then chunk index: shares prefixes
    SCORE = "score"  # best match first: the common RAG layout, the baseline


def ordered(hits: Sequence[Hit], order: ChunkOrder) -> list[Hit]:
    if order is ChunkOrder.CANONICAL:
        return sorted(hits, key=lambda h: (h.chunk.path, h.chunk.chunk_index))
    return sorted(hits, key=lambda h: (-h.score, h.chunk.path, h.chunk.chunk_index))


def _passage(hit: Hit) -> str:
    return f"[{hit.chunk.path} #{hit.chunk.chunk_index}]\n{hit.chunk.text}"


CONTEXT_HEADER = "Context:\n\n"
PASSAGE_SEPARATOR = "\n\n"


@dataclass(slots=True)
class RagPrompt:
    """The chat messages of one RAG request, and where its shareable prefixes end.

    `prefix_cuts` are character positions in the user message: the end of the context header
    (everything before it is identical for every request), then the end of each passage.
    """

    messages: list[dict[str, str]]
    prefix_cuts: list[int]


def build_prompt(
    question: str,
    hits: Sequence[Hit],
    *,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    order: ChunkOrder = ChunkOrder.CANONICAL,
) -> RagPrompt:
    """System prompt, then the passages in `order`, then the question; deterministic."""
    user = CONTEXT_HEADER
    cuts = [len(user)]
    for i, hit in enumerate(ordered(hits, order)):
        user += (PASSAGE_SEPARATOR if i else "") + _passage(hit)
        cuts.append(len(user))
    user += f"{PASSAGE_SEPARATOR}Question: {question.strip()}"
    return RagPrompt([{"role": "system", "content": system_prompt}, {"role": "user", "content": user}], cuts)


@dataclass(slots=True)
class RenderedPrompt:
    """Prompt token ids plus where its shareable prefixes end, in tokens.

    `prefix_ends[0]` covers the chat header, system prompt and context header; `prefix_ends[j]`
    runs to the end of the j-th passage. These are the prefixes worth pinning.
    """

    token_ids: list[int]
    prefix_ends: list[int]


def render_prompt(tokenizer, prompt: RagPrompt) -> RenderedPrompt:
    """Apply the chat template and tokenize once, exactly as a chat endpoint would, then map
    the prompt's prefix cuts onto token positions."""
    text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    start = text.rfind(prompt.messages[-1]["content"])
    if start < 0:
        # A template that rewrites the content: nothing to pin, the prompt is still right.
        return RenderedPrompt(ids, [])
    ends = [o[1] for o in encoding["offset_mapping"]]
    return RenderedPrompt(ids, [bisect_right(ends, start + cut) for cut in prompt.prefix_cuts])
