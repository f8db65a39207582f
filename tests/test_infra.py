"""Running it: settings, the embedded server's data dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger.embedded import safe_data_dir
from ledger.settings import SettingsError, load_settings


def test_an_unknown_or_malformed_setting_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEDGER_PORTT", "8000")
    with pytest.raises(SettingsError, match="LEDGER_PORTT: unknown setting"):
        load_settings()
    monkeypatch.delenv("LEDGER_PORTT")
    monkeypatch.setenv("LEDGER_PORT", "99999")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).startswith("LEDGER_PORT:") and "\n" not in str(caught.value)
    monkeypatch.delenv("LEDGER_PORT")
    monkeypatch.setenv("LEDGER_INSECURE_NO_AUTH", "perhaps")
    with pytest.raises(SettingsError, match=r"LEDGER_INSECURE_NO_AUTH: .*bool"):
        load_settings()


def test_as_root_a_data_dir_under_root_moves_to_one_of_our_own() -> None:
    asked = Path("/root/clone/.ledger/pgdata")
    moved = safe_data_dir(asked, euid=0)
    assert not moved.is_relative_to("/root") and moved.name == "pgdata"
    assert safe_data_dir(asked, euid=0) == moved  # the same place every time
    assert safe_data_dir(Path("/root/other/.ledger/pgdata"), euid=0) != moved
    assert safe_data_dir(asked, euid=1000) == asked
    assert safe_data_dir(Path("/srv/ledger/pgdata"), euid=0) == Path("/srv/ledger/pgdata")


def test_waiting_for_another_embedded_start_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    from ledger import embedded, limits

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(limits, "embedded_start_wait_s", 0.3)
    with (tmp_path / "ledger-embedded-start.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process is starting one
        # flock locks belong to the open file: a second open in this process must wait too.
        with pytest.raises(embedded.EmbeddedError, match="over 0 s"):
            embedded.EmbeddedPostgres(tmp_path / "pgdata").start()
    assert not (tmp_path / "pgdata").exists()


def test_a_refused_grant_is_not_answered_as_retryable_but_a_read_only_primary_is() -> None:
    import psycopg

    from ledger import errors
    from ledger.postgres import translate

    refused = translate(psycopg.errors.InsufficientPrivilege("permission denied"))
    assert isinstance(refused, errors.Misconfigured) and refused.status == 500
    # An old primary after a failover is read-only until the client reaches the new one.
    moved = translate(psycopg.errors.ReadOnlySqlTransaction("read-only"))
    assert isinstance(moved, errors.Unavailable) and moved.status == 503
