-- Fair share between API keys (start-time fair queueing). Each task gets a tag at submit: the later of the
-- queue's virtual time and the end of its key's previous task; the key's end then moves on by the task's
-- forecast engine seconds (its GPU-seconds). Claims go by priority, then tag, so a key with 500 tasks queued
-- holds tags far ahead and another key's first task slots in next. Among equal tags the key whose backlog began
-- later goes first (a newcomer's second task before the heavy key's next). The forecast orders by the same
-- stored values, so it predicts the claim order exactly.
ALTER TABLE tasks ADD COLUMN fair_tag REAL NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN fair_start REAL NOT NULL DEFAULT 0;  -- the tag at which its key's backlog began
CREATE INDEX tasks_fair_queue ON tasks (status, model, priority DESC, fair_tag, fair_start DESC, seq);

CREATE TABLE fair_keys (
    key_id         INTEGER PRIMARY KEY,   -- 0: tasks submitted without a key
    last_finish    REAL    NOT NULL,      -- the tag at which the key's last queued task ends
    backlog_start  REAL    NOT NULL       -- the tag at which its current backlog began
);

CREATE TABLE fair_clock (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    virtual   REAL    NOT NULL,  -- the tag of the latest claimed task: where a newly busy key starts
    last_tag  REAL    NOT NULL   -- the largest tag given so far (first-in first-out scheduling tags past it)
);
INSERT INTO fair_clock (id, virtual, last_tag) VALUES (1, 0, 0);

CREATE TRIGGER fair_claimed AFTER UPDATE OF status ON tasks
WHEN NEW.status = 'processing' AND OLD.status = 'waiting'
BEGIN
    UPDATE fair_clock SET virtual = max(virtual, NEW.fair_tag) WHERE id = 1;
END;
