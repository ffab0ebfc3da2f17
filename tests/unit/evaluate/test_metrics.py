"""Reply metrics on hand-made cases: LCS / ROUGE-L, repetition, stop rate, their summary."""

from __future__ import annotations

import random

import pytest

from chatlora.evaluate.metrics import lcs_length, repetition, reply_stats, rouge_l, rouge_l_chars, stop_rate


def lcs_table(a, b) -> int:
    """The textbook dynamic programme, to check the bit-parallel version against."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev, row = row, [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
    return row[-1]


@pytest.mark.parametrize("a, b, expected", [
    ("", "", 0), ("abc", "", 0), ("abc", "abc", 3), ("abcbdab", "bdcaba", 4), ("abc", "xyz", 0),
    ("我爱北京天安门", "我爱上海", 2), ("aaaa", "aa", 2),
])
def test_lcs_length(a, b, expected):
    assert lcs_length(a, b) == expected == lcs_table(a, b)


def test_lcs_length_matches_the_table_on_random_strings():
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 80)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 80)))
        assert lcs_length(a, b) == lcs_table(a, b), (a, b)


def test_rouge_l():
    assert rouge_l("abcd", "abcd") == 1.0
    assert rouge_l("abcd", "wxyz") == 0.0
    assert rouge_l("", "abc") == 0.0
    assert rouge_l("abcd", "abxd") == pytest.approx(0.75)  # LCS 3: P = R = 3/4
    # LCS "ab" = 2: precision 2/2, recall 2/8, F1 = 2 * 1 * 0.25 / 1.25 = 0.4
    assert rouge_l("ab", "abcdefgh") == pytest.approx(0.4)
    assert rouge_l([1, 2, 3], [3, 2, 1]) == pytest.approx(1 / 3)  # works on token ids too


def test_rouge_l_chars_suits_chinese_and_ignores_whitespace():
    assert rouge_l_chars("我爱北京", "我爱上海") == pytest.approx(0.5)
    assert rouge_l_chars("臣妾做不到啊", "臣妾做不到啊！") == pytest.approx(2 * 1 * (6 / 7) / (1 + 6 / 7))
    assert rouge_l_chars("a b\nc", "abc") == 1.0
    assert rouge_l_chars("   ", "abc") == 0.0


def test_repetition():
    assert repetition([1, 2, 3, 4, 5, 6]) == 0.0
    # 4-grams 1234 2341 3412 4123 1234: one of five repeats an earlier one
    assert repetition([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(0.2)
    assert repetition([7] * 10) == pytest.approx(1 - 1 / 7)  # seven identical 4-grams
    assert repetition([1, 2, 3]) == 0.0  # shorter than n: no n-grams
    assert repetition("abab", n=2) == pytest.approx(1 / 3)  # ab ba ab


def test_stop_rate():
    assert stop_rate([True, False, True, True]) == 0.75
    assert stop_rate([False, False]) == 0.0
    assert stop_rate([]) == 0.0


def test_reply_stats():
    stats = reply_stats([[1, 2, 3, 4, 1, 2, 3, 4], [5, 6]], [True, False], ["abcd", "xyz"], ["abxd", "xyz"])
    assert stats.count == 2 and stats.stop_rate == 0.5
    assert stats.mean_tokens == 5.0
    assert stats.repetition == pytest.approx(0.1)  # (0.2 + 0.0) / 2
    assert stats.rouge_l == pytest.approx((0.75 + 1.0) / 2)
    assert stats.line() == "stop rate 50% (1/2), mean length 5.0 tokens, repetition 0.100, ROUGE-L 0.875"
    assert reply_stats([[1]], [True]).rouge_l is None
    with pytest.raises(ValueError):
        reply_stats([[1]], [True], ["a"], ["a", "b"])
