-- Least privilege (docs/security.md, ADR 0011): the server logs in as ledger_app, reporting and
-- audit as ledger_reader; only `ledger migrate` runs as the owner of the schema (this file's
-- CURRENT_USER). Grants first, triggers second: ledger_app holds no UPDATE, DELETE or TRUNCATE
-- on the history tables, is neither the owner nor a member of it, and cannot create objects, so
-- it can neither change history nor switch off the triggers that also refuse it.
--
-- Roles belong to the whole cluster: if they exist already (a superuser created them, with
-- their passwords, before the owner ran this), they are checked and not recreated. Passwords are
-- never set here: see docs/operations.md ("Database roles").

DO $$
DECLARE
    name text;
    r pg_roles%ROWTYPE;
BEGIN
    FOREACH name IN ARRAY ARRAY['ledger_app', 'ledger_reader'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I LOGIN', name);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another database of this cluster was migrated at the same moment
            END;
        END IF;
        SELECT * INTO r FROM pg_roles WHERE rolname = name;
        IF NOT r.rolcanlogin THEN
            EXECUTE format('ALTER ROLE %I LOGIN', name);  -- schema.sql made ledger_app NOLOGIN
        END IF;
        IF r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls THEN
            EXECUTE format(
                'ALTER ROLE %I NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION NOBYPASSRLS', name);
        END IF;
        -- A member of the owner could SET ROLE to it and then do anything the owner can.
        IF pg_has_role(name, CURRENT_USER, 'MEMBER') THEN
            RAISE EXCEPTION 'role % is a member of the schema owner %: revoke that first',
                name, CURRENT_USER USING ERRCODE = 'insufficient_privilege';
        END IF;
    END LOOP;
END
$$;

-- A reader never writes, even where a grant was given by mistake.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
                   WHERE r.rolname = 'ledger_reader' AND s.setdatabase = 0
                     AND 'default_transaction_read_only=on' = ANY (s.setconfig)) THEN
        ALTER ROLE ledger_reader SET default_transaction_read_only = on;
    END IF;
END
$$;

-- No object of their own: CREATE on the schema was PUBLIC's before Postgres 15 (a database
-- upgraded from then keeps it), and TEMP is PUBLIC's by default (a temporary table named
-- `events` would shadow the real one in that session). Only the owner of the schema, and of the
-- database, may revoke them; a database shared with other applications keeps its TEMP.
DO $$
BEGIN
    IF has_schema_privilege('public', 'public', 'CREATE')
       AND pg_has_role((SELECT nspowner FROM pg_namespace WHERE nspname = 'public'), 'USAGE') THEN
        REVOKE CREATE ON SCHEMA public FROM PUBLIC;
    END IF;
    IF has_database_privilege('public', current_database(), 'TEMP')
       AND pg_has_role((SELECT datdba FROM pg_database WHERE datname = current_database()), 'USAGE')
    THEN
        EXECUTE format('REVOKE TEMP ON DATABASE %I FROM PUBLIC', current_database());
    END IF;
END
$$;

-- The application: what schema.sql and 0002 granted to ledger_app (appends to history, updates
-- of the mutable tables, api_keys), plus knowing which schema version it runs on.
GRANT SELECT ON schema_migrations TO ledger_app;

-- The reader: SELECT on the ledger's tables, nothing else (not api_keys: hashes of secrets).
GRANT USAGE ON SCHEMA public TO ledger_reader;
GRANT SELECT ON ledgers, events, assets, accounts, balances, transfers, transfer_status, entries,
    checkpoints, tracking, position_accounts, position_holds, positions, schema_migrations
    TO ledger_reader;
