-- Compatible APIs (OpenAI Images, AceDataCloud, NebulaBlock) and webhooks: every request is an ordinary task
-- that remembers which surface it came through, where to call back, and how long its image links live.
ALTER TABLE tasks ADD COLUMN surface TEXT NOT NULL DEFAULT 'native'
    CHECK (surface IN ('native', 'openai', 'acedata', 'nebula'));
ALTER TABLE tasks ADD COLUMN callback_url TEXT;       -- POSTed when the task ends (done, error or canceled)
ALTER TABLE tasks ADD COLUMN link_base TEXT;          -- the server's URL as the client reached it, for image links
ALTER TABLE tasks ADD COLUMN keep_for REAL;           -- seconds a finished task is kept for its image links
ALTER TABLE tasks ADD COLUMN client_user TEXT;        -- who the client says the request is for (OpenAI's user)
-- The sweep of expired links reads only the tasks kept for links, never the whole queue.
CREATE INDEX tasks_link_expiry ON tasks (finished_at) WHERE keep_for IS NOT NULL;

-- The outbox: one row per webhook to send. A trigger writes it in the transaction that ends the task, so no
-- writer (worker, API cancel, orphan recovery) can end a task without it. It keeps a snapshot of the task, since
-- the task may be deleted (its images fetched) before the delivery is sent.
CREATE TABLE deliveries (
    id            TEXT    PRIMARY KEY,   -- the webhook-id header: stable across retries, for de-duplication
    task_id       TEXT    NOT NULL,
    url           TEXT    NOT NULL,
    surface       TEXT    NOT NULL,
    task          TEXT    NOT NULL,      -- JSON snapshot of the task as it ended
    state         TEXT    NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_at       REAL    NOT NULL,      -- when the next attempt is due
    lease_until   REAL,                  -- a deliverer is sending it until then (another takes over after)
    last_status   INTEGER,               -- the receiver's last HTTP status
    last_error    TEXT,
    created_at    REAL    NOT NULL,
    delivered_at  REAL
) WITHOUT ROWID;
CREATE INDEX deliveries_due ON deliveries (state, next_at);
CREATE INDEX deliveries_task ON deliveries (task_id);

CREATE TRIGGER deliveries_task_ended AFTER UPDATE OF status ON tasks
WHEN NEW.callback_url IS NOT NULL AND OLD.status != NEW.status AND NEW.status IN ('done', 'error', 'canceled')
BEGIN
    INSERT OR IGNORE INTO deliveries (id, task_id, url, surface, task, next_at, created_at)
    VALUES ('msg_' || NEW.id, NEW.id, NEW.callback_url, NEW.surface,
            json_object('id', NEW.id, 'status', NEW.status, 'error', NEW.error, 'model', NEW.model,
                        'prompt', NEW.prompt, 'seed', NEW.seed, 'count', NEW.count, 'width', NEW.width,
                        'height', NEW.height, 'format', NEW.format, 'created_at', NEW.created_at,
                        'started_at', NEW.started_at, 'finished_at', NEW.finished_at, 'link_base', NEW.link_base),
            (julianday('now') - 2440587.5) * 86400.0, (julianday('now') - 2440587.5) * 86400.0);
END;

-- Settings the server makes once and keeps: the generated webhook signing secret.
CREATE TABLE server_secrets (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
) WITHOUT ROWID;
