-- sync_ext 0.3.0 -> 0.4.0: performance under real load.
--
-- This file is also the last part of a fresh 0.4.0 install (after the 0.1.0 schema and the upgrades
-- since), so fresh and upgraded databases cannot differ.
--
-- Under Citus, ALTER EXTENSION sync_ext UPDATE on the coordinator runs this script on every node, so every
-- statement on a table that Citus may distribute goes through sync_ext.alter_sync_table: each node applies
-- it to its own copy of the table and to the table's shards it holds, and sends nothing to other nodes
-- (which would run it before their own copy of this script had created what it refers to).
CREATE FUNCTION sync_ext.alter_sync_table(tbl regclass, command text, rows_only boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET citus.enable_ddl_propagation = off AS $helper$
DECLARE
    shard record;
BEGIN
    -- %1$s is the relation, %2$s the suffix of its objects' names ('' for the table, '_<shard id>' for a shard).
    -- A command on rows (rows_only) skips a distributed table itself, which holds none.
    IF NOT rows_only OR to_regclass('pg_catalog.pg_dist_partition') IS NULL
       OR NOT EXISTS (SELECT FROM pg_dist_partition WHERE logicalrelid = tbl) THEN
        EXECUTE format(command, tbl, '');
    END IF;
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RETURN;
    END IF;
    FOR shard IN SELECT s.shardid FROM pg_dist_shard AS s JOIN pg_dist_placement AS p USING (shardid)
                  WHERE s.logicalrelid = tbl AND p.groupid = (SELECT groupid FROM pg_dist_local_group) LOOP
        EXECUTE format(command, shard_name(tbl, shard.shardid), '_' || shard.shardid);
    END LOOP;
END
$helper$;

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
