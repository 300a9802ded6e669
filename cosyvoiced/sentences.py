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
from bisect import bisect_left, bisect_right
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
        self._restart()

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
        self._restart()
        return [rest[start:end] for start, end in sentence_spans(rest, rules=rules)] \
            if rest else []

    def _split_off(self, cuts: list[int]) -> list[str]:
        text, at = self._text, 0
        ready = []
        for cut in cuts:
            sentence = text[at:cut]
            ready.append(sentence)
            # Does what follows `cut` start a line? From this sentence alone, not the whole
            # prefix (copied once a cut, that was quadratic: 19,990 cuts took 134 ms).
            said = sentence.rstrip(" \t")
            if said or at == 0:
                self._line_start = said.endswith("\n")
            at = cut
        self._text = text[at:]
        if cuts:
            self._restart()
        return ready

    def _restart(self) -> None:
        """What is pending is new text (not what was pending with more after it): what
        earlier feeds found out about it no longer holds."""
        self._rules = _GrowingRules(self._line_start)
        self._open = _OpenCount()
        self._scan_from = 0  # sentence ends before this are known not to be ends

    def _cuts(self, reach: int | None = None) -> list[int]:
        """The sentence ends in what is pending (its first `reach` characters) that are
        known to be ends, in order. Past `reach` is as if it had not come yet: cut after
        cut through a long text, each look stays short. Without `reach`, the look starts
        where the last one left off (`_scan_from`): a stream fed a character at a time is
        looked at a character at a time, not all over again each time."""
        if reach is not None:
            text = self._text[:reach]
            rules = CutRules(text, line_start=self._line_start)
            cuts, _, whole = self._ends_in(text, 0, rules)
            if whole and len(text) == len(self._text) \
                    and _ends_now(text, cuts[-1] if cuts else 0):
                cuts.append(len(text))
            return cuts
        text = self._text
        self._rules.grow(text)
        cuts, settled, whole = self._ends_in(text, self._scan_from, self._rules)
        if whole and (_ends_now(text, cuts[-1]) if cuts else self._ends_now(text)):
            cuts.append(len(text))
        self._scan_from = max(self._scan_from, settled)
        return cuts

    @staticmethod
    def _ends_in(text: str, scan_from: int, rules: CutRules) -> tuple[list[int], int, bool]:
        """The sentence ends known to be ends, from `scan_from` on; where a later look (at
        this text with more after it) may start: after the last of the ends found not to
        be ones that no text to come can change; and whether no tag that may have begun
        after an end is still coming (then the text's own end may be one too)."""
        cuts: list[int] = []
        settled, held, unmatched = scan_from, False, len(text)
        for match in SENTENCE_END.finditer(text, scan_from):
            end = match.end()
            if end >= len(text):
                unmatched = match.start()
                break  # what follows decides; it has not come yet
            if _tag_incomplete(text, end):
                return cuts, settled, False  # the tag decides; it has not come whole
            start = cuts[-1] if cuts else 0
            if end > start and not _blank(text, start, end) and rules.ends_sentence(match):
                cuts.append(end)  # (whitespace left by a sentence handed out at once waits)
            elif not held and (end <= len(text) - _DECIDED or rules.may_cut(end)):
                settled = end  # but for a tag's marks, `ends_sentence` reads text up to `end`
            else:
                held = True  # a tag still coming may unmark this one
        if not held:  # and no match between `settled` and `unmatched`
            settled = _quiet_restart(text, settled, unmatched)
        return cuts, settled, True

    def _ends_now(self, text: str) -> bool:
        """`_ends_now(text, 0)`, with what earlier feeds found out about `text`."""
        body_end = _stripped_length(text)
        return body_end > 0 and certain_stop(text, body_end - 1) \
            and not (_left_open(text[:body_end]) if body_end < _SHORT
                     else self._open.left_open(text, body_end)) \
            and self._rules.may_cut(len(text))

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


# -- What a stream's later feeds need not look at again -------------------------------------
# A sentence end this far before the end of what has come is decided for good, whatever comes
# after it: one try of TAG or PAUSE looks at under 80 characters. (A `_tag_incomplete` that
# is False stays so, and the rest of `ends_sentence` reads no further than the end.)
_DECIDED = 128
_SHORT = 200  # a sentence shorter than this is quicker counted whole than kept track of
_NON_SPACE = re.compile(r"\S")
_TRY_START = re.compile(r"[<\[]")  # what every match of TAG or PAUSE starts with
# Characters that a SENTENCE_END match may hold, or look behind at: none runs across others.
_MAY_END = frozenset(_CLOSERS + ".!?\u2026" + _CJK_STOPS + _CJK_CLOSERS)


def _blank(text: str, start: int, end: int) -> bool:
    """`text[start:end].isspace()` (for start < end), without copying a long pending text:
    regex's \\s is exactly str.isspace."""
    return _NON_SPACE.search(text, start, end) is None


def _stripped_length(text: str) -> int:
    """len(text.rstrip()), looking only at the end of `text` unless it is all whitespace."""
    tail = max(0, len(text) - 64)
    kept = text[tail:].rstrip()
    return tail + len(kept) if kept or not tail else len(text.rstrip())


def _quiet_restart(text: str, low: int, high: int) -> int:
    """The last place up to `high` (no further back than `low`, nor far) after a character
    that no SENTENCE_END match holds or runs across (a letter, say): a look that starts there
    finds what one from the start would, where none was found between `low` and `high`."""
    for place in range(high, max(low, high - 16), -1):
        if not text[place - 1].isspace() and text[place - 1] not in _MAY_END:
            return place
    return low


class _Found:
    """What `pattern.finditer` finds in a text that only grows, looking only at the new text
    and the `reach` characters before it (the most that one try of `pattern` looks at): a
    try that ended more than `reach` before the end of the text is the same with more."""

    def __init__(self, pattern: re.Pattern[str], reach: int) -> None:
        self.pattern = pattern
        self.reach = reach
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.closing: list[bool] = []
        self._from = 0  # where a full finditer tries next, all its tries before it final

    def grow(self, text: str) -> None:
        keep = bisect_left(self.starts, self._from)
        del self.starts[keep:], self.ends[keep:], self.closing[keep:]
        for match in self.pattern.finditer(text, self._from):
            self.starts.append(match.start())
            self.ends.append(match.end())
            self.closing.append(bool(match.groupdict().get("closing")))
        limit = len(text) - self.reach
        if limit > self._from:
            last = bisect_left(self.starts, limit) - 1  # a match across `limit` is tried again
            if last >= 0 and self.ends[last] > limit:
                self._from = self.starts[last]
                return
        # A try that starts with another character than these fails at once, for good.
        opening = _TRY_START.search(text, max(self._from, limit))
        self._from = opening.start() if opening else len(text)

    def inside(self, position: int) -> bool:
        """Whether a match holds `position` and the character before it."""
        last = bisect_left(self.starts, position) - 1
        return last >= 0 and self.ends[last] > position


class _GrowingRules(CutRules):
    """`CutRules` of a stream's pending text, which only grows between cuts: the tags and
    pauses found so far are kept, and a place is looked up when asked about, not marked
    ahead for the whole text on every feed."""

    def __init__(self, line_start: bool) -> None:  # no CutRules.__init__: no marks ahead
        self.text = ""
        self.line_start = line_start
        self._tags = _Found(TAG, 32)
        self._pauses = _Found(pauses.PAUSE, 80)

    def grow(self, text: str) -> None:
        self.text = text
        self._tags.grow(text)
        self._pauses.grow(text)

    def may_cut(self, position: int) -> bool:
        return self.may_force(position) and not self._parts_tag(position)

    def may_force(self, position: int) -> bool:
        return not (self._tags.inside(position) or self._pauses.inside(position))

    def _parts_tag(self, position: int) -> bool:
        """CutRules.parts_tag[position]: only the nearest tag on either side can mark it
        (a tag's mark runs across whitespace only, and a tag is not whitespace)."""
        tags, text = self._tags, self.text
        after = bisect_left(tags.starts, position)
        if after < len(tags.starts) and tags.closing[after] and (
                position == tags.starts[after] or _blank(text, position, tags.starts[after])):
            return True
        before = bisect_right(tags.ends, position) - 1
        return before >= 0 and not tags.closing[before] \
            and start_of_word_after(text, tags.ends[before]) >= position


_OPEN_CHARS = '"' + "".join(_PAIRS)
_OPEN_PATTERNS = (_SINGLE_OPENING, _SINGLE_CLOSING, _OPENING_TAG, _CLOSING_TAG)
_OPEN_REACH = 24  # the most characters one try of those patterns looks at


class _OpenCount:
    """`_left_open` of the start of a text that only grows, counting what is new only."""

    def __init__(self) -> None:
        self._upto = 0  # counted before this, for good
        self._chars = dict.fromkeys(_OPEN_CHARS, 0)
        self._found = [0] * len(_OPEN_PATTERNS)

    def left_open(self, text: str, end: int) -> bool:
        """`_left_open(text[:end])`; `end` never less than the last time."""
        upto, final = self._upto, max(self._upto, end - _OPEN_REACH)
        chars = {char: count + text.count(char, upto, end)
                 for char, count in self._chars.items()}
        found = []
        for index, pattern in enumerate(_OPEN_PATTERNS):
            starts = [match.start() for match in pattern.finditer(text, upto, end)]
            found.append(self._found[index] + len(starts))
            self._found[index] += sum(1 for start in starts if start < final)
        for char in self._chars:
            self._chars[char] += text.count(char, upto, final)
        self._upto = final
        return chars['"'] % 2 == 1 \
            or any(chars[pair[0]] > chars[pair[1]] for pair in _PAIRS) \
            or found[0] > found[1] or found[2] > found[3]
