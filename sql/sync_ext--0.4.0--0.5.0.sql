-- sync_ext 0.4.0 -> 0.5.0: scale-out on Citus, sync tables distributed by tenant.
--
-- This file is also the last part of a fresh 0.5.0 install (after the 0.1.0 schema and the upgrades
-- since), so fresh and upgraded databases cannot differ. Every statement here also runs on a database
-- whose sync tables Citus distributes.
--
-- Under Citus, ALTER EXTENSION sync_ext UPDATE on the coordinator runs this script on every node; every
-- statement on a sync table goes through sync_ext.alter_sync_table, which applies it to this node's copy of
-- the table and the table's shards here (see alter_sync_table in src/citus.rs).
CREATE FUNCTION sync_ext.alter_sync_table(tbl regclass, command text, rows_only boolean DEFAULT false) RETURNS void
    STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'alter_sync_table_wrapper';

-- A push that writes bound tables marks its tenant until it has stored its batch, so that capture
-- triggers leave the engine's own writes alone wherever they fire (under Citus, on the node of the
-- table's shard, in another backend than the push's).
SELECT sync_ext.alter_sync_table('sync_ext.tenants', $ddl$ALTER TABLE %1$s ADD COLUMN applying_push boolean NOT NULL DEFAULT false$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.tenants', $ddl$COMMENT ON COLUMN %1$s.applying_push IS
    'True only inside a transaction whose push is writing the tenant''s bound tables (never committed true).'$ddl$);

-- Distributes the sync tables by tenant on Citus, and the sync functions by their tenant argument, so that
-- a call is run by the node holding its tenant. Idempotent: run it again after every ALTER EXTENSION
-- sync_ext UPDATE, which may add tables and functions. The owner's.
CREATE FUNCTION sync_distribute() RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    name text;
    signature text;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RAISE EXCEPTION 'sync_distribute needs Citus: CREATE EXTENSION citus first' USING ERRCODE = 'feature_not_supported';
    END IF;
    -- The append-only guard of the log is a trigger, which Citus distributes only when told.
    PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    -- Per tenant, co-located: a tenant's counter, log and snapshots live on one node.
    FOREACH name IN ARRAY ARRAY['sync_ext.tenants', 'sync_ext.op_log', 'sync_ext.snapshots'] LOOP
        IF NOT EXISTS (SELECT FROM pg_dist_partition WHERE logicalrelid = name::regclass) THEN
            PERFORM create_distributed_table(name::regclass, 'tenant_id',
                                             colocate_with => CASE WHEN name = 'sync_ext.tenants' THEN 'default' ELSE 'sync_ext.tenants' END);
            -- Rows the table held (a restored dump) are now in its shards; the stale local copy goes.
            PERFORM truncate_local_data_after_distributing_table(name::regclass);
        END IF;
    END LOOP;
    -- Small and read by every call: a copy on every node. (sync_ext.wakeups stays each node's own.)
    FOREACH name IN ARRAY ARRAY['sync_ext.grants', 'sync_ext.settings', 'sync_ext.models'] LOOP
        IF NOT EXISTS (SELECT FROM pg_dist_partition WHERE logicalrelid = name::regclass) THEN
            PERFORM create_reference_table(name::regclass);
            PERFORM truncate_local_data_after_distributing_table(name::regclass);
        END IF;
    END LOOP;
    FOREACH signature IN ARRAY ARRAY['sync_push(text, jsonb)', 'sync_push_msgpack(text, bytea)', 'sync_pull(text, bigint, integer)',
                                     'sync_pull_msgpack(text, bigint, integer)', 'sync_compact(text, interval)'] LOOP
        PERFORM create_distributed_function(format('%I.%s', '@extschema@', signature)::regprocedure, 'tenant',
                                            colocate_with => 'sync_ext.tenants');
    END LOOP;
END
$$;
COMMENT ON FUNCTION sync_distribute() IS 'Distributes the sync tables by tenant on Citus (run again after every upgrade).';
REVOKE EXECUTE ON FUNCTION sync_distribute() FROM PUBLIC;

DROP FUNCTION sync_ext.alter_sync_table(regclass, text, boolean);
