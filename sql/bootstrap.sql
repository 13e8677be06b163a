-- sync_ext storage. Every key starts with tenant_id so the tables can be distributed by tenant.

CREATE SCHEMA IF NOT EXISTS sync_ext;

-- One row per tenant. Its row lock serializes the pushes of one tenant (and only that tenant),
-- so seqs are handed out in commit order and without gaps.
CREATE TABLE sync_ext.tenants (
    tenant_id    text PRIMARY KEY,
    last_seq     bigint NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    last_hlc     text COLLATE "C",
    last_push_at timestamptz
);
COMMENT ON COLUMN sync_ext.tenants.last_hlc IS
    'The greatest hlc applied for the tenant; stamps the server issues for captured writes come after it.';

-- Every change that won something, in the order it was applied. Append-only.
CREATE TABLE sync_ext.op_log (
    tenant_id    text        NOT NULL,
    seq          bigint      NOT NULL CHECK (seq > 0),
    op_id        uuid        NOT NULL,
    model        text        NOT NULL,
    pk           text        NOT NULL,
    op           text        NOT NULL CHECK (op IN ('insert', 'update', 'delete')),
    actor        text        NOT NULL,
    hlc          text COLLATE "C" NOT NULL,
    updated_at   timestamptz NOT NULL,
    payload      jsonb,
    payload_hash bytea       NOT NULL,
    PRIMARY KEY (tenant_id, seq),
    UNIQUE (tenant_id, op_id)
);
COMMENT ON TABLE sync_ext.op_log IS
    'Append-only log of applied changes per tenant; seq is gap-free and in commit order. payload holds the fields the change won.';

-- The current merge state of every row: its visible value and the registers that decide future merges.
CREATE TABLE sync_ext.snapshots (
    tenant_id    text    NOT NULL,
    model        text    NOT NULL,
    id           text    NOT NULL,
    value        jsonb   NOT NULL,
    hlc          text COLLATE "C" NOT NULL,
    actor        text    NOT NULL,
    op_id        uuid    NOT NULL,
    deleted      boolean NOT NULL,
    deleted_hlc  text COLLATE "C",
    field_stamps jsonb   NOT NULL DEFAULT '{}',
    seq          bigint  NOT NULL,
    PRIMARY KEY (tenant_id, model, id)
);
COMMENT ON TABLE sync_ext.snapshots IS
    'Current state per row. hlc/actor/op_id/deleted: the winning change of the existence register; deleted_hlc: the latest delete; field_stamps: [hlc, actor, op_id] of each field whose winner is not the existence winner.';

-- Sync models bound to application tables: pushed changes are applied to the table, and plain SQL
-- writes to the table are captured into the op log.
CREATE TABLE sync_ext.models (
    model         text PRIMARY KEY,
    table_name    regclass NOT NULL UNIQUE,
    tenant_column name,
    tenant        text,
    registered_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((tenant_column IS NULL) <> (tenant IS NULL))
);

-- Statement-level capture: one call per statement with all its rows (COPY and multi-row statements too).
CREATE FUNCTION sync_ext.capture_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM sync_ext.capture_rows(TG_RELID, NULL, (SELECT array_agg(n) FROM sync_ext_new AS n));
    RETURN NULL;
END
$$;
CREATE FUNCTION sync_ext.capture_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM sync_ext.capture_rows(TG_RELID, (SELECT array_agg(o) FROM sync_ext_old AS o),
                                  (SELECT array_agg(n) FROM sync_ext_new AS n));
    RETURN NULL;
END
$$;
CREATE FUNCTION sync_ext.capture_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM sync_ext.capture_rows(TG_RELID, (SELECT array_agg(o) FROM sync_ext_old AS o), NULL);
    RETURN NULL;
END
$$;
CREATE FUNCTION sync_ext.forbid_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'table % is synced by sync_ext: TRUNCATE would not reach clients; use DELETE', TG_RELID::regclass
        USING ERRCODE = 'object_not_in_prerequisite_state';
END
$$;

CREATE FUNCTION sync_ext.forbid_op_log_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'sync_ext.op_log is append-only' USING ERRCODE = 'object_not_in_prerequisite_state';
END
$$;
CREATE TRIGGER op_log_is_append_only BEFORE UPDATE ON sync_ext.op_log
    FOR EACH STATEMENT EXECUTE FUNCTION sync_ext.forbid_op_log_update();

-- pg_dump keeps the sync state of an extension's tables only when they are registered.
SELECT pg_catalog.pg_extension_config_dump('sync_ext.tenants', '');
SELECT pg_catalog.pg_extension_config_dump('sync_ext.op_log', '');
SELECT pg_catalog.pg_extension_config_dump('sync_ext.snapshots', '');
SELECT pg_catalog.pg_extension_config_dump('sync_ext.models', '');
