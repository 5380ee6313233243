-- The queue: hot task rows, image blobs kept apart, timing stats, and live workers.

CREATE TABLE tasks (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,  -- claim order within a priority; never reused
    id           TEXT    NOT NULL UNIQUE,            -- random, unguessable public id
    status       TEXT    NOT NULL DEFAULT 'waiting'
                 CHECK (status IN ('waiting', 'processing', 'done', 'error', 'canceled')),
    priority     INTEGER NOT NULL DEFAULT 0,
    model        TEXT    NOT NULL,
    prompt       TEXT    NOT NULL,
    width        INTEGER NOT NULL,
    height       INTEGER NOT NULL,
    steps        INTEGER NOT NULL,
    guidance     REAL    NOT NULL,
    seed         INTEGER NOT NULL,
    count        INTEGER NOT NULL DEFAULT 1,
    format       TEXT    NOT NULL,
    quality      INTEGER NOT NULL,
    created_at   REAL    NOT NULL,
    started_at   REAL,
    finished_at  REAL,
    worker_id    TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    image_index  INTEGER NOT NULL DEFAULT 0,   -- image being generated (0-based)
    step         INTEGER NOT NULL DEFAULT 0,   -- denoising steps finished on that image
    step_at      REAL,                         -- when the last step finished
    engine       TEXT,
    error        TEXT
);

-- Claim order and "how many are ahead of me": covers the columns the forecast groups by.
CREATE INDEX tasks_queue ON tasks (status, priority DESC, seq, model, width, height, steps, count);

CREATE TABLE images (
    task_id     TEXT    NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    seed        INTEGER NOT NULL,
    mime        TEXT    NOT NULL,
    data        BLOB    NOT NULL,
    served      INTEGER NOT NULL DEFAULT 0,
    gen_started REAL    NOT NULL,   -- wall clock around engine.generate, for duty-cycle figures
    gen_ended   REAL    NOT NULL,
    PRIMARY KEY (task_id, idx)
) WITHOUT ROWID;

-- Aggregated timings per model, size and kind of cost; the forecast fits a cost model to these.
-- kind: 'step' (one denoising step), 'before' / 'after' (fixed costs around the loop), 'encode'.
CREATE TABLE timing_stats (
    model       TEXT    NOT NULL,
    width       INTEGER NOT NULL,
    height      INTEGER NOT NULL,
    kind        TEXT    NOT NULL CHECK (kind IN ('step', 'before', 'after', 'encode')),
    n           INTEGER NOT NULL,
    total       REAL    NOT NULL,   -- sum of seconds
    total_sq    REAL    NOT NULL,   -- sum of squared seconds, for the spread
    updated_at  REAL    NOT NULL,
    PRIMARY KEY (model, width, height, kind)
) WITHOUT ROWID;

CREATE TABLE workers (
    id            TEXT    PRIMARY KEY,
    hostname      TEXT    NOT NULL,
    pid           INTEGER NOT NULL,
    engine        TEXT    NOT NULL,
    model         TEXT    NOT NULL,
    quantize      INTEGER,
    started_at    REAL    NOT NULL,
    heartbeat_at  REAL    NOT NULL,
    stopped_at    REAL
);

-- A counter of changes to the waiting set other than fresh submissions (claims, cancels, deletes,
-- requeues). The API keeps a snapshot of the queue and rebuilds it only when this moves.
CREATE TABLE queue_state (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    changes  INTEGER NOT NULL
);
INSERT INTO queue_state (id, changes) VALUES (1, 0);

CREATE TRIGGER tasks_leave_queue AFTER UPDATE OF status ON tasks
WHEN (OLD.status = 'waiting') != (NEW.status = 'waiting')
BEGIN
    UPDATE queue_state SET changes = changes + 1 WHERE id = 1;
END;

CREATE TRIGGER tasks_delete_waiting AFTER DELETE ON tasks
WHEN OLD.status = 'waiting'
BEGIN
    UPDATE queue_state SET changes = changes + 1 WHERE id = 1;
END;
