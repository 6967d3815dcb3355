"""Stop strings over text that arrives in pieces (moepic/serve/stops.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from moepic.serve.stops import StopText

_TEXT = st.text(alphabet="ab c\n", max_size=40)


def expected(text: str, stops: list[str]) -> str:
    """OpenAI's rule: the text before the earliest occurrence of any stop string."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(found)] if found else text


@given(text=_TEXT, stops=st.lists(st.text(alphabet="ab c\n", min_size=0, max_size=4), max_size=4), cuts=st.lists(st.integers(0, 40)))
def test_pieces_shown_add_up_to_the_text_before_the_first_stop_however_the_text_is_cut(text, stops, cuts):
    pieces = [text[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(text)])]
    stop_text, shown = StopText(stops), ""
    for piece in pieces:
        shown += stop_text.push(piece)
        assert expected(text, stops).startswith(shown)  # never shows what a stop string later removes
    shown += stop_text.flush()
    assert shown == expected(text, stops)
    assert stop_text.stopped == any(s and s in text for s in stops)


def test_text_that_may_begin_a_stop_string_is_held_back_until_the_next_piece_settles_it():
    stop_text = StopText(["\n\n"])
    assert stop_text.push("Amen.\n") == "Amen."
    assert stop_text.push("And") == "\nAnd"
    assert stop_text.push("\n") == ""
    assert stop_text.push("\nmore") == ""
    assert stop_text.stopped and stop_text.flush() == ""
