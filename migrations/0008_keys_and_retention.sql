-- A shared service: API keys (stored as hashes), tasks owned by the key that submitted them, idempotent
-- submits, and the ids of tasks removed by retention (so they answer "expired", not "never existed").
CREATE TABLE api_keys (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT    NOT NULL UNIQUE,
    hash          TEXT    NOT NULL UNIQUE,   -- SHA-256 of the key, hex; the key itself is shown once and never kept
    admin         INTEGER NOT NULL DEFAULT 0,
    priority      INTEGER NOT NULL DEFAULT 0,  -- may submit priority tasks
    created_at    REAL    NOT NULL,
    last_used_at  REAL,
    revoked_at    REAL
);

ALTER TABLE tasks ADD COLUMN key_id INTEGER;  -- the key that submitted it; NULL when the server ran without keys
CREATE INDEX tasks_owner ON tasks (key_id, status);

CREATE TABLE idempotency (
    key_id     INTEGER NOT NULL DEFAULT 0,   -- 0 without keys
    idem_key   TEXT    NOT NULL,             -- the Idempotency-Key header
    body_hash  TEXT    NOT NULL,             -- SHA-256 of the method, path and body
    task_id    TEXT    NOT NULL,
    created_at REAL    NOT NULL,
    PRIMARY KEY (key_id, idem_key)
) WITHOUT ROWID;
CREATE INDEX idempotency_age ON idempotency (created_at);

CREATE TABLE expired_tasks (
    id          TEXT PRIMARY KEY,
    expired_at  REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX expired_tasks_age ON expired_tasks (expired_at);
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
