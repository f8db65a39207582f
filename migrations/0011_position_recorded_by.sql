-- The last position of a ledger recorded at or before a time (0 before its first event, and
-- for a ledger that does not exist): every read "as of a recorded time" starts here
-- (ledger/queries/ledgers.py, POSITION_AT; docs/performance.md, "The position recorded by a
-- time"). A binary search over positions 1..head on events_pkey, about 20 probes for 10^6
-- events, valid because a ledger's recorded times never decrease with position: the writer
-- records no event before its ledger's head_recorded_at (ledger/log.py) and `ledger import`
-- refuses an export whose times go back (ledger/importer.py); the database does not check it.
-- The query it replaces, max(position) ... WHERE recorded_at <= t on the BRIN index, walked
-- back from the head over every event recorded after t.
--
-- PL/pgSQL, so that its statements are planned once per session, not with every read; STABLE,
-- so that it reads in its caller's snapshot (head and events as the calling statement sees
-- them); SECURITY INVOKER (the default), so it reads only what the caller may read. Its
-- search_path is pinned to the schema it is created in, with pg_temp last, so that no
-- temporary table can stand in for ledgers or events.
CREATE FUNCTION position_recorded_by(ledger bigint, at timestamptz) RETURNS bigint
    LANGUAGE plpgsql STABLE STRICT AS $$
DECLARE
    lo bigint := 0;
    hi bigint;
    mid bigint;
    recorded timestamptz;
BEGIN
    SELECT head_position INTO hi FROM ledgers WHERE id = ledger;
    IF hi IS NULL THEN  -- no such ledger
        RETURN 0;
    END IF;
    SELECT recorded_at INTO recorded FROM events WHERE ledger_id = ledger AND position = hi;
    IF recorded <= at THEN  -- the common case: as of now, or after the last event
        RETURN hi;
    END IF;
    -- Invariant: position lo is recorded at or before at (0: before the first event), every
    -- position after hi is recorded after it.
    WHILE lo < hi LOOP
        mid := (lo + hi + 1) / 2;
        SELECT recorded_at INTO recorded FROM events WHERE ledger_id = ledger AND position = mid;
        IF recorded <= at THEN
            lo := mid;
        ELSE
            hi := mid - 1;
        END IF;
    END LOOP;
    RETURN lo;
END
$$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION position_recorded_by(bigint, timestamptz)'
                   ' SET search_path = %I, pg_temp', current_schema());
END
$$;

REVOKE ALL ON FUNCTION position_recorded_by(bigint, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION position_recorded_by(bigint, timestamptz) TO ledger_app, ledger_reader;
