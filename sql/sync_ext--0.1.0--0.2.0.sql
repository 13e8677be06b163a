-- sync_ext 0.1.0 -> 0.2.0: compaction (horizon, log time, sync_compact) and reset pulls, tenant grants
-- with row-level security, MessagePack, tenant_stats.
--
-- This file is also the last part of a fresh 0.2.0 install (after the 0.1.0 schema), so fresh and
-- upgraded databases cannot differ. Functions implemented in Rust are created with OR REPLACE for that.
--
-- Under Citus, ALTER EXTENSION sync_ext UPDATE on the coordinator runs this script on every node; every
-- statement on a sync table goes through sync_ext.alter_sync_table, which applies it to this node's copy of
-- the table and the table's shards here (see alter_sync_table in src/citus.rs).
CREATE FUNCTION sync_ext.alter_sync_table(tbl regclass, command text, rows_only boolean DEFAULT false) RETURNS void
    STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'alter_sync_table_wrapper';
-- The column and its check in two statements: Citus adds no column with a constraint in one.
SELECT sync_ext.alter_sync_table('sync_ext.tenants', $ddl$ALTER TABLE %1$s ADD COLUMN horizon bigint NOT NULL DEFAULT 0$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.tenants', $ddl$ALTER TABLE %1$s ADD CONSTRAINT tenants_horizon_check%2$s CHECK (horizon >= 0)$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.tenants', $ddl$COMMENT ON COLUMN %1$s.horizon IS
    'Compaction horizon: history below this seq is incomplete; a pull from below it is answered with a reset.'$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.op_log', $ddl$ALTER TABLE %1$s ADD COLUMN logged_at timestamptz NOT NULL DEFAULT now()$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.op_log', $ddl$COMMENT ON COLUMN %1$s.logged_at IS 'When the server logged the change (compaction keeps what is younger than its keep).'$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.snapshots', $ddl$CREATE INDEX snapshots_by_seq%2$s ON %1$s (tenant_id, seq)$ddl$);

-- Which roles may sync which tenants (sync_grant_tenant / sync_revoke_tenant).
CREATE TABLE sync_ext.grants (
    tenant_id text    NOT NULL CHECK (tenant_id <> ''),
    role      regrole NOT NULL,
    PRIMARY KEY (tenant_id, role)
);
SELECT pg_catalog.pg_extension_config_dump('sync_ext.grants', '');

-- Whether `caller` may sync or read `tenant`: a superuser or the extension's owner always; another role
-- when it is a member of a role granted the tenant and, if sync_ext.jwt_tenant_claim names a claim, the
-- request's JWT claim (request.jwt.claims, as PostgREST sets it) equals the tenant.
CREATE FUNCTION sync_ext.may_access(tenant text, caller name) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = caller), false)
        OR caller = (SELECT extowner::regrole::name FROM pg_extension WHERE extname = 'sync_ext')
        OR (EXISTS (SELECT 1 FROM sync_ext.grants AS g WHERE g.tenant_id = tenant AND pg_has_role(caller, g.role, 'MEMBER'))
            AND (coalesce(current_setting('sync_ext.jwt_tenant_claim', true), '') = ''
                 OR nullif(current_setting('request.jwt.claims', true), '')::jsonb
                        ->> current_setting('sync_ext.jwt_tenant_claim', true) IS NOT DISTINCT FROM tenant))
$$;

-- Direct reads: a role granted some tenant may SELECT the log and the snapshots and sees only the rows
-- of the tenants it may access; any other role is refused (42501).
SELECT sync_ext.alter_sync_table('sync_ext.op_log', $ddl$ALTER TABLE %1$s ENABLE ROW LEVEL SECURITY$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.snapshots', $ddl$ALTER TABLE %1$s ENABLE ROW LEVEL SECURITY$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.op_log', $ddl$CREATE POLICY tenant_rows ON %1$s FOR SELECT USING (sync_ext.may_access(tenant_id, current_user))$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.snapshots', $ddl$CREATE POLICY tenant_rows ON %1$s FOR SELECT USING (sync_ext.may_access(tenant_id, current_user))$ddl$);
GRANT USAGE ON SCHEMA sync_ext TO PUBLIC;

-- Per tenant: its cursor, how much it stores, its compaction horizon and its last push.
CREATE VIEW sync_ext.tenant_stats AS
SELECT t.tenant_id,
       t.last_seq,
       (SELECT count(*) FROM sync_ext.op_log AS o WHERE o.tenant_id = t.tenant_id) AS op_log_rows,
       (SELECT count(*) FROM sync_ext.snapshots AS s WHERE s.tenant_id = t.tenant_id) AS snapshot_rows,
       (SELECT count(*) FROM sync_ext.snapshots AS s WHERE s.tenant_id = t.tenant_id AND s.deleted) AS tombstones,
       t.horizon,
       t.last_push_at
  FROM sync_ext.tenants AS t;

-- Grants are rows of sync_ext.grants (and table privileges), so only the owner or a superuser can give them.
CREATE FUNCTION sync_grant_tenant(role regrole, tenant text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sync_ext.grants AS g (tenant_id, role) VALUES (tenant, sync_grant_tenant.role) ON CONFLICT DO NOTHING;
    EXECUTE format('GRANT SELECT ON sync_ext.op_log, sync_ext.snapshots TO %s', sync_grant_tenant.role);
END
$$;
COMMENT ON FUNCTION sync_grant_tenant(regrole, text) IS 'Lets members of a role push, pull and compact a tenant, and read its rows.';
CREATE FUNCTION sync_revoke_tenant(role regrole, tenant text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM sync_ext.grants AS g WHERE g.tenant_id = tenant AND g.role = sync_revoke_tenant.role;
    IF NOT EXISTS (SELECT 1 FROM sync_ext.grants AS g WHERE g.role = sync_revoke_tenant.role) THEN
        EXECUTE format('REVOKE SELECT ON sync_ext.op_log, sync_ext.snapshots FROM %s', sync_revoke_tenant.role);
    END IF;
END
$$;
COMMENT ON FUNCTION sync_revoke_tenant(regrole, text) IS 'Takes back sync_grant_tenant.';

-- Functions of 0.2.0 implemented in Rust.
CREATE OR REPLACE FUNCTION sync_compact(tenant text, keep interval DEFAULT '7 days') RETURNS jsonb
    STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'sync_compact_wrapper';
CREATE OR REPLACE FUNCTION sync_push_msgpack(tenant text, changes bytea) RETURNS bytea
    STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'sync_push_msgpack_wrapper';
CREATE OR REPLACE FUNCTION sync_pull_msgpack(tenant text, since bigint, max_changes int DEFAULT 1000) RETURNS bytea
    STRICT STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'sync_pull_msgpack_wrapper';

DROP FUNCTION sync_ext.alter_sync_table(regclass, text, boolean);
