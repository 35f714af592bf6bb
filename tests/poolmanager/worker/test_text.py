"""Unit tests of poolmanager.worker.text: StopMatcher and TextStream (pure)."""

from __future__ import annotations

import itertools

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from poolmanager.worker.text import StopMatcher, TextChunk, TextStream


def run(stops: list[str], chunks: list[str]) -> tuple[str, bool]:
    """Feeds chunks as the worker does (up to the first stop); returns (emitted, stopped)."""
    matcher = StopMatcher(stops)
    out = ""
    for chunk in chunks:
        out += matcher.push(chunk)
        if matcher.stopped:
            assert not matcher.holding
            return out, True
    return out + matcher.flush(), False


def test_no_stops_passes_everything_through() -> None:
    matcher = StopMatcher([])
    assert matcher.push("hello ") == "hello "
    assert matcher.push("wor") == "wor"
    assert not matcher.holding
    assert not matcher.stopped
    assert matcher.flush() == ""


def test_empty_stop_strings_are_ignored() -> None:
    matcher = StopMatcher(["", ""])
    assert matcher.push("abc") == "abc"
    assert not matcher.stopped


def test_text_without_any_stop_prefix_is_emitted_at_once() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.push("hello") == "hello"
    assert not matcher.holding


def test_stop_inside_one_chunk() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.push("abcENDdef") == "abc"
    assert matcher.stopped
    assert not matcher.holding
    assert matcher.flush() == ""


def test_stop_split_across_pushes() -> None:
    matcher = StopMatcher(["</stop>"])
    assert matcher.push("hello <") == "hello "
    assert matcher.holding
    assert matcher.push("/st") == ""
    assert matcher.holding
    assert not matcher.stopped
    assert matcher.push("op> more") == ""
    assert matcher.stopped
    assert not matcher.holding


def test_stop_at_the_very_start() -> None:
    matcher = StopMatcher(["ab"])
    assert matcher.push("a") == ""
    assert matcher.push("b") == ""
    assert matcher.stopped


def test_held_prefix_is_released_when_it_is_not_a_stop() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.push("xE") == "x"
    assert matcher.holding
    assert matcher.push("N") == ""
    assert matcher.push("d") == "ENd"
    assert not matcher.holding
    assert not matcher.stopped


def test_release_keeps_a_new_prefix_held() -> None:
    matcher = StopMatcher(["aab"])
    assert matcher.push("aa") == ""
    # "aaa" is not a stop yet, but its tail "aa" may still become one.
    assert matcher.push("a") == "a"
    assert matcher.holding
    assert matcher.push("b") == ""
    assert matcher.stopped


def test_flush_returns_held_text() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.push("abcEN") == "abc"
    assert matcher.flush() == "EN"
    assert not matcher.holding
    assert matcher.flush() == ""


def test_multiple_stops_first_occurrence_wins() -> None:
    matcher = StopMatcher(["STOP", "###"])
    assert matcher.push("one ## two ###three STOP") == "one ## two "
    assert matcher.stopped


def test_multiple_stops_hold_the_longest_possible_prefix() -> None:
    matcher = StopMatcher(["\n\n", "User:"])
    assert matcher.push("hi Us") == "hi "
    assert matcher.push("e") == ""
    assert matcher.push("\n") == "Use"
    assert matcher.holding
    assert matcher.push("\n") == ""
    assert matcher.stopped


def test_multiple_stops_split_across_pushes() -> None:
    matcher = StopMatcher(["<|end|>", "<|eot|>"])
    assert matcher.push("done<|e") == "done"
    assert matcher.push("ot") == ""
    assert not matcher.stopped
    assert matcher.push("|>tail") == ""
    assert matcher.stopped


def test_multibyte_stop() -> None:
    matcher = StopMatcher(["→"])
    assert matcher.push("a→b") == "a"
    assert matcher.stopped


def test_nested_stops_give_the_same_output_whatever_the_chunking() -> None:
    stops = ["abcd", "c"]
    assert run(stops, ["abcd"]) == run(stops, ["a", "b", "c", "d"])


# --- properties -----------------------------------------------------------------------------

ALPHABET = "ab\n"


@st.composite
def chunked(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = draw(st.text(alphabet=ALPHABET, max_size=40))
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return text, [text[i:j] for i, j in itertools.pairwise(bounds)]


@settings(max_examples=500, deadline=None)
@given(chunked(), st.text(alphabet=ALPHABET, min_size=1, max_size=5))
def test_emitted_text_is_the_text_up_to_the_first_stop(
    text_chunks: tuple[str, list[str]], stop: str
) -> None:
    text, chunks = text_chunks
    out, stopped = run([stop], chunks)
    cut = text.find(stop)
    assert stopped is (cut >= 0)
    assert out == (text[:cut] if cut >= 0 else text)


@settings(max_examples=300, deadline=None)
@given(chunked(), st.text(alphabet=ALPHABET, min_size=1, max_size=5))
def test_held_text_is_bounded_and_holding_is_accurate(
    text_chunks: tuple[str, list[str]], stop: str
) -> None:
    _, chunks = text_chunks
    matcher = StopMatcher([stop])
    pushed = emitted = ""
    for chunk in chunks:
        pushed += chunk
        emitted += matcher.push(chunk)
        if matcher.stopped:
            break
        assert pushed.startswith(emitted)
        held = pushed[len(emitted) :]
        # Only a proper prefix of the stop is ever held back.
        assert len(held) < len(stop)
        assert stop.startswith(held)
        assert matcher.holding is bool(held)


@settings(max_examples=300, deadline=None)
@given(
    chunked(),
    st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_multiple_stops_cut_at_the_earliest_occurrence(
    text_chunks: tuple[str, list[str]], stops: list[str]
) -> None:
    # With no stop inside another, the earliest start and the earliest completion coincide.
    assume(not any(a != b and a in b for a in stops for b in stops))
    text, chunks = text_chunks
    out, stopped = run(stops, chunks)
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert stopped is bool(cuts)
    assert out == (text[: min(cuts)] if cuts else text)


# --- TextStream: tokens to text, per sequence ------------------------------------------------


def feed(stream: TextStream, pieces: list[bytes], first_id: int = 100) -> list[TextChunk]:
    chunks = []
    for i, piece in enumerate(pieces):
        chunk = stream.push(first_id + i, piece)
        if chunk is not None:
            chunks.append(chunk)
        if stream.stopped:
            return chunks
    last = stream.finish()
    return [*chunks, last] if last is not None else chunks


def test_a_character_split_across_tokens_travels_with_the_token_that_completes_it() -> None:
    euro = "€".encode()  # three bytes, one token each
    chunks = feed(TextStream([]), [b" a", euro[:1], euro[1:2], euro[2:], b" b"])
    assert [(c.index, c.ids, c.text) for c in chunks] == [
        (0, (100,), " a"),
        (1, (101, 102, 103), "€"),
        (4, (104,), " b"),
    ]


def test_interleaved_streams_keep_their_own_partial_characters_and_stops() -> None:
    # Two sequences decoded in the same steps: each holds its own half character and its own
    # partial stop sequence.
    one, two = TextStream(["END"]), TextStream([])
    check, ok = "✓".encode(), "é".encode()
    pieces_one = [b"x", check[:1], check[1:2], check[2:], b" E", b"N", b"D", b" z"]
    pieces_two = [ok[:1], ok[1:], b" E", b"ND", b" y", b"!", b"?", b"."]
    out: dict[int, list[TextChunk]] = {1: [], 2: []}
    for step, (p1, p2) in enumerate(zip(pieces_one, pieces_two, strict=True)):
        for n, stream, piece in ((1, one, p1), (2, two, p2)):
            if not stream.stopped:
                chunk = stream.push(step, piece)
                if chunk is not None:
                    out[n].append(chunk)
    tail = two.finish()
    assert tail is None  # nothing was held back: two has no stops
    assert one.stopped and not two.stopped
    assert "".join(c.text for c in out[1]) == "x✓ "
    assert "".join(c.text for c in out[2]) == "é END y!?."
    # one's ✓ went out once, with the three tokens that make it.
    assert [c.ids for c in out[1]][:2] == [(0,), (1, 2, 3)]


def test_a_stop_sequence_ends_the_stream_and_its_tokens_count() -> None:
    stream = TextStream(["stop"])
    chunks = feed(stream, [b" go", b" st", b"op", b" never"])
    assert stream.stopped
    assert "".join(c.text for c in chunks) == " go "
    assert sum(len(c.ids) for c in chunks) == stream.sent == 3


def test_an_incomplete_character_at_the_end_is_replaced() -> None:
    chunks = feed(TextStream([]), [b"ok", "€".encode()[:2]])
    assert "".join(c.text for c in chunks) == "ok\ufffd"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30), st.lists(st.integers(1, 4), max_size=40))
def test_any_split_of_the_bytes_gives_the_text_decoded_whole(text: str, cuts: list[int]) -> None:
    data = text.encode()
    pieces, at = [], 0
    for n in cuts:
        if at >= len(data):
            break
        pieces.append(data[at : at + n])
        at += n
    if at < len(data):
        pieces.append(data[at:])
    chunks = feed(TextStream([]), pieces)
    assert "".join(c.text for c in chunks) == text
    assert [i for c in chunks for i in c.ids] == list(range(100, 100 + len(pieces)))
