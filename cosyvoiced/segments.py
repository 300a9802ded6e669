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

Sentences are `sentences.py`'s (the same as a streamed text's). A pause (`[pause:0.8]`,
`<break time="800ms"/>`) is a segment of its own, whatever its neighbours: the worker makes
its silence without the engine (`pauses.py`), and it carries nothing.

The invariant: the segments' spans (`spans`) tile the text, and each segment is its span's
slice after what it carries (`carried`). A text with neither an instruction nor a language
tag carries nothing, and then `"".join(split(text, ...)) == text`.
"""

from __future__ import annotations

import re
from bisect import bisect_right

from cosyvoiced import pauses
from cosyvoiced.sentences import (
    TAG,
    CutRules,
    pieces,
    sentence_spans,
    start_of_word_after,
)

Span = tuple[int, int]  # [start, end) in the text

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
_LANGUAGE_TAG = re.compile(r"<\|[a-z]{2,3}\|>")
_END_OF_PROMPT = "<|endofprompt|>"
_SPEAKABLE = re.compile(r"\w")


def words(text: str) -> int:
    return len(_WORD.findall(text))


def preamble(text: str, max_chars: int) -> str:
    """An instruction the text starts with, up to and including `<|endofprompt|>` (CosyVoice
    3 reads what comes before it as how to speak); "" if none, or too long to repeat."""
    end = text.find(_END_OF_PROMPT)
    if end < 0 or end + len(_END_OF_PROMPT) > max_chars:
        return ""
    return text[:end + len(_END_OF_PROMPT)]


def carried(text: str, start: int, max_chars: int) -> str:
    """What the segment of `text` that starts at `start` carries in front of its slice."""
    return Carrier(text, max_chars).carried(start)


class Carrier:
    """What the segments of one text carry (`carried`), its preamble and language tags
    found once and looked up by position. Searched again from the text's start for each
    segment, they took quadratic time on the supervisor's tick: 196 ms for the 2,500
    segments of 20,000 characters of "a<|en|>[pause:0]", 2.8 s for 80,000."""

    def __init__(self, text: str, max_chars: int) -> None:
        self._text = text
        self._instruction = preamble(text, max_chars)
        # Tags cannot overlap, so one search finds those each segment's own search would.
        tags = list(_LANGUAGE_TAG.finditer(text, len(self._instruction)))
        self._tag_ends = [tag.end() for tag in tags]
        self._tags = [tag.group() for tag in tags]

    def carried(self, start: int) -> str:
        """What the segment that starts at `start` carries in front of its slice."""
        if start == 0 or pauses.starts_at(self._text, start):
            return ""
        if start < len(self._instruction):
            return ""
        return self._instruction + self._language_at(start)

    def _language_at(self, start: int) -> str:
        """The language tag in effect at `start` (the last one to end by it, after the
        preamble); "" if the segment starts with a language tag of its own."""
        if _LANGUAGE_TAG.match(self._text, start_of_word_after(self._text, start)):
            return ""
        before = bisect_right(self._tag_ends, start)
        return self._tags[before - 1] if before else ""


def _packed(pieces: list[Span], max_chars: int) -> list[Span]:
    """Consecutive pieces joined while they fit in `max_chars`."""
    packed: list[Span] = []
    for start, end in pieces:
        if packed and end - packed[-1][0] <= max_chars:
            packed[-1] = (packed[-1][0], end)
        else:
            packed.append((start, end))
    return packed


def _forced(span: Span, max_chars: int, rules: CutRules) -> list[Span]:
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


def _cut_long(text: str, sentence: Span, max_chars: int, rules: CutRules) -> list[Span]:
    if sentence[1] - sentence[0] <= max_chars:
        return [sentence]
    cut: list[Span] = []
    for clause in _packed(pieces(text, sentence, _CLAUSE_END, rules.may_cut_after), max_chars):
        if clause[1] - clause[0] <= max_chars:
            cut.append(clause)
            continue
        for run in _packed(pieces(text, clause, _WORD_END, rules.may_cut_after), max_chars):
            cut.extend(_forced(run, max_chars, rules))
    return cut


def _first_clause(text: str, sentence: Span, first_words: int, rules: CutRules) -> list[Span]:
    """The sentence cut at its first clause boundary after `first_words` words, if any."""
    clauses = pieces(text, sentence, _CLAUSE_END, rules.may_cut_after)
    seen = 0
    for start, end in clauses[:-1]:
        seen += words(text[start:end])
        if seen >= first_words:
            return [(sentence[0], end), (end, sentence[1])]
    return [sentence]


def _speakable(text: str, span: Span) -> bool:
    return bool(_SPEAKABLE.search(TAG.sub("", text[span[0]:span[1]])))


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
    longer than that alone excepted), each pause alone in its own."""
    rules = CutRules(text, len(preamble(text, max_chars)))
    cut: list[Span] = []
    for run, is_pause in pauses.runs(text, (0, len(text))):
        if is_pause:
            cut.append(run)
            continue
        cut.extend(_text_spans(text, run, max_chars, first_words, pack_chars, rules))
        first_words = 0  # only the job's first words are hurried
    return cut


def _text_spans(text: str, run: Span, max_chars: int, first_words: int,  # noqa: PLR0917
                pack_chars: int, rules: CutRules) -> list[Span]:
    """The spans of a run of `text` with no pause in it."""
    cut = [piece for sentence in sentence_spans(text, run, rules) if sentence[1] > sentence[0]
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
    carrier = Carrier(text, max_chars)
    return [carrier.carried(start) + text[start:end]
            for start, end in spans(text, max_chars, first_words, pack_chars)]
