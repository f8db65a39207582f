"""Amounts and assets: exact integers from strict text, never a float."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger import errors, limits
from ledger.money import Asset, parse_amount, parse_asset


@given(st.integers(min_value=1, max_value=limits.amount_max))
def test_any_amount_of_up_to_38_digits_round_trips_through_its_text(amount: int) -> None:
    assert parse_amount(str(amount)) == amount
    assert parse_amount(amount) == amount


@pytest.mark.parametrize(
    "bad",
    [
        "0",
        "-5",
        "+5",
        "1.5",
        "1e3",
        "1_000",
        " 12",
        "12 ",
        "0012",
        "",
        "\u0661\u0662",
        "\uff11\uff12",
        "9" * 39,
        0,
        -1,
        10**38,
        1.5,
        2.0,
        True,
        False,
        None,
        [],
        {},
        "NaN",
        "Infinity",
    ],
)
def test_anything_but_positive_ascii_digits_is_an_invalid_amount(bad: object) -> None:
    with pytest.raises(errors.InvalidAmount):
        parse_amount(bad)


def test_the_largest_amount_has_38_nines() -> None:
    assert parse_amount("9" * 38) == limits.amount_max


def test_assets_are_code_slash_scale() -> None:
    assert parse_asset("USD/2") == Asset("USD", 2)
    assert parse_asset("ETH/18") == Asset("ETH", 18)
    assert str(parse_asset("BTC/8")) == "BTC/8"


@pytest.mark.parametrize(
    "bad",
    [
        "usd/2",
        "USD",
        "USD/",
        "USD/39",
        "USD/-1",
        "/2",
        "U SD/2",
        "USD/2 ",
        "ABCDEFGHIJKLMNOPQ/2",
        5,
        None,
    ],
)
def test_malformed_assets_are_refused(bad: object) -> None:
    with pytest.raises(errors.InvalidAsset):
        parse_asset(bad)
