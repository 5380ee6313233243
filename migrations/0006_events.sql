-- What event streams send: one row per change a client may watch, written by triggers so that every writer
-- (the API, the worker, orphan recovery) produces them without code of its own. The id is the SSE id: it only
-- grows and is never reused (AUTOINCREMENT), so a client reconnecting with Last-Event-ID resumes exactly.
CREATE TABLE events (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id  TEXT    NOT NULL,
    kind     TEXT    NOT NULL CHECK (kind IN ('status', 'progress', 'preview', 'done', 'error', 'deleted')),
    data     TEXT    NOT NULL,  -- a JSON object: what changed, as of this event
    at       REAL    NOT NULL   -- when it was written (Unix time)
);
CREATE INDEX events_task ON events (task_id, id);
CREATE INDEX events_at ON events (at);

-- The latest preview of a running task: a small JPEG of its current latents, replaced every few steps.
CREATE TABLE previews (
    task_id  TEXT    PRIMARY KEY REFERENCES tasks (id) ON DELETE CASCADE,
    image    INTEGER NOT NULL,  -- 1-based image of the task
    step     INTEGER NOT NULL,
    mime     TEXT    NOT NULL,
    data     BLOB    NOT NULL,
    at       REAL    NOT NULL
) WITHOUT ROWID;

CREATE TRIGGER events_submitted AFTER INSERT ON tasks
BEGIN
    INSERT INTO events (task_id, kind, data, at)
    VALUES (NEW.id, 'status', json_object('status', NEW.status), NEW.created_at);
END;

CREATE TRIGGER events_status AFTER UPDATE OF status ON tasks
WHEN OLD.status != NEW.status
BEGIN
    INSERT INTO events (task_id, kind, data, at)
    VALUES (NEW.id, CASE NEW.status WHEN 'done' THEN 'done' WHEN 'error' THEN 'error' ELSE 'status' END,
            json_object('status', NEW.status, 'error', NEW.error, 'attempts', NEW.attempts),
            (julianday('now') - 2440587.5) * 86400.0);
END;

CREATE TRIGGER events_progress AFTER UPDATE OF step, image_index ON tasks
WHEN NEW.status = 'processing' AND OLD.status = 'processing'
     AND (OLD.step != NEW.step OR OLD.image_index != NEW.image_index)
BEGIN
    INSERT INTO events (task_id, kind, data, at)
    VALUES (NEW.id, 'progress', json_object('image', NEW.image_index + 1, 'count', NEW.count, 'step', NEW.step,
                                            'steps', NEW.steps), (julianday('now') - 2440587.5) * 86400.0);
END;

CREATE TRIGGER events_deleted AFTER DELETE ON tasks
BEGIN
    INSERT INTO events (task_id, kind, data, at)
    VALUES (OLD.id, 'deleted', json_object('status', 'deleted'), (julianday('now') - 2440587.5) * 86400.0);
END;

CREATE TRIGGER events_preview AFTER INSERT ON previews
BEGIN
    INSERT INTO events (task_id, kind, data, at)
    VALUES (NEW.task_id, 'preview', json_object('image', NEW.image, 'step', NEW.step), NEW.at);
END;

CREATE TRIGGER events_preview_replaced AFTER UPDATE ON previews
BEGIN
    INSERT INTO events (task_id, kind, data, at)
    VALUES (NEW.task_id, 'preview', json_object('image', NEW.image, 'step', NEW.step), NEW.at);
END;

-- A preview shows a running task only: it goes when the task finishes, fails, is canceled or requeued.
CREATE TRIGGER previews_end AFTER UPDATE OF status ON tasks
WHEN NEW.status != 'processing'
BEGIN
    DELETE FROM previews WHERE task_id = NEW.id;
END;
