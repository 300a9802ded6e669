"""A job's text cut into segments: the unit of scheduling, one engine call each.

Segments are sentences; a sentence longer than `max_chars` is cut at clause boundaries
(commas, semicolons, colons, dashes), and only where it has none, between words. A streamed
job's first segment ends at the first clause boundary after `first_words` words, so that its
first audio needs only a short synthesis; later segments stay whole sentences, for prosody.
Joined in order, the segments are the text: nothing is dropped or repeated.
"""

from __future__ import annotations

import re

# A sentence ends after . ! ? … (Latin or CJK), with any closing quotes or brackets, where
# whitespace follows; CJK full stops need none. Line breaks between paragraphs end one too.
_CLOSERS = "\"'\u201d\u2019)\\]"  # quotes and brackets that may follow a full stop
_CJK_STOPS = "\u3002\uff01\uff1f"  # ideographic full stop, exclamation, question
_CJK_CLOSERS = "\u201d\u2019\u300d\u300f\uff09"
_SENTENCE_END = re.compile(rf"(?<=[.!?\u2026])[{_CLOSERS}]*\s+"
                           rf"|(?<=[{_CJK_STOPS}])[{_CJK_CLOSERS}]*\s*|\n\s*\n\s*")
_CLAUSE_MARKS = ",;:\uff0c\u3001\uff1b\uff1a"  # and their CJK (fullwidth) forms
_DASHES = "\u2013\u2014"
_CLAUSE_END = re.compile(rf"(?<=[{_CLAUSE_MARKS}])\s*|\s+(?=[{_DASHES}]\s)|(?<=[{_DASHES}])\s+")
# CJK characters count as words: those languages do not separate words with spaces.
_CJK = "\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af"
_WORD = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
# Text with engine markup (CosyVoice's <|en|>, [laughter]...) is not cut: a tag must stay
# with the words it applies to.
_MARKUP = re.compile(r"<\|[^|]*\|>|\[[a-z_]+\]")
_SPEAKABLE = re.compile(r"\w")
# A full stop after these does not end the sentence.
_ABBREVIATION = re.compile(r"(?:^|\s)(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|etc|e\.g|i\.e|No)\.\s*$",
                           re.IGNORECASE)


def words(text: str) -> int:
    return len(_WORD.findall(text))


def _pieces(text: str, boundary: re.Pattern[str]) -> list[str]:
    """`text` cut after each boundary match; each piece keeps its trailing separator."""
    pieces, start = [], 0
    for match in boundary.finditer(text):
        if match.end() > start and match.end() < len(text):
            pieces.append(text[start:match.end()])
            start = match.end()
    pieces.append(text[start:])
    return [piece for piece in pieces if piece]


def _packed(pieces: list[str], max_chars: int) -> list[str]:
    """Consecutive pieces joined while they fit in `max_chars`."""
    packed: list[str] = []
    for piece in pieces:
        if packed and len(packed[-1]) + len(piece) <= max_chars:
            packed[-1] += piece
        else:
            packed.append(piece)
    return packed


def _cut_long(sentence: str, max_chars: int) -> list[str]:
    if len(sentence) <= max_chars:
        return [sentence]
    clauses = _packed(_pieces(sentence, _CLAUSE_END), max_chars)
    cut: list[str] = []
    for clause in clauses:
        if len(clause) <= max_chars:
            cut.append(clause)
        else:  # no clause boundary for too long: between words
            cut.extend(_packed(re.findall(r"\S+\s*", clause) or [clause], max_chars))
    return cut


def _first_clause(sentence: str, first_words: int) -> list[str]:
    """The sentence cut at its first clause boundary after `first_words` words, if any."""
    seen = ""
    for index, clause in enumerate(pieces := _pieces(sentence, _CLAUSE_END)):
        seen += clause
        if index + 1 < len(pieces) and words(seen) >= first_words:
            return [seen, "".join(pieces[index + 1:])]
    return [sentence]


def split(text: str, max_chars: int, first_words: int = 0, pack_chars: int = 0) -> list[str]:
    """The segments of `text`; `first_words` > 0 cuts the first one early (streamed jobs);
    consecutive short sentences share a segment up to `pack_chars` (each engine call has a
    cost of its own, and a segment still streams sentence by sentence).

    `"".join(split(text, ...)) == text` always holds.
    """
    if _MARKUP.search(text):
        return [text]
    sentences: list[str] = []
    for piece in _pieces(text, _SENTENCE_END):
        if sentences and _ABBREVIATION.search(sentences[-1]):
            sentences[-1] += piece
        else:
            sentences.append(piece)
    segments = [cut for sentence in sentences for cut in _cut_long(sentence, max_chars)]
    if first_words > 0 and segments:
        segments[:1] = _first_clause(segments[0], first_words)
    # A piece with no words (a stray quote, a trailing newline) rides with its neighbour.
    merged: list[str] = []
    for segment in segments:
        if merged and not (_SPEAKABLE.search(segment) and _SPEAKABLE.search(merged[-1])):
            merged[-1] += segment
        else:
            merged.append(segment)
    keep_first = 1 if first_words > 0 else 0  # the fast first segment stays short
    return merged[:keep_first] + _packed(merged[keep_first:], pack_chars)
