-- sync_ext 0.3.0 -> 0.4.0: performance under real load.
--
-- This file is also the last part of a fresh 0.4.0 install (after the 0.1.0 schema and the upgrades
-- since), so fresh and upgraded databases cannot differ.
--
-- Under Citus, ALTER EXTENSION sync_ext UPDATE on the coordinator runs this script on every node; every
-- statement on a sync table goes through sync_ext.alter_sync_table, which applies it to this node's copy of
-- the table and the table's shards here (see alter_sync_table in src/citus.rs).
CREATE FUNCTION sync_ext.alter_sync_table(tbl regclass, command text, rows_only boolean DEFAULT false) RETURNS void
    STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'alter_sync_table_wrapper';

-- Tenants whose new changes listeners have not heard of yet. A push adds its tenant here instead of
-- sending NOTIFY in its own transaction (which would serialize commits across tenants); the database's
-- notifier (a background worker) sends one NOTIFY per tenant for all of them and deletes them.
-- Unlogged: a crash loses only wake-ups, which listeners' polls cover.
CREATE UNLOGGED TABLE sync_ext.wakeups (tenant_id text NOT NULL);
COMMENT ON TABLE sync_ext.wakeups IS
    'Pending wake-ups of listeners, sent by the sync_ext notifier (a background worker) as NOTIFY sync_ext.';
REVOKE ALL ON sync_ext.wakeups FROM PUBLIC;

-- Backends keep model descriptions between pushes; a change of the registered models tells them to read
-- them again (as changes of grants and settings do).
SELECT sync_ext.alter_sync_table('sync_ext.models', $ddl$CREATE TRIGGER access_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %1$s
    FOR EACH STATEMENT EXECUTE FUNCTION sync_ext.access_changed()$ddl$);

-- The seq index of the snapshots (reset pages in seq order) under the "C" collation, so that no lookup of
-- a row by its key (`tenant_id = $1 AND model = ... AND id = ...`, default collation) can use it: a kept
-- generic plan made while the table was nearly empty could not tell it from the primary key and scanned
-- the tenant's whole range with it. Reset pages name it with `tenant_id COLLATE "C" = $1`.
SELECT sync_ext.alter_sync_table('sync_ext.snapshots', $ddl$DROP INDEX sync_ext.snapshots_by_seq%2$s$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.snapshots', $ddl$CREATE INDEX snapshots_by_seq%2$s ON %1$s (tenant_id COLLATE "C", seq)$ddl$);

DROP FUNCTION sync_ext.alter_sync_table(regclass, text, boolean);
