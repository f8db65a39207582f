"""Assets and exact amounts.

An amount is a Python ``int`` in an asset's minor units (cents, satoshi, wei). On the wire it is
a string of ASCII digits; a plain JSON integer is accepted too. Nothing here ever builds a float.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from ledger import errors, limits

_DIGITS = re.compile(rf"[1-9][0-9]{{0,{limits.amount_digits_max - 1}}}", re.ASCII)
_ASSET = re.compile(rf"([A-Z][A-Z0-9]{{0,{limits.asset_code_length_max - 1}}})/([0-9]{{1,2}})")


def parse_amount(value: Any) -> int:
    """A strictly positive amount from a JSON value: digits only, no sign, no leading zero.

    ``bool`` is refused even though it is an ``int`` in Python, and so are floats, decimals,
    exponents, underscores, spaces and non-ASCII digits.
    """
    if isinstance(value, bool):
        raise errors.InvalidAmount(f"amount must be a string of digits, not {value!r}")
    if isinstance(value, int):
        if 0 < value <= limits.amount_max:
            return value
        raise errors.InvalidAmount(
            f"amount must be between 1 and {limits.amount_digits_max} digits of 9, got {value}"
        )
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return int(value)
    raise errors.InvalidAmount(
        f"amount must be a string of 1 to {limits.amount_digits_max} ASCII digits "
        f"without sign or leading zero, got {_show(value)}"
    )


@dataclass(frozen=True, slots=True)
class Asset:
    """An asset: a code and the number of decimal places of its minor unit."""

    code: str
    scale: int

    def __str__(self) -> str:
        return f"{self.code}/{self.scale}"


def parse_asset(value: Any) -> Asset:
    """``"USD/2"`` → ``Asset("USD", 2)``."""
    if isinstance(value, str):
        asset = _asset_of(value)
        if asset is not None:
            return asset
    raise errors.InvalidAsset(
        f"asset must be CODE/SCALE (code of 1 to {limits.asset_code_length_max} capitals or "
        f"digits, scale 0 to {limits.asset_scale_max}), got {_show(value)}"
    )


@functools.lru_cache(maxsize=1024)
def _asset_of(text: str) -> Asset | None:
    """Memoised: a ledger has few assets, and every posting names one."""
    match = _ASSET.fullmatch(text)
    if match and int(match.group(2)) <= limits.asset_scale_max:
        return Asset(match.group(1), int(match.group(2)))
    return None


DEFAULT_ASSETS: tuple[Asset, ...] = tuple(
    parse_asset(a)
    for a in (
        "USD/2",
        "EUR/2",
        "GBP/2",
        "CHF/2",
        "JPY/0",
        "CAD/2",
        "AUD/2",
        "CNY/2",
        "INR/2",
        "BRL/2",
        "MXN/2",
        "SEK/2",
        "NOK/2",
        "DKK/2",
        "PLN/2",
        "SGD/2",
        "HKD/2",
        "KWD/3",
        "BTC/8",
        "ETH/18",
        "USDC/6",
        "USDT/6",
    )
)
"""Assets a new ledger defines when its creator names none."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
