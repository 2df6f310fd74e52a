"""The caption tokenizer on multi-byte text: Vietnamese captions round-trip, and a caption cut at any token
(as the token limit cuts it) decodes to a clean prefix, never to a broken character."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from clipcap.tokenizer import INCOMPLETE, train_bpe

VIETNAMESE = ["một hình tròn màu đỏ.", "một hình vuông lớn màu xanh dương.", "hai con mèo đang ngủ trên ghế sô-pha.",
              "một con chó chạy trên bãi cỏ xanh.", "người đàn ông đội mũ bảo hiểm đi xe đạp.",
              "những chiếc thuyền nhỏ trên dòng sông."]
LETTERS = sorted(set("".join(VIETNAMESE)) - {" ", "."}) + list("ẫỹữựỡ€𝄞")  # plus 3- and 4-byte characters


@pytest.fixture(scope="module")
def vietnamese_tokenizer():
    return train_bpe(VIETNAMESE * 4, vocab_size=300)


def test_vietnamese_captions_round_trip_and_split_characters_across_tokens(vietnamese_tokenizer):
    for caption in VIETNAMESE:
        assert vietnamese_tokenizer.decode(vietnamese_tokenizer.encode(caption)) == caption
    # The property below is only worth something if some token prefix does end inside a character.
    ids = vietnamese_tokenizer.encode(VIETNAMESE[-1])
    assert any(vietnamese_tokenizer._tok.decode(ids[:k]).endswith(INCOMPLETE) for k in range(len(ids)))


@settings(max_examples=60, deadline=None)
@given(words=st.lists(st.text(alphabet=LETTERS, min_size=1, max_size=8), min_size=1, max_size=6),
       cut=st.floats(0, 1))
def test_a_caption_cut_at_any_token_is_a_clean_prefix(vietnamese_tokenizer, words, cut):
    text = " ".join(words) + "."
    ids = vietnamese_tokenizer.encode(text)
    assert vietnamese_tokenizer.decode(ids) == text
    prefix = vietnamese_tokenizer.decode(ids[:round(cut * len(ids))])
    assert INCOMPLETE not in prefix and text.startswith(prefix)
