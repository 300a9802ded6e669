"""Text clean-up before synthesis: what an LLM writes, read as prose.

- Markdown is read as prose (parsed with markdown-it-py): `**bold**` -> bold, `[link](url)`
  -> link; headings, list items and table rows each end as a sentence (a full stop added
  where they have none; table cells are read with commas between them); code blocks and
  images are dropped, inline code is read as its text, HTML tags are dropped.
- Emoji are dropped (the `emoji` package's list: sequences, skin tones and flags whole).
- URLs are read as their host: `https://www.example.com/a/b?c=d` -> example.com.
- Stray `*` and backticks (an emphasis left open, as a text streamed in pieces leaves it)
  are dropped.

Engine tags (`<|en|>`, `[laughter]`, `<strong>`) and pauses (`[pause:0.8]`, `<break .../>`)
pass through untouched. A text with no markdown in it keeps its own spacing and line breaks.

It runs in the supervisor, on untrusted text: `clean` never raises (on any failure it logs
and returns the text as it came), and its work is linear in the text, whose length the
caller has bounded first (`spool.max_text_chars`).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Sequence

import emoji
from markdown_it import MarkdownIt
from markdown_it.token import Token

from cosyvoiced import logs, pauses

log = logs.get_logger("cosyvoiced.cleanup")

# Tags and URLs are swapped for one private-use character each while markdown is parsed, so
# that nothing in them is read as markup (a URL's underscores, `<strong>` as HTML).
_PLACEHOLDERS = (0xE000, 0xF8FF)
_PRIVATE_USE = re.compile("[\ue000-\uf8ff]")
# CosyVoice's markup, and pauses. Not any <b> or [word]: HTML is markdown's to drop, and
# `[text](url)` is a link.
_ENGINE_TAGS = (r"<\|[a-z0-9_]{1,24}\|>|</?(?:strong|laughter)>"
                r"|(?<!!)\[[A-Za-z][A-Za-z0-9_-]{0,23}\](?![(\[:])")
_PROTECTED = re.compile(rf"{_ENGINE_TAGS}|{pauses.PAUSE.pattern}", re.IGNORECASE)
# A URL (with its scheme, or starting www.), in angle brackets or not. It ends before
# whitespace, brackets and quotes; trailing punctuation is the sentence's, not the URL's.
_URL = re.compile(r"<?\b(?:https?://|www\.)[^\s<>\"'()\[\]{}\ue000-\uf8ff]+>?",
                  re.IGNORECASE)
_URL_TRAILER = ".,;:!?"
_STRAY_MARKS = re.compile(r"[*`]+")
_SPACES = re.compile(r"[ \t]{2,}")
_WORD = re.compile(r"\w")
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_SENTENCE_FINAL = tuple(".!?:;\u2026\u3002\uff01\uff1f\uff1a\uff1b")
# CommonMark with tables and strikethrough; indented code blocks off (plain text indented
# by four spaces is prose, not code); nesting bounded (deep quotes or lists cost no stack).
_MARKDOWN = MarkdownIt("commonmark", {"maxNesting": 20}).enable(["table", "strikethrough"]) \
    .disable("code")
_PLAIN_BLOCKS = frozenset({"paragraph_open", "paragraph_close", "inline"})
_PLAIN_INLINE = frozenset({"text", "softbreak"})


def clean(text: str) -> str:
    """`text` as it should be read aloud; the text unchanged if anything fails."""
    try:
        return _cleaned(text)
    except Exception as error:  # noqa: BLE001 - untrusted input; the supervisor goes on
        log.warning("text_cleanup_failed", error=f"{type(error).__name__}: {error}"[:200],
                    chars=len(text))
        return text


def _cleaned(original: str) -> str:
    kept: list[str] = []
    text = _protected(_PRIVATE_USE.sub("", original), kept)
    tokens = _MARKDOWN.parse(text)
    if not _is_plain(tokens):
        text = _prose(tokens)
    text = emoji.replace_emoji(_STRAY_MARKS.sub("", text), replace="")
    text = _PRIVATE_USE.sub(lambda mark: kept[ord(mark.group()) - _PLACEHOLDERS[0]], text)
    if text == original:  # nothing to clean: its spacing is the writer's
        return original
    return _BLANK_LINES.sub("\n\n", _SPACES.sub(" ", text)).strip()  # the gaps of what went


def _protected(text: str, kept: list[str]) -> str:
    """`text` with each tag, pause and URL swapped for a placeholder; `kept` gets what each
    stands for (a URL's host). Past the placeholders there are, the rest stays as it is."""
    def keep(replacement: str) -> Callable[[re.Match[str]], str]:
        def swap(found: re.Match[str]) -> str:
            if len(kept) > _PLACEHOLDERS[1] - _PLACEHOLDERS[0]:
                return found.group()
            kept.append(replacement or _host_of(found.group()))
            return chr(_PLACEHOLDERS[0] + len(kept) - 1)
        return swap

    def tag(found: re.Match[str]) -> str:
        return keep(found.group())(found)

    return _URL.sub(keep(""), _PROTECTED.sub(tag, text))


def _host_of(url: str) -> str:
    """A URL's host without www., and the sentence's punctuation it swallowed after it."""
    url = url.strip("<>")
    stripped = url.rstrip(_URL_TRAILER)
    trailer = url[len(stripped):]
    if not re.match(r"https?://", stripped, re.IGNORECASE):
        stripped = "http://" + stripped
    host = urllib.parse.urlsplit(stripped).hostname or ""
    return host.removeprefix("www.") + trailer


def _is_plain(tokens: Sequence[Token]) -> bool:
    return all(token.type in _PLAIN_BLOCKS and all(
        child.type in _PLAIN_INLINE for child in token.children or ()) for token in tokens)


class _Prose:
    """Markdown's block tokens, read as sentences and paragraphs."""

    def __init__(self) -> None:
        self.parts: list[str] = []  # finished blocks and their separators
        self.block: list[str] = []  # what the open block says so far
        self.lists = 0  # list items open (nested lists count each)

    def block_end(self, separator: str, full_stop: bool) -> None:
        said = "".join(self.block).strip().removesuffix(",").rstrip()
        self.block = []
        if said and full_stop and not said.endswith(_SENTENCE_FINAL):
            said += "."
        self.parts += [said, separator] if said else [separator]

    def take(self, token: Token) -> None:
        kind = token.type
        if kind == "inline":
            self.block.append(_inline(token.children or []))
        elif kind == "list_item_open":
            self.lists += 1
            if token.info:  # an ordered list's number: "2." stays "2."
                self.block.append(f"{token.info}{token.markup} ")
        elif kind == "list_item_close":
            self.lists -= 1
        elif kind in ("th_close", "td_close"):
            self.block.append(", ")
        elif kind == "tr_close":
            self.block_end("\n", full_stop=True)
        elif kind == "heading_close":
            self.block_end("\n\n", full_stop=True)
        elif kind == "paragraph_close":
            in_list = self.lists > 0
            self.block_end("\n" if in_list else "\n\n", full_stop=in_list)
        elif kind in ("hr", "bullet_list_close", "ordered_list_close", "table_close",
                      "blockquote_close"):
            self.block_end("\n", full_stop=False)
        # fence, code_block, html_block: dropped; *_open: nothing to say


def _prose(tokens: Sequence[Token]) -> str:
    prose = _Prose()
    for token in tokens:
        prose.take(token)
    prose.block_end("", full_stop=False)
    return "".join(prose.parts).strip()


def _inline(children: Sequence[Token]) -> str:
    said: list[str] = []
    for child in children:
        if child.type in ("text", "code_inline"):
            said.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            said.append("\n")
        # image, html_inline: dropped; link, emphasis, strikethrough: their text only
    return "".join(said)


def says_something(text: str) -> bool:
    """Whether `text`, cleaned up, has a word or a pause in it."""
    if not _WORD.search(text):
        # `clean` only drops text (and adds punctuation); a pause has letters: nothing to
        # say, known at C speed (a stream of "。" was 22 us a sentence, 19,990 a message).
        return False
    return bool(_WORD.search(clean(text)) or pauses.PAUSE.search(text))
