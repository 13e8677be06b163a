-- sync_ext 0.5.0 -> 0.6.0: partial sync (scopes inside a tenant, scope grants), read-only models.
--
-- This file is also the last part of a fresh 0.6.0 install (after the 0.1.0 schema and the upgrades
-- since), so fresh and upgraded databases cannot differ. Functions implemented in Rust are created with
-- OR REPLACE for that. Every statement on a sync table goes through sync_ext.alter_sync_table (see
-- sync_ext--0.4.0--0.5.0.sql), so that it also runs on a database whose sync tables Citus distributes.
CREATE FUNCTION sync_ext.alter_sync_table(tbl regclass, command text, rows_only boolean DEFAULT false) RETURNS void
    STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'alter_sync_table_wrapper';

-- Scope definitions (sync_define_scope): rows of `model` are in the instance `<scope>:<value of field>`.
CREATE TABLE sync_ext.scopes (
    scope      text NOT NULL CHECK (scope <> '' AND strpos(scope, ':') = 0),
    model      text NOT NULL CHECK (model <> ''),
    field      text NOT NULL CHECK (field <> ''),
    defined_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, model)
);
SELECT pg_catalog.pg_extension_config_dump('sync_ext.scopes', '');
-- Definitions are no secret: sync_scopes() lists them to every client.
GRANT SELECT ON sync_ext.scopes TO PUBLIC;

-- Which roles may pull which instances of a tenant (sync_grant_scope), besides tenant grants.
CREATE TABLE sync_ext.scope_grants (
    tenant_id text    NOT NULL CHECK (tenant_id <> ''),
    role      regrole NOT NULL,
    instance  text    NOT NULL CHECK (strpos(instance, ':') > 1),
    PRIMARY KEY (tenant_id, role, instance)
);
SELECT pg_catalog.pg_extension_config_dump('sync_ext.scope_grants', '');

-- The scope index of the log: one row per log entry and instance the entry's row was in before or after
-- it (rows of tenant-wide models under the instance ''). A scoped pull reads the listed instances' rows
-- in seq order, so it costs what it returns, whatever the tenant's other instances hold. Empty while no
-- scope is defined.
-- Instances compare bytewise (the index is read, never shown in order), and the key carries before and
-- after so that a pull reads the index alone. log_tid is where the entry's op_log row was written: a
-- pull reads that row directly (the log is append-only) and checks that it is the entry's, and looks it
-- up by its key when it is not (after a rewrite of op_log such as VACUUM FULL, or a restore) or when
-- there is none (entries written by a rebuild, or by a push routed statement by statement through a
-- Citus coordinator). On a distributed install pulls look every row up by its key.
CREATE TABLE sync_ext.scope_log (
    tenant_id text    NOT NULL,
    instance  text    COLLATE "C" NOT NULL,
    seq       bigint  NOT NULL,
    before    boolean NOT NULL,
    after     boolean NOT NULL,
    log_tid   tid,
    PRIMARY KEY (tenant_id, instance, seq) INCLUDE (before, after, log_tid)
);
COMMENT ON TABLE sync_ext.scope_log IS
    'Per log entry, the scope instances its row was in before (before) and after (after) the change; '''' for tenant-wide models. log_tid: where its op_log row was written (a hint, checked on use).';
SELECT pg_catalog.pg_extension_config_dump('sync_ext.scope_log', '');

-- The digest of each instance's visible rows, kept on every write as the tenant's digest is.
CREATE TABLE sync_ext.scope_digests (
    tenant_id text   NOT NULL,
    instance  text   COLLATE "C" NOT NULL,
    digest    bigint NOT NULL,
    PRIMARY KEY (tenant_id, instance)
);
SELECT pg_catalog.pg_extension_config_dump('sync_ext.scope_digests', '');

SELECT sync_ext.alter_sync_table('sync_ext.snapshots', $ddl$ALTER TABLE %1$s ADD COLUMN instances text[]$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.snapshots', $ddl$COMMENT ON COLUMN %1$s.instances IS
    'The scope instances of a row of a scoped model (a deleted row keeps those it had); NULL for none or tenant-wide models.'$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.tenants', $ddl$ALTER TABLE %1$s ADD COLUMN scope_horizon bigint NOT NULL DEFAULT 0$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.tenants', $ddl$COMMENT ON COLUMN %1$s.scope_horizon IS
    'The tenant''s last seq when scopes were last defined or dropped: a scoped pull from below it is answered with a reset.'$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.models', $ddl$ALTER TABLE %1$s ADD COLUMN read_only boolean NOT NULL DEFAULT false$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.models', $ddl$ALTER TABLE %1$s ADD COLUMN columns text[]$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.models', $ddl$COMMENT ON COLUMN %1$s.columns IS
    'The only columns the model syncs, besides its key (NULL: every column); the others never enter the log and pushes leave them alone.'$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.models', $ddl$COMMENT ON COLUMN %1$s.read_only IS
    'Devices may not push changes to the model (rejected read_only); the table''s own writes are captured as usual.'$ddl$);

-- Backends keep scope definitions and grants between calls; a change tells them to read them again.
SELECT sync_ext.alter_sync_table('sync_ext.scopes', $ddl$CREATE TRIGGER access_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %1$s
    FOR EACH STATEMENT EXECUTE FUNCTION sync_ext.access_changed()$ddl$);
SELECT sync_ext.alter_sync_table('sync_ext.scope_grants', $ddl$CREATE TRIGGER access_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %1$s
    FOR EACH STATEMENT EXECUTE FUNCTION sync_ext.access_changed()$ddl$);

-- Functions of 0.6.0 implemented in Rust. sync_pull and sync_pull_msgpack gain `scopes` (and new entry
-- points: the old ones serve the three-argument objects of older versions until this update).
DROP FUNCTION IF EXISTS sync_pull(text, bigint, integer);
DROP FUNCTION IF EXISTS sync_pull_msgpack(text, bigint, integer);
CREATE OR REPLACE FUNCTION "sync_pull"(
	"tenant" TEXT,
	"since" bigint,
	"max_changes" INT DEFAULT 1000,
	"scopes" TEXT[] DEFAULT NULL
) RETURNS jsonb STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'sync_pull_scoped_wrapper';
CREATE OR REPLACE FUNCTION "sync_pull_msgpack"(
	"tenant" TEXT,
	"since" bigint,
	"max_changes" INT DEFAULT 1000,
	"scopes" TEXT[] DEFAULT NULL
) RETURNS bytea STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'sync_pull_msgpack_scoped_wrapper';
-- sync_register_model gains `columns`: a bound model may sync only some of its table's columns.
DROP FUNCTION sync_register_model(text, regclass, text, text);
CREATE FUNCTION "sync_register_model"(
	"model" TEXT,
	"tbl" regclass,
	"tenant_column" TEXT DEFAULT NULL,
	"tenant" TEXT DEFAULT NULL,
	"columns" TEXT[] DEFAULT NULL
) RETURNS void VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'sync_register_model_columns_wrapper';
CREATE OR REPLACE FUNCTION "sync_define_scope"(
	"scope" TEXT,
	"model" TEXT,
	"field" TEXT
) RETURNS void STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'sync_define_scope_wrapper';
CREATE OR REPLACE FUNCTION "sync_drop_scope"(
	"scope" TEXT,
	"model" TEXT
) RETURNS void STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'sync_drop_scope_wrapper';
CREATE OR REPLACE FUNCTION "sync_set_read_only"(
	"model" TEXT,
	"read_only" bool DEFAULT true
) RETURNS void STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'sync_set_read_only_wrapper';

-- The scope definitions, for clients (which compute membership with the same rule).
CREATE FUNCTION sync_scopes() RETURNS jsonb LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('scope', s.scope, 'model', s.model, 'field', s.field) ORDER BY s.model, s.scope), '[]')
      FROM sync_ext.scopes AS s
$$;
COMMENT ON FUNCTION sync_scopes() IS 'The scope definitions, as [{"scope", "model", "field"}].';

-- Scope grants are rows of sync_ext.scope_grants, so only the owner or a superuser can give them. A role
-- holding only scope grants reads nothing of the sync tables directly.
CREATE FUNCTION sync_grant_scope(role regrole, tenant text, instance text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF strpos(instance, ':') < 2 THEN
        RAISE EXCEPTION 'instance: expected <scope>:<value>, got %', instance USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO sync_ext.scope_grants AS g (tenant_id, role, instance) VALUES (tenant, sync_grant_scope.role, instance)
        ON CONFLICT DO NOTHING;
END
$$;
COMMENT ON FUNCTION sync_grant_scope(regrole, text, text) IS 'Lets members of a role pull one scope instance of a tenant and push to its rows.';
CREATE FUNCTION sync_revoke_scope(role regrole, tenant text, instance text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM sync_ext.scope_grants AS g
     WHERE g.tenant_id = tenant AND g.role = sync_revoke_scope.role AND g.instance = sync_revoke_scope.instance;
END
$$;
COMMENT ON FUNCTION sync_revoke_scope(regrole, text, text) IS 'Takes back sync_grant_scope.';

REVOKE EXECUTE ON FUNCTION sync_register_model(text, regclass, text, text, text[]), sync_define_scope(text, text, text), sync_drop_scope(text, text), sync_set_read_only(text, boolean),
                           sync_grant_scope(regrole, text, text), sync_revoke_scope(regrole, text, text)
    FROM PUBLIC;

-- Per tenant, also how many scope instances it indexes; per instance, its rows and log entries.
CREATE OR REPLACE VIEW sync_ext.tenant_stats AS
SELECT t.tenant_id,
       t.last_seq,
       (SELECT count(*) FROM sync_ext.op_log AS o WHERE o.tenant_id = t.tenant_id) AS op_log_rows,
       (SELECT count(*) FROM sync_ext.snapshots AS s WHERE s.tenant_id = t.tenant_id) AS snapshot_rows,
       (SELECT count(*) FROM sync_ext.snapshots AS s WHERE s.tenant_id = t.tenant_id AND s.deleted) AS tombstones,
       t.horizon,
       t.last_push_at,
       (SELECT count(*) FROM sync_ext.scope_digests AS d WHERE d.tenant_id = t.tenant_id AND d.instance <> '') AS scope_instances
  FROM sync_ext.tenants AS t;
CREATE VIEW sync_ext.scope_stats AS
SELECT l.tenant_id,
       l.instance,
       count(*) AS scope_log_rows,
       count(*) FILTER (WHERE l.after AND EXISTS (SELECT FROM sync_ext.snapshots AS s
                                                  WHERE s.tenant_id = l.tenant_id AND s.seq = l.seq AND NOT s.deleted)) AS rows
  FROM sync_ext.scope_log AS l
 GROUP BY l.tenant_id, l.instance;
COMMENT ON VIEW sync_ext.scope_stats IS 'Per tenant and scope instance ('''' for tenant-wide models): its index entries and its visible rows.';

-- sync_distribute() now also distributes the scope index and digests by tenant, copies the definitions and
-- scope grants to every node, and knows the new pull signatures.
CREATE OR REPLACE FUNCTION sync_distribute() RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    name text;
    signature text;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RAISE EXCEPTION 'sync_distribute needs Citus: CREATE EXTENSION citus first' USING ERRCODE = 'feature_not_supported';
    END IF;
    -- The append-only guard of the log is a trigger, which Citus distributes only when told.
    PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    -- Per tenant, co-located: a tenant's counter, log, snapshots and scope index live on one node.
    FOREACH name IN ARRAY ARRAY['sync_ext.tenants', 'sync_ext.op_log', 'sync_ext.snapshots', 'sync_ext.scope_log', 'sync_ext.scope_digests'] LOOP
        IF NOT EXISTS (SELECT FROM pg_dist_partition WHERE logicalrelid = name::regclass) THEN
            PERFORM create_distributed_table(name::regclass, 'tenant_id',
                                             colocate_with => CASE WHEN name = 'sync_ext.tenants' THEN 'default' ELSE 'sync_ext.tenants' END);
            -- Rows the table held (a restored dump) are now in its shards; the stale local copy goes.
            PERFORM truncate_local_data_after_distributing_table(name::regclass);
        END IF;
    END LOOP;
    -- Small and read by every call: a copy on every node. (sync_ext.wakeups stays each node's own.)
    FOREACH name IN ARRAY ARRAY['sync_ext.grants', 'sync_ext.settings', 'sync_ext.models', 'sync_ext.scopes', 'sync_ext.scope_grants'] LOOP
        IF NOT EXISTS (SELECT FROM pg_dist_partition WHERE logicalrelid = name::regclass) THEN
            PERFORM create_reference_table(name::regclass);
            PERFORM truncate_local_data_after_distributing_table(name::regclass);
        END IF;
    END LOOP;
    FOREACH signature IN ARRAY ARRAY['sync_push(text, jsonb)', 'sync_push_msgpack(text, bytea)', 'sync_pull(text, bigint, integer, text[])',
                                     'sync_pull_msgpack(text, bigint, integer, text[])', 'sync_compact(text, interval)'] LOOP
        PERFORM create_distributed_function(format('%I.%s', '@extschema@', signature)::regprocedure, 'tenant',
                                            colocate_with => 'sync_ext.tenants');
    END LOOP;
END
$$;

DROP FUNCTION sync_ext.alter_sync_table(regclass, text, boolean);
