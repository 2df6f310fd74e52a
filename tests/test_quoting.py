"""clipcap.quoting: what a message shows of a client's value is short, escaped and says the size."""
from hypothesis import given, settings
from hypothesis import strategies as st

from clipcap.quoting import QUOTE_CHARS, QUOTE_NAMES, quote, quote_names

# repr escapes a character into at most 10 ('\U0010ffff'); the size note adds a few dozen more.
LONGEST = 10 * QUOTE_CHARS + 40
VALUES = (st.text() | st.binary() | st.integers() | st.floats() | st.booleans() | st.none()
          | st.lists(st.integers()) | st.dictionaries(st.text(), st.integers()))


@settings(max_examples=50)
@given(VALUES)
def test_quote_is_short_and_one_line(value):
    shown = quote(value)
    assert len(shown) <= LONGEST and "\n" not in shown and "\r" not in shown


@given(st.text(min_size=QUOTE_CHARS + 1) | st.binary(min_size=QUOTE_CHARS + 1))
def test_long_values_show_a_prefix_and_their_size(value):
    shown = quote(value)
    assert shown.startswith(repr(value[:QUOTE_CHARS]) if isinstance(value, str) else repr(value[:QUOTE_CHARS]))
    assert f"({len(value)} {'characters' if isinstance(value, str) else 'bytes'})" in shown


def test_short_values_and_containers():
    assert quote("beam") == "'beam'" and quote(3) == "3" and quote(None) == "None" and quote(float("nan")) == "nan"
    assert quote("line\nbreak") == "'line\\nbreak'"
    assert quote(list(range(1_000_000))) == "a JSON array of 1000000 items"
    assert quote({"a": 1}) == "a JSON object of 1 key"
    assert quote(9 ** 4000) == f"an integer of {(9 ** 4000).bit_length()} bits"


@given(st.lists(st.text(), max_size=50))
def test_quote_names_shows_a_few_and_the_count(names):
    shown = quote_names(names)
    assert len(shown) <= QUOTE_NAMES * (LONGEST + 2) + 30
    assert (f"({len(names)} in all)" in shown) == (len(names) > QUOTE_NAMES)


def test_quote_names_shows_exactly_the_first_few():
    names = [chr(ord("a") + i) for i in range(26)]
    assert quote_names(names) == "'a', 'b', 'c', 'd', 'e', ... (26 in all)"
    assert QUOTE_NAMES == 5 and quote_names(names[:5]) == "'a', 'b', 'c', 'd', 'e'"
    assert quote_names(names[:6]) == "'a', 'b', 'c', 'd', 'e', ... (6 in all)"
