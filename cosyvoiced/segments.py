"""A job's text cut into segments: the unit of scheduling, one engine call each.

Segments are sentences; a sentence longer than `max_chars` is cut at clause boundaries
(commas, semicolons, colons, dashes), where it has none between words, and a word longer
than `max_chars` (nothing speakable is) anywhere. So no segment is ever longer than
`max_chars`: one engine call's memory and time are bounded whatever the text.

A streamed job's first segment ends at the first clause boundary after `first_words` words,
so that its first audio needs only a short synthesis; later segments stay whole sentences,
for prosody.

Engine tags (CosyVoice's `<|en|>`, `[laughter]`, `<strong>...</strong>`) stay with the words
they apply to: a cut never falls inside a tag, between an opening tag and the word after it,
or between a closing tag and the word before it (unless a run of tags is too long for one
segment). Two things apply to the whole text, so every later segment carries them in front:
an instruction ending in `<|endofprompt|>` at the start (CosyVoice 3), and the language tag
(`<|en|>`) in effect where the segment starts.

The invariant: the segments' spans (`spans`) tile the text, and each segment is its span's
slice after what it carries (`carried`). A text with neither an instruction nor a language
tag carries nothing, and then `"".join(split(text, ...)) == text`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

Span = tuple[int, int]  # [start, end) in the text
MayCut = Callable[[int], bool]

# A sentence ends after . ! ? … (Latin or CJK), with any closing quotes or brackets, where
# whitespace follows; CJK full stops need none. Line breaks between paragraphs end one too.
_CLOSERS = "\"'\u201d\u2019)\\]"  # quotes and brackets that may follow a full stop
_CJK_STOPS = "\u3002\uff01\uff1f"  # ideographic full stop, exclamation, question
_CJK_CLOSERS = "\u201d\u2019\u300d\u300f\uff09"
_SENTENCE_END = re.compile(rf"(?<=[.!?\u2026])[{_CLOSERS}]*\s+"
                           rf"|(?<=[{_CJK_STOPS}])[{_CJK_CLOSERS}]*\s*|\n\s*\n\s*")
_CLAUSE_MARKS = ",;:\uff0c\u3001\uff1b\uff1a"  # and their CJK (fullwidth) forms
_DASHES = "\u2013\u2014"
# (?<!\s): a run of spaces is tried once, from its start; tried from each of its spaces, the
# pattern took quadratic time (3 s for 20,000 spaces, in the supervisor's thread).
_CLAUSE_END = re.compile(rf"(?<=[{_CLAUSE_MARKS}])\s*|(?<!\s)\s+(?=[{_DASHES}]\s)"
                         rf"|(?<=[{_DASHES}])\s+")
# CJK characters count as words: those languages do not separate words with spaces.
_CJK = "\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af"
_WORD = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_WORD_END = re.compile(rf"\s+|(?<=[{_CJK}])(?=\S)|(?<=\S)(?=[{_CJK}])")
# Engine markup: <|en|>, <|endofprompt|>, [laughter], [vocalized-noise], <strong>, </strong>.
_TAG = re.compile(r"(?P<closing></[a-z][a-z0-9_]{0,15}>)|<\|[a-z0-9_]{1,24}\|>"
                  r"|\[[A-Za-z][A-Za-z0-9_-]{0,23}\]|<[a-z][a-z0-9_]{0,15}>")
_LANGUAGE_TAG = re.compile(r"<\|[a-z]{2,3}\|>")
_END_OF_PROMPT = "<|endofprompt|>"
_SPEAKABLE = re.compile(r"\w")
# A full stop after these does not end the sentence: titles, and initialisms with inner dots
# (U.S., p.m., e.g.). "in the U.S. It" stays one sentence: a longer segment, not a wrong one.
_ABBREVIATION = re.compile(r"(?<![^\s(\[\"'\u201c\u2018])"  # at a word's start
                           r"(?:(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|etc|No)\.|(?:[A-Za-z]\.){2,})$",
                           re.IGNORECASE)
_ABBREVIATION_REACH = 40  # characters before a full stop that _ABBREVIATION looks at


def words(text: str) -> int:
    return len(_WORD.findall(text))


class _CutRules:
    """Where the text may be cut: never inside a tag; preferably not between a tag and its
    word (`may_cut`), and where nothing else will do, still not inside a tag
    (`may_force`)."""

    def __init__(self, text: str, max_chars: int) -> None:
        self.text = text
        self.splits_tag = bytearray(len(text) + 1)
        self.parts_tag = bytearray(len(text) + 1)
        for tag in _TAG.finditer(text):
            self._mark(self.splits_tag, tag.start() + 1, tag.end() - 1)
            if tag.group("closing"):  # stays with the word before it
                self._mark(self.parts_tag, _end_of_word_before(text, tag.start()), tag.start())
            else:  # stays with the word after it
                self._mark(self.parts_tag, tag.end(), _start_of_word_after(text, tag.end()))
        self._mark(self.parts_tag, 1, len(preamble(text, max_chars)))  # never cut in it

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
        """A sentence end that is one: not after an abbreviation, not before a lowercase word
        ("3 p.m. yesterday"); a paragraph break always is."""
        if not self.may_cut_after(match):
            return False
        if match.group().count("\n") >= 2:
            return True
        stop = match.start()
        if _ABBREVIATION.search(self.text, max(0, stop - _ABBREVIATION_REACH), stop):
            return False
        return not self.text[match.end():match.end() + 1].islower()


def _end_of_word_before(text: str, position: int) -> int:
    while position > 0 and text[position - 1].isspace():
        position -= 1
    return position


def _start_of_word_after(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def preamble(text: str, max_chars: int) -> str:
    """An instruction the text starts with, up to and including `<|endofprompt|>` (CosyVoice
    3 reads what comes before it as how to speak); "" if none, or too long to repeat."""
    end = text.find(_END_OF_PROMPT)
    if end < 0 or end + len(_END_OF_PROMPT) > max_chars:
        return ""
    return text[:end + len(_END_OF_PROMPT)]


def carried(text: str, start: int, max_chars: int) -> str:
    """What the segment of `text` that starts at `start` carries in front of its slice."""
    if start == 0:
        return ""
    instruction = preamble(text, max_chars)
    if start < len(instruction):
        return ""
    return instruction + _language_at(text, start, len(instruction))


def _language_at(text: str, start: int, after: int) -> str:
    """The language tag in effect at `start` (the last one before it, after the preamble);
    "" if the segment starts with a language tag of its own."""
    if _LANGUAGE_TAG.match(text, _start_of_word_after(text, start)):
        return ""
    tags = [tag for tag in _LANGUAGE_TAG.finditer(text, after, start) if tag.end() <= start]
    return tags[-1].group() if tags else ""


def _pieces(text: str, span: Span, boundary: re.Pattern[str],
            ends_here: Callable[[re.Match[str]], bool]) -> list[Span]:
    """`span` cut after each boundary match that `ends_here` accepts."""
    start, end = span
    pieces, at = [], start
    for match in boundary.finditer(text, start, end):
        if at < match.end() < end and ends_here(match):
            pieces.append((at, match.end()))
            at = match.end()
    pieces.append((at, end))
    return pieces


def _packed(pieces: list[Span], max_chars: int) -> list[Span]:
    """Consecutive pieces joined while they fit in `max_chars`."""
    packed: list[Span] = []
    for start, end in pieces:
        if packed and end - packed[-1][0] <= max_chars:
            packed[-1] = (packed[-1][0], end)
        else:
            packed.append((start, end))
    return packed


def _forced(span: Span, max_chars: int, rules: _CutRules) -> list[Span]:
    """`span` cut every `max_chars` at the latest place allowed: a word too long, or a run
    of tags; still never inside a tag (where a tag is longer than `max_chars`, after it)."""
    start, end = span
    cut: list[Span] = []
    while end - start > max_chars:
        window = range(start + max_chars, start, -1)
        at = next((p for p in window if rules.may_cut(p)), None) \
            or next((p for p in window if rules.may_force(p)), None) \
            or next((p for p in range(start + max_chars + 1, end) if rules.may_force(p)), end)
        cut.append((start, at))
        start = at
    return [*cut, (start, end)] if start < end else cut


def _cut_long(text: str, sentence: Span, max_chars: int, rules: _CutRules) -> list[Span]:
    if sentence[1] - sentence[0] <= max_chars:
        return [sentence]
    cut: list[Span] = []
    for clause in _packed(_pieces(text, sentence, _CLAUSE_END, rules.may_cut_after), max_chars):
        if clause[1] - clause[0] <= max_chars:
            cut.append(clause)
            continue
        for run in _packed(_pieces(text, clause, _WORD_END, rules.may_cut_after), max_chars):
            cut.extend(_forced(run, max_chars, rules))
    return cut


def _first_clause(text: str, sentence: Span, first_words: int, rules: _CutRules) -> list[Span]:
    """The sentence cut at its first clause boundary after `first_words` words, if any."""
    clauses = _pieces(text, sentence, _CLAUSE_END, rules.may_cut_after)
    seen = 0
    for start, end in clauses[:-1]:
        seen += words(text[start:end])
        if seen >= first_words:
            return [(sentence[0], end), (end, sentence[1])]
    return [sentence]


def _speakable(text: str, span: Span) -> bool:
    return bool(_SPEAKABLE.search(_TAG.sub("", text[span[0]:span[1]])))


def _without_wordless(text: str, segments: list[Span], max_chars: int) -> list[Span]:
    """A piece with no words (a stray quote, a trailing newline, only tags) joined to its
    neighbour, where the two fit in `max_chars`."""
    merged: list[Span] = []
    for span in segments:
        if merged and span[1] - merged[-1][0] <= max_chars and \
                not (_speakable(text, span) and _speakable(text, merged[-1])):
            merged[-1] = (merged[-1][0], span[1])
        else:
            merged.append(span)
    return merged


def spans(text: str, max_chars: int, first_words: int = 0, pack_chars: int = 0) -> list[Span]:
    """Where `split` cuts `text`: spans that tile it, each at most `max_chars` long (a tag
    longer than that alone excepted)."""
    rules = _CutRules(text, max_chars)
    sentences = _pieces(text, (0, len(text)), _SENTENCE_END, rules.ends_sentence)
    cut = [piece for sentence in sentences if sentence[1] > sentence[0]
           for piece in _cut_long(text, sentence, max_chars, rules)]
    if first_words > 0 and cut:
        cut[:1] = _first_clause(text, cut[0], first_words, rules)
    merged = _without_wordless(text, cut, max_chars)
    keep_first = 1 if first_words > 0 else 0  # the fast first segment stays short
    return merged[:keep_first] + _packed(merged[keep_first:], min(pack_chars, max_chars))


def split(text: str, max_chars: int, first_words: int = 0, pack_chars: int = 0) -> list[str]:
    """The segments of `text`; `first_words` > 0 cuts the first one early (streamed jobs);
    consecutive short sentences share a segment up to `pack_chars` (each engine call has a
    cost of its own, and a segment still streams sentence by sentence).

    Each segment is `carried(text, start, max_chars) + text[start:end]` for its span; see
    the module's docstring for the invariant.
    """
    return [carried(text, start, max_chars) + text[start:end]
            for start, end in spans(text, max_chars, first_words, pack_chars)]
