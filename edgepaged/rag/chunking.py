"""Turn a folder of text, Markdown and HTML files into token-sized chunks.

Chunks are measured in the *LLM's* tokens, not characters or embedding-model word pieces,
because what they cost is prompt length and KV blocks in the model that reads them. Each
chunk is an exact slice of the document (found through the tokenizer's offset mapping), so
what the model reads is what the file says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Protocol

from edgepaged.errors import EdgepagedError

TEXT_SUFFIXES = frozenset({".txt", ".text"})
MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})
HTML_SUFFIXES = frozenset({".html", ".htm"})
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | MARKDOWN_SUFFIXES | HTML_SUFFIXES


class CorpusError(EdgepagedError):
    """The folder to index is missing, not a folder, or holds no document to index."""


class SkippedFile(EdgepagedError):
    """One file the indexer leaves out (binary, too large, not text); the message says why."""


class Tokenizer(Protocol):
    """The slice of a transformers fast tokenizer that chunking uses."""

    def __call__(self, text: str, *, add_special_tokens: bool, return_offsets_mapping: bool): ...


@dataclass(slots=True)
class TextChunk:
    index: int
    text: str
    token_count: int


def collect_files(root: Path) -> list[Path]:
    """The supported files under `root`, sorted, skipping hidden files and folders."""
    if not root.exists():
        raise CorpusError(f"{root} does not exist")
    if not root.is_dir():
        raise CorpusError(f"{root} is not a directory")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in SUPPORTED_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        kinds = ", ".join(sorted(SUPPORTED_SUFFIXES))
        raise CorpusError(f"{root} holds no document to index (looked for {kinds})")
    return files


def decode_text(data: bytes, name: str) -> str:
    """Bytes to text, refusing what is not text at all."""
    if b"\x00" in data[:8192]:
        raise SkippedFile(f"{name}: binary file (NUL bytes)")
    text = data.decode("utf-8-sig", errors="replace")
    if text.count("\ufffd") > max(1, len(text) // 100):
        raise SkippedFile(f"{name}: not UTF-8 text")
    return text


def document_text(data: bytes, path: Path) -> str:
    """The readable text of one file, by its suffix."""
    text = decode_text(data, str(path))
    suffix = path.suffix.lower()
    if suffix in HTML_SUFFIXES:
        text = html_to_text(text)
    elif suffix in MARKDOWN_SUFFIXES:
        text = markdown_to_text(text)
    return _tidy(text)


_MD_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_MD_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_MD_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_MD_LINK_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+\S+.*$", re.MULTILINE)
_MD_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.DOTALL)


def markdown_to_text(text: str) -> str:
    """Keep Markdown's structure (the model reads headings and lists well) but drop URLs,
    comments and front matter, which cost tokens and carry nothing to answer from."""
    text = _MD_FRONT_MATTER.sub("", text)
    text = _MD_COMMENT.sub("", text)
    text = _MD_IMAGE.sub(r"\1", text)
    text = _MD_LINK.sub(r"\1", text)
    return _MD_LINK_DEF.sub("", text)


class _HTMLText(HTMLParser):
    """Visible text of a page, with block elements on their own lines and headings marked."""

    SKIP = frozenset({"script", "style", "noscript", "template", "svg"})
    BLOCK = frozenset(
        {"p", "div", "br", "tr", "table", "section", "article", "header", "footer", "main",
         "nav", "aside", "blockquote", "hr", "dl", "dt", "dd", "ul", "ol", "title", "figure",
         "figcaption", "form", "pre"}
    )
    HEADINGS = frozenset(f"h{i}" for i in range(1, 7))

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in self.SKIP:
            self.skip_depth += 1
        elif tag in self.HEADINGS:
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag == "li":
            self.parts.append("\n- ")
        elif tag in self.BLOCK:
            self.parts.append("\n")
        if tag == "pre":
            self.pre_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in self.HEADINGS or tag in self.BLOCK:
            self.parts.append("\n")
        if tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)

    def handle_data(self, data: str) -> None:
        if self.skip_depth:
            return
        self.parts.append(data if self.pre_depth else re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


def _tidy(text: str) -> str:
    """Trailing spaces off, at most one blank line in a row: whitespace is tokens too."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _break_quality(text: str, offsets: list[tuple[int, int]], boundary: int) -> int:
    """How good a place the gap before token `boundary` is to end a chunk: 3 between
    paragraphs, 2 after a sentence, 1 at a line end (hard-wrapped text has those mid-sentence),
    0 inside a line."""
    end = offsets[boundary - 1][1]
    around = text[max(end - 2, 0) : end + 2]
    if "\n\n" in around:
        return 3
    if text[end - 1 : end] in (".", "!", "?") and text[end : end + 1].isspace():
        return 2
    return 1 if "\n" in text[max(end - 1, 0) : end + 1] else 0


def chunk_text(text: str, tokenizer: Tokenizer, chunk_tokens: int = 192, overlap: int = 32) -> list[TextChunk]:
    """Split `text` into chunks of at most `chunk_tokens` tokens, each sharing `overlap`
    tokens with the one before so a sentence cut at a boundary is whole in one of them.

    A chunk ends at the best break in its final quarter (paragraph, then sentence, then line),
    so chunks read as whole passages rather than words cut mid-sentence.
    """
    if chunk_tokens < 2 or not 0 <= overlap < chunk_tokens // 2:
        raise ValueError(f"need chunk_tokens >= 2 and 0 <= overlap < chunk_tokens / 2, got {chunk_tokens}, {overlap}")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in encoding["offset_mapping"]]
    n = len(offsets)
    chunks: list[TextChunk] = []
    start = 0
    while start < n:
        end = min(start + chunk_tokens, n)
        if end < n:
            lowest = start + max(1, chunk_tokens * 3 // 4)
            best = max(range(end, lowest - 1, -1), key=lambda b: _break_quality(text, offsets, b))
            if _break_quality(text, offsets, best):
                end = best
        piece = text[offsets[start][0] : offsets[end - 1][1]].strip()
        if piece:
            chunks.append(TextChunk(len(chunks), piece, end - start))
        if end == n:
            break
        start = max(end - overlap, start + 1)
    return chunks
