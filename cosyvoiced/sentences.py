"""Where sentences end, in a whole text (`sentence_spans`) or in text that arrives in pieces
(`SentenceSplitter`): one set of rules for the drop folder, ZeroMQ, HTTP, Wyoming's
`synthesize-chunk` and text streamed over a WebSocket.

A sentence ends after . ! ? ... with any closing quotes or brackets, where whitespace
follows; after a CJK full stop, exclamation or question mark, with nothing needed after it;
and at a blank line. It does not end after an abbreviation ("Dr.", "U.S.", "e.g."), after a
list number at a line's start ("1. First"), or where the cut would part an engine tag from
its word (`CutRules`). Nor before a lowercase word ("3 p.m. yesterday", "approx. five",
"'Run!' he said"), unless the stop is one that the text before it already shows to be an end
(`certain_stop`): ! ? or a CJK stop with no closing quote after it, or a "." after a plain
word. Those a stream hands out at once, without waiting for the next character.

Why not `sentence-stream` (wyoming-piper's splitter): it hands back edited text (stripped,
asterisks removed), not places in the text, and `segments` needs places: its segments tile
the text, and the tags carried into later segments are found by position. It also never
cuts before a tag ("Hello. [laughter] Next" stays whole) and never after a sentence that
ends in a digit or a lowercase word when the next one starts with one.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from cosyvoiced import pauses

Span = tuple[int, int]  # [start, end) in the text

_CLOSERS = "\"'\u201d\u2019)\\]"  # quotes and brackets that may follow a full stop
_CJK_STOPS = "\u3002\uff01\uff1f"  # ideographic full stop, exclamation, question
_CJK_CLOSERS = "\u201d\u2019\u300d\u300f\uff09\u300b\u3011"
SENTENCE_END = re.compile(rf"(?<=[.!?\u2026])[{_CLOSERS}]*\s+"
                          rf"|(?<=[{_CJK_STOPS}])[{_CJK_CLOSERS}]*\s*|\n\s*\n\s*")
# Engine markup: <|en|>, <|endofprompt|>, [laughter], [vocalized-noise], <strong>, </strong>.
TAG = re.compile(r"(?P<closing></[a-z][a-z0-9_]{0,15}>)|<\|[a-z0-9_]{1,24}\|>"
                 r"|\[[A-Za-z][A-Za-z0-9_-]{0,23}\]|<[a-z][a-z0-9_]{0,15}>")
# A full stop after these does not end the sentence: titles, and initialisms with inner dots
# (U.S., p.m., e.g.). "in the U.S. It" stays one sentence: a longer segment, not a wrong one.
# An abbreviation starts a word: after a space, an opening quote or bracket, a CJK stop, a
# tag, or where the text (or what is left of a stream) starts.
_ABBREVIATION = re.compile(rf"(?<![^\s(\[\"'\u201c\u2018\]>{_CJK_STOPS}{_CJK_CLOSERS}])"
                           r"(?:(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|etc|No)\.|(?:[A-Za-z]\.){2,})$",
                           re.IGNORECASE)
_ABBREVIATION_REACH = 40  # characters before a full stop that _ABBREVIATION looks at
_WORD_START = rf"\s(\[\"'\u201c\u2018\]>{_CJK_STOPS}{_CJK_CLOSERS}"  # what a word follows
_WORD_BEFORE = re.compile(rf"[^{_WORD_START}]{{0,{_ABBREVIATION_REACH}}}$")
# A plain word: two letters or more, apostrophes and hyphens only inside. After one, a "." is
# an end: it is not a number ("3.14"), an initialism ("U.S."), a URL or an abbreviation...
_PLAIN_WORD = re.compile(r"[^\W\d_]+(?:['\u2019-][^\W\d_]+)*")
# ...unless it is one of these shortened words, which may go on in lowercase ("approx. five").
_SHORTENED = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "no", "approx", "incl",
    "excl", "esp", "cf", "viz", "ca", "al", "resp", "fig", "figs", "vol", "vols", "eq", "eqs",
    "pp", "ch", "ed", "eds", "inc", "ltd", "co", "corp", "dept", "est", "min", "max", "sec",
    "hr", "hrs", "km", "cm", "mm", "kg", "lb", "lbs", "oz", "ft", "mt", "ave", "rd", "gen",
    "col", "lt", "sgt", "rev", "gov", "sen", "rep", "hon", "jan", "feb", "mar", "apr", "jun",
    "jul", "aug", "sep", "sept", "oct", "nov", "dec"})
_STOPS_AT_ONCE = "!?" + _CJK_STOPS
_LIST_NUMBER = re.compile(r"(?:^|\n)[ \t]*\d{1,3}\.$")  # "1." that starts a line
_LIST_NUMBER_REACH = 8
MAX_STREAMED_CHARS = 1000  # streamed text with no sentence end for this long is cut anyway
_SPACES = re.compile(r"\s+")


class CutRules:
    """Where the text may be cut: never inside a tag or a pause; preferably not between a
    tag and its word (`may_cut`), and where nothing else will do, still not inside a tag
    (`may_force`). Nothing is cut within the first `protected` characters (an instruction
    that every segment repeats). `line_start`: the text starts a line (a stream's rest
    after a sentence that ended with a line break does too)."""

    def __init__(self, text: str, protected: int = 0, line_start: bool = True) -> None:
        self.text = text
        self.line_start = line_start
        self.splits_tag = bytearray(len(text) + 1)
        self.parts_tag = bytearray(len(text) + 1)
        for tag in TAG.finditer(text):
            self._mark(self.splits_tag, tag.start() + 1, tag.end() - 1)
            if tag.group("closing"):  # stays with the word before it
                self._mark(self.parts_tag, end_of_word_before(text, tag.start()), tag.start())
            else:  # stays with the word after it
                self._mark(self.parts_tag, tag.end(), start_of_word_after(text, tag.end()))
        for pause in pauses.found(text):
            self._mark(self.splits_tag, pause.start() + 1, pause.end() - 1)
        self._mark(self.parts_tag, 1, protected)

    @staticmethod
    def _mark(marks: bytearray, first: int, last: int) -> None:
        if last >= first:
            marks[first:last + 1] = b"\x01" * (last + 1 - first)

    def may_cut(self, position: int) -> bool:
        return not (self.splits_tag[position] or self.parts_tag[position])

    def may_force(self, position: int) -> bool:
        return not self.splits_tag[position]

    def may_cut_after(self, match: re.Match[str]) -> bool:
        return self.may_cut(match.end())

    def ends_sentence(self, match: re.Match[str]) -> bool:
        """A sentence end that is one: not after an abbreviation or a list number, not
        before a lowercase word ("3 p.m. yesterday"); a paragraph break always is."""
        if not self.may_cut_after(match):
            return False
        if match.group().count("\n") >= 2:
            return True
        stop = match.start()
        if _ABBREVIATION.search(self.text, max(0, stop - _ABBREVIATION_REACH), stop):
            return False
        number = _LIST_NUMBER.search(self.text, max(0, stop - _LIST_NUMBER_REACH), stop)
        if number and (number.group().startswith("\n") or self.line_start):
            return False
        no_closer = not match.group()[:1].strip()  # a closing quote may go on: "'Run!' he"
        if no_closer and certain_stop(self.text, stop - 1):
            return True
        return not self.text[match.end():match.end() + 1].islower()


def certain_stop(text: str, stop: int) -> bool:
    """Whether the stop at `text[stop]` ends its sentence whatever comes after it (but a
    closing quote): ! ? a CJK stop, or a "." after a plain word that is not a shortened one.
    "3.", "U.", "p.m.", "Dr." and "approx." wait for the next character."""
    mark = text[stop]
    if mark in _STOPS_AT_ONCE:
        return True
    if mark != ".":
        return False
    word = _WORD_BEFORE.search(text, max(0, stop - _ABBREVIATION_REACH), stop)
    found = word.group() if word else ""
    return len(found) >= 2 and bool(_PLAIN_WORD.fullmatch(found)) \
        and found.lower() not in _SHORTENED


def end_of_word_before(text: str, position: int) -> int:
    while position > 0 and text[position - 1].isspace():
        position -= 1
    return position


def start_of_word_after(text: str, position: int) -> int:
    return pauses.past_whitespace(text, position)


def pieces(text: str, span: Span, boundary: re.Pattern[str],
           ends_here: Callable[[re.Match[str]], bool]) -> list[Span]:
    """`span` cut after each boundary match that `ends_here` accepts."""
    start, end = span
    cut, at = [], start
    for match in boundary.finditer(text, start, end):
        if at < match.end() < end and ends_here(match):
            cut.append((at, match.end()))
            at = match.end()
    cut.append((at, end))
    return cut


def sentence_spans(text: str, span: Span | None = None, rules: CutRules | None = None
                   ) -> list[Span]:
    """The sentences of `span` (all of `text` by default): spans that tile it."""
    rules = rules or CutRules(text)
    return pieces(text, span or (0, len(text)), SENTENCE_END, rules.ends_sentence)


def sentences(text: str) -> list[str]:
    return [text[start:end] for start, end in sentence_spans(text)]


class SentenceSplitter:
    """Text fed in pieces (an LLM's tokens), handed back a sentence at a time as soon as
    each is known to be complete: `feed` returns the sentences its text completed,
    `flush` the rest at the end of the stream. Joined, they are the text fed in.

    A sentence that ends the text fed so far with a `certain_stop` ("Hello there!",
    "你好。", "It is late.") comes out of that very `feed`, unless a quote, bracket or tag
    it opened is still open (its closing mark may come next). Any other end is known once
    the first character after it has come: that tells a new sentence from "3 p.m.
    yesterday" or "3.14", and an end from "Dr. Smith". An engine tag or pause that begins
    there is waited for whole. Text with no sentence end for `max_chars` is cut at its last
    space, clause or not. For texts under `max_chars` a sentence at a time, the sentences
    are those `sentence_spans` finds in the whole text, however the text was cut into
    pieces, but for where the whitespace between two goes (a sentence handed out at once
    leaves it to the next), and but for a text that goes on right after a certain stop
    with no space ("site.com" fed as "site." "com") or with a closing mark it never opened.
    """

    def __init__(self, max_chars: int = MAX_STREAMED_CHARS) -> None:
        self.max_chars = max_chars
        self._text = ""
        self._line_start = True  # what is pending starts a line

    @property
    def pending(self) -> str:
        """What was fed and is not yet a complete sentence."""
        return self._text

    def feed(self, text: str) -> list[str]:
        self._text += text
        ready = self._split_off(self._cuts())
        while len(self._text) > self.max_chars:
            ready += self._split_off([self._forced_cut()])
            ready += self._split_off(self._cuts(2 * self.max_chars))
        return ready

    def flush(self) -> list[str]:
        """The rest, cut into sentences: the stream has ended (or its sender asked)."""
        rest, self._text = self._text, ""
        rules = CutRules(rest, line_start=self._line_start)
        self._line_start = True
        return [rest[start:end] for start, end in sentence_spans(rest, rules=rules)] \
            if rest else []

    def _split_off(self, cuts: list[int]) -> list[str]:
        text, at = self._text, 0
        ready = []
        for cut in cuts:
            ready.append(text[at:cut])
            at = cut
            self._line_start = text[:cut].rstrip(" \t").endswith("\n")
        self._text = text[at:]
        return ready

    def _cuts(self, reach: int | None = None) -> list[int]:
        """The sentence ends in what is pending (its first `reach` characters) that are
        known to be ends, in order. Past `reach` is as if it had not come yet: cut after
        cut through a long text, each look stays short."""
        text = self._text if reach is None else self._text[:reach]
        rules: CutRules | None = None  # made once a sentence end is in sight
        cuts: list[int] = []
        for match in SENTENCE_END.finditer(text):
            end = match.end()
            if end >= len(text):
                break  # what follows decides; it has not come yet
            if _tag_incomplete(text, end):
                return cuts  # the tag decides; it has not come whole
            rules = rules or CutRules(text, line_start=self._line_start)
            start = cuts[-1] if cuts else 0
            if end > start and not text[start:end].isspace() and rules.ends_sentence(match):
                cuts.append(end)  # (whitespace left by a sentence handed out at once waits)
        if len(text) == len(self._text) and _ends_now(text, cuts[-1] if cuts else 0):
            cuts.append(len(text))
        return cuts

    def _forced_cut(self) -> int:
        """After the last space in the first `max_chars` where a tag allows it, else at the
        first place after them that is not inside a tag."""
        window = self._text[:2 * self.max_chars]  # tags are short: this decides the cut
        rules = CutRules(window, line_start=self._line_start)
        spaces = [m.end() for m in _SPACES.finditer(window, 1, self.max_chars)]
        for at in reversed(spaces):
            if rules.may_cut(at):
                return at
        return next((at for at in range(self.max_chars, len(window)) if rules.may_force(at)),
                    len(window))


def _ends_now(text: str, start: int) -> bool:
    """Whether the sentence from `start` ends where `text` does (but for whitespace), with a
    `certain_stop` and nothing opened in it that a closing mark still to come would end."""
    body = text.rstrip()
    return len(body) > start and certain_stop(body, len(body) - 1) \
        and not _left_open(body[start:]) and CutRules(text[start:]).may_cut(len(text) - start)


_PAIRS = ("()", "[]", "\u201c\u201d", "\u300c\u300d", "\u300e\u300f", "\uff08\uff09",
          "\u300a\u300b", "\u3010\u3011")
_SINGLE_OPENING = re.compile(r"(?:^|(?<=[\s(\[\"\u201c]))'(?=\S)|\u2018")
_SINGLE_CLOSING = re.compile(r"(?<=\S)['\u2019](?![^\W_])")  # not an apostrophe: "don't"
_OPENING_TAG = re.compile(r"<[a-z][a-z0-9_]{0,15}>")
_CLOSING_TAG = re.compile(r"</[a-z][a-z0-9_]{0,15}>")


def _left_open(sentence: str) -> bool:
    """Whether a quote, bracket or tag opened in `sentence` is not closed in it."""
    return sentence.count('"') % 2 == 1 \
        or any(sentence.count(pair[0]) > sentence.count(pair[1]) for pair in _PAIRS) \
        or len(_SINGLE_OPENING.findall(sentence)) > len(_SINGLE_CLOSING.findall(sentence)) \
        or len(_OPENING_TAG.findall(sentence)) > len(_CLOSING_TAG.findall(sentence))


def _tag_incomplete(text: str, position: int) -> bool:
    """Whether a tag (or pause) may begin at `position` and has not fully arrived."""
    opening = text[position]
    if opening not in "<[":
        return False
    closing = ">" if opening == "<" else "]"
    return text.find(closing, position, position + 80) < 0 and len(text) - position < 80
