-- sync_ext 0.2.0 -> 0.3.0: a device's login can never be more than its tenant grant.
-- Operator settings move from parameters to a table only the owner writes; capture becomes a trigger
-- function that cannot be called directly; may_access answers only for the current role; nothing
-- internal or administrative is executable by PUBLIC.
--
-- This file is also the last part of a fresh 0.3.0 install (after the 0.1.0 schema and the 0.2.0
-- upgrade), so fresh and upgraded databases cannot differ. Functions implemented in Rust are created
-- with OR REPLACE for that, exactly as pgrx declares them.
--
-- Under Citus, ALTER EXTENSION sync_ext UPDATE on the coordinator runs this script on every node; every
-- statement on a sync table goes through sync_ext.alter_sync_table, which applies it to this node's copy of
-- the table and the table's shards here (see alter_sync_table in src/citus.rs).
CREATE FUNCTION sync_ext.alter_sync_table(tbl regclass, command text, rows_only boolean DEFAULT false) RETURNS void
    STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'alter_sync_table_wrapper';

-- Operator settings (sync_configure). Values an operator had set as sync_ext.* parameters (postgresql.conf,
-- ALTER DATABASE, ALTER ROLE) are carried over here, before the library that no longer defines those
-- parameters is loaded by this script.
CREATE TABLE sync_ext.settings (
    name  text PRIMARY KEY,
    value text NOT NULL
);
COMMENT ON TABLE sync_ext.settings IS
    'Operator settings (limits, the JWT claim). Written only through sync_configure; absent means the default.';
SELECT pg_catalog.pg_extension_config_dump('sync_ext.settings', '');
INSERT INTO sync_ext.settings (name, value)
SELECT name, pg_catalog.current_setting('sync_ext.' || name, true)
  FROM pg_catalog.unnest(ARRAY['max_push_changes', 'max_value_bytes', 'max_pull_changes', 'max_clock_skew', 'jwt_tenant_claim']) AS name
 WHERE coalesce(pg_catalog.current_setting('sync_ext.' || name, true), '') <> '';

CREATE OR REPLACE FUNCTION "sync_configure"(
	"setting" TEXT, /* & str */
	"value" TEXT /* Option < & str > */
) RETURNS VOID /* Result < (), pgrx :: pg_sys :: panic :: ErrorReport > */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'sync_configure_wrapper';
-- Normalize what was carried over (units, defaults), through the one function that validates settings.
SELECT sync_configure(name, value) FROM sync_ext.settings;

-- Compaction forgets op_ids and deletes: changes stamped at or before what it removed are refused `stale`.
SELECT sync_ext.alter_sync_table('sync_ext.tenants', $ddl$ALTER TABLE %1$s ADD COLUMN horizon_hlc text COLLATE "C"$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.tenants', $ddl$COMMENT ON COLUMN %1$s.horizon_hlc IS
    'The greatest hlc compaction removed from the log: pushed changes stamped at or before it are rejected stale.'$ddl$);

-- The digest of each tenant's visible rows, kept on every write and returned on the last page of a pull.
CREATE OR REPLACE FUNCTION sync_ext."tenant_digest"(
	"tenant" TEXT /* & str */
) RETURNS bigint /* Result < i64, pgrx :: pg_sys :: panic :: ErrorReport > */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'tenant_digest_wrapper';
SELECT sync_ext.alter_sync_table('sync_ext.tenants', $ddl$ALTER TABLE %1$s ADD COLUMN digest bigint$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.tenants', $ddl$UPDATE %1$s SET digest = sync_ext.tenant_digest(tenant_id)$ddl$, rows_only => true);
SELECT sync_ext.alter_sync_table('sync_ext.tenants', $ddl$ALTER TABLE %1$s ALTER COLUMN digest SET DEFAULT 0, ALTER COLUMN digest SET NOT NULL$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.tenants', $ddl$COMMENT ON COLUMN %1$s.digest IS
    'The digest of the tenant''s visible rows (sync_ext.tenant_digest computes it from the snapshots), bits of an unsigned 64-bit sum.'$ddl$);

-- Capture: the three trigger functions become the engine's C trigger function.
CREATE OR REPLACE FUNCTION sync_ext.capture_insert() RETURNS trigger LANGUAGE c AS 'MODULE_PATHNAME', 'capture_wrapper';
CREATE OR REPLACE FUNCTION sync_ext.capture_update() RETURNS trigger LANGUAGE c AS 'MODULE_PATHNAME', 'capture_wrapper';
CREATE OR REPLACE FUNCTION sync_ext.capture_delete() RETURNS trigger LANGUAGE c AS 'MODULE_PATHNAME', 'capture_wrapper';
-- (absent from a fresh install, where no 0.2.0 objects were created by pgrx)
DROP FUNCTION IF EXISTS sync_ext.capture_rows(oid, anyarray, anyarray);

-- Access checks answer for the current role only.
SELECT sync_ext.alter_sync_table('sync_ext.op_log', $ddl$DROP POLICY tenant_rows ON %1$s$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.snapshots', $ddl$DROP POLICY tenant_rows ON %1$s$ddl$);
DROP FUNCTION sync_ext.may_access(text, name);
CREATE OR REPLACE FUNCTION sync_ext."may_access"(
	"tenant" TEXT /* & str */
) RETURNS bool /* Result < bool, pgrx :: pg_sys :: panic :: ErrorReport > */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'may_access_wrapper';
SELECT sync_ext.alter_sync_table('sync_ext.op_log', $ddl$CREATE POLICY tenant_rows ON %1$s FOR SELECT USING (sync_ext.may_access(tenant_id))$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.snapshots', $ddl$CREATE POLICY tenant_rows ON %1$s FOR SELECT USING (sync_ext.may_access(tenant_id))$ddl$);

-- Backends keep what they read of the grants and the settings until these triggers say they changed.
CREATE FUNCTION sync_ext.access_changed() RETURNS trigger LANGUAGE c AS 'MODULE_PATHNAME', 'access_changed_wrapper';
SELECT sync_ext.alter_sync_table('sync_ext.grants', $ddl$CREATE TRIGGER access_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %1$s
    FOR EACH STATEMENT EXECUTE FUNCTION sync_ext.access_changed()$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.settings', $ddl$CREATE TRIGGER access_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %1$s
    FOR EACH STATEMENT EXECUTE FUNCTION sync_ext.access_changed()$ddl$);

-- Administration is the owner's; internal functions are nobody else's.
REVOKE EXECUTE ON FUNCTION sync_grant_tenant(regrole, text), sync_revoke_tenant(regrole, text),
                           sync_register_model(text, regclass, text, text), sync_unregister_model(text),
                           sync_configure(text, text),
                           sync_ext.capture_insert(), sync_ext.capture_update(), sync_ext.capture_delete(),
                           sync_ext.forbid_truncate(), sync_ext.forbid_op_log_update(), sync_ext.access_changed(),
                           sync_ext.tenant_digest(text)
    FROM PUBLIC;

DROP FUNCTION sync_ext.alter_sync_table(regclass, text, boolean);
