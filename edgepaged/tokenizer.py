"""A model folder's tokenizer without transformers: `tokenizers` over tokenizer.json, and the chat
template rendered with jinja2.

Importing transformers and building its `AutoTokenizer` costs about 2.5 s on a 2-core box, more
than the rest of a one-shot `edgepaged generate` start together; this module loads the same
tokenizer in about 0.15 s. It offers exactly the part of transformers' tokenizer API that
edgepaged uses (calling it for ids and offsets, `encode`, `decode`, `apply_chat_template` with
`sanitize_control_tokens`, the special tokens and their ids, `backend_tokenizer`) and gives the
same ids and text as transformers 5's generic `TokenizersBackend` would (tests/test_tokenizer.py
holds them side by side).

`load_light` answers None for a folder it cannot match exactly: no tokenizer.json, a
model-specific tokenizer class (transformers rebuilds those from the vocabulary with its own
pipeline), special tokens the file does not hold, or several chat templates. The caller then
falls back to `AutoTokenizer`.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

# Classes that transformers 5 builds straight from tokenizer.json, as the file describes it.
_GENERIC_CLASSES = frozenset({None, "TokenizersBackend", "PreTrainedTokenizerFast"})
_SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers patches the pre-tokenizer of these with a vocabulary above 100k: not ours to copy.
_PATCHED_MODEL_TYPES = frozenset({"mistral", "mistral3", "voxtral", "ministral", "pixtral"})

# What transformers wraps around a control token found in user input (see `_mark`), so that the
# encoder can tell it from the template's own control tokens.
_MARK_START = "\U000f0000"
_MARK_END = "\U000f0001"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Encoding(dict):
    """`tokenizer(text)`'s answer: `enc.input_ids` or `enc["input_ids"]` (and "offset_mapping")."""

    @property
    def input_ids(self) -> list[int]:
        return self["input_ids"]


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_light(folder: Path) -> LightTokenizer | None:
    """The folder's tokenizer through `tokenizers`, or None where only transformers matches it."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() or (folder / "additional_chat_templates").is_dir():
        return None
    config = _read_json(folder / "tokenizer_config.json")
    if config.get("tokenizer_class") not in _GENERIC_CLASSES or config.get("auto_map"):
        return None
    special_map = _read_json(folder / "special_tokens_map.json")
    specials: dict[str, str] = {}
    for attr in _SPECIAL_ATTRIBUTES:
        value, mapped = _token_text(config.get(attr)), _token_text(special_map.get(attr))
        if value is not None and mapped is not None and value != mapped:
            return None  # which one transformers keeps is its business
        if (value or mapped) is not None:
            specials[attr] = value or mapped
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens"))
    if extra is None:
        extra = special_map.get("additional_special_tokens", [])
    if not isinstance(extra, list):
        return None
    extras = [_token_text(t) for t in extra]
    template = _chat_template(folder, config)
    if template is False:
        return None

    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    added = {tok.content for tok in backend.get_added_tokens_decoder().values()}
    # transformers adds special tokens the file lacks; the ids would then be its own.
    declared = config.get("added_tokens_decoder") or {}
    if any(t is None or t not in added for t in [*specials.values(), *extras]) or any(
        _token_text(t) not in added for t in declared.values()
    ):
        return None
    if backend.get_vocab_size() > 100_000 and backend.pre_tokenizer is not None:
        model_type = _read_json(folder / "config.json").get("model_type")
        if model_type in _PATCHED_MODEL_TYPES:
            return None
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    return LightTokenizer(
        backend,
        name_or_path=str(folder),
        specials=specials,
        extra_special_tokens=[t for t in extras if t is not None],
        chat_template=template,
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        chat_control_tokens=config.get("chat_control_tokens"),
    )


def _chat_template(folder: Path, config: dict) -> str | None | bool:
    """The one chat template (None: none; False: several, which only transformers picks among)."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict) and set(template) == {"default"}:
        return template["default"]
    return False


class LightTokenizer:
    """The slice of a transformers fast tokenizer that edgepaged uses, over a `tokenizers.Tokenizer`.

    Safe to use from two threads at once (the server's tokenizer thread encodes while the engine
    thread decodes): nothing here changes the backend after loading.
    """

    is_fast = True

    def __init__(
        self,
        backend,
        *,
        name_or_path: str,
        specials: dict[str, str],
        extra_special_tokens: list[str],
        chat_template: str | None,
        clean_up_tokenization_spaces: bool,
        chat_control_tokens: list[str] | None,
    ):
        self._tokenizer = backend
        self.name_or_path = name_or_path
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.chat_control_tokens = chat_control_tokens
        self.special_tokens_map = dict(specials)
        self.extra_special_tokens = list(extra_special_tokens)
        self.added_tokens_decoder = dict(sorted(backend.get_added_tokens_decoder().items()))
        self.added_tokens_encoder = {tok.content: i for i, tok in self.added_tokens_decoder.items()}
        self._is_bpe = type(backend.model).__name__ == "BPE"
        self._newline_ids: list[int] | None = None
        for attr in _SPECIAL_ATTRIBUTES:  # load_light checked that the file holds each of them
            token = specials.get(attr)
            setattr(self, attr, token)
            setattr(self, f"{attr}_id", None if token is None else backend.token_to_id(token))

    # ---- the vocabulary ------------------------------------------------------------------------

    @property
    def backend_tokenizer(self):
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            found = self._tokenizer.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skip]

    # ---- text to ids and back ------------------------------------------------------------------

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False, **kwargs) -> Encoding:
        if not isinstance(text, str):
            raise TypeError("the light tokenizer encodes one string at a time")
        if kwargs.pop("sanitize_control_tokens", False):
            if add_special_tokens and self._adds_special_tokens():
                raise NotImplementedError("`sanitize_control_tokens=True` needs a template that writes special tokens")
            if return_offsets_mapping:
                raise NotImplementedError("offsets of a sanitized chat are not available")
            ids = self._encode_marked(text)
            return Encoding(input_ids=ids, attention_mask=[1] * len(ids))
        if kwargs:
            raise TypeError(f"unsupported tokenizer arguments: {', '.join(sorted(kwargs))}")
        # encode_batch, not encode: it releases the GIL, so a multi-megabyte prompt tokenized on
        # the server's tokenizer thread does not stall the event loop (encode held it 1.9 s for 3 MB).
        (enc,) = self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
        out = Encoding(input_ids=enc.ids, attention_mask=enc.attention_mask)
        if return_offsets_mapping:
            out["offset_mapping"] = enc.offsets
        return out

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs) -> list[int]:
        return self(text, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        elif hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        text = self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        if clean and not self._is_bpe:  # transformers skips the clean-up for BPE, which it would corrupt
            text = _clean_up_tokenization(text)
        return text

    def _adds_special_tokens(self) -> bool:
        post = self._tokenizer.post_processor
        return post is not None and post.num_special_tokens_to_add(False) > 0

    # ---- chat templates ------------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_dict: bool = True,
        sanitize_control_tokens: bool = False,
        continue_final_message: bool = False,
        **kwargs: Any,
    ):
        """Render one conversation with the model's chat template, as transformers does; with
        `sanitize_control_tokens`, control tokens typed in the messages are encoded as text."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if continue_final_message:
            raise NotImplementedError("continue_final_message is not supported by the light tokenizer")
        if not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        messages = [{k: v for k, v in dict(m).items() if v is not None} for m in conversation]
        tools, documents = kwargs.pop("tools", None), kwargs.pop("documents", None)
        if sanitize_control_tokens:
            if not tokenize:
                raise ValueError("`sanitize_control_tokens=True` requires `tokenize=True`")
            pattern = _control_token_patterns(self._control_tokens())[0]
            messages, tools, documents, kwargs = (_mark(x, pattern) for x in (messages, tools, documents, kwargs))
        rendered = _compiled(self.chat_template).render(
            messages=_alias_reasoning_fields(messages),
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **kwargs},
        )
        if not tokenize:
            return rendered
        out = self(rendered, add_special_tokens=False, sanitize_control_tokens=sanitize_control_tokens)
        return out if return_dict else out["input_ids"]

    def _control_tokens(self) -> tuple[str, ...]:
        """The tokens sanitizing encodes as text in user input: every special added token, plus
        the added tokens listed in `chat_control_tokens` or, without that list, the (non-blank)
        ones the template's own text contains."""
        tokens = self.added_tokens_decoder.values()
        if self.chat_control_tokens is not None:
            listed = set(self.chat_control_tokens)
            return tuple(t.content for t in tokens if t.special or t.content in listed)
        text = _template_literal_text(self.chat_template)
        return tuple(t.content for t in tokens if t.special or (t.content in text and not t.content.isspace()))

    def _encode_marked(self, chat: str) -> list[int]:
        """Encode a rendered chat whose user-typed control tokens are marked: those as plain text,
        the rest (the template's own control tokens included) as usual."""
        markers = _control_token_patterns(tuple(self.added_tokens_encoder))[1]
        pieces = markers.split(chat)  # [text, marked token or None, text, ...]
        if self._newline_ids is None:
            self._newline_ids = self._encode_plain("\n")
        ids = self._encode_plain(pieces[0])
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = i % 2 == 1
            piece_ids = self._encode_piece(piece, as_text)
            if as_text and self.convert_tokens_to_ids(piece) in piece_ids:
                raise ValueError(f"Can't sanitize {piece!r}: the tokenizer produces it from plain text")
            ids += piece_ids
        return ids

    def _encode_piece(self, piece: str, as_text: bool) -> list[int]:
        # After a newline, so a SentencePiece-style prefix space is not added, then without it.
        encode = self._encode_without_added_tokens if as_text else self._encode_plain
        ids = encode("\n" + piece)
        newline = self._newline_ids
        if ids[: len(newline)] == newline:
            return ids[len(newline) :]
        return encode(piece)

    def _encode_plain(self, text: str) -> list[int]:
        """Ids without special tokens, the GIL released while the Rust side encodes (see __call__)."""
        return self._tokenizer.encode_batch([text], add_special_tokens=False)[0].ids

    def _encode_without_added_tokens(self, text: str) -> list[int]:
        backend = self._tokenizer
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        splits = [text]
        if backend.pre_tokenizer is not None:
            splits = [s for s, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
        return [tok.id for s in splits for tok in backend.model.tokenize(s)]


def _clean_up_tokenization(text: str) -> str:
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _alias_reasoning_fields(messages: list[dict]) -> list[dict]:
    out = []
    for message in messages:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        out.append(message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning})
    return out


def _mark(obj: Any, pattern: re.Pattern) -> Any:
    """Wrap the control tokens in user strings with the markers (after dropping any markers
    already there, which could otherwise forge a marked token); dict keys stay as they are."""
    if isinstance(obj, str):
        obj = obj.replace(_MARK_START, "").replace(_MARK_END, "")
        return pattern.sub(f"{_MARK_START}\\g<0>{_MARK_END}", obj)
    if isinstance(obj, dict):
        return {k: _mark(v, pattern) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark(v, pattern) for v in obj]
    return obj


@lru_cache
def _control_token_patterns(tokens: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    """A regex for any of `tokens` (longest first), and one for a marked token or a lone marker."""
    alternatives = re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)")
    markers = re.compile(f"{_MARK_START}({alternatives.pattern}){_MARK_END}|[{_MARK_START}{_MARK_END}]")
    return alternatives, markers


@lru_cache
def _template_literal_text(template: str) -> str:
    import jinja2.nodes

    ast = _compiled(template).environment.parse(template)
    literals = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    return "\0".join(literals)


@lru_cache
def _compiled(template: str):
    """The template in the sandboxed environment transformers renders chat templates in."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        # `{% generation %}…{% endgeneration %}` marks assistant text for training masks: rendered as is.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
                )

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(template)
