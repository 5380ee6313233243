-- The largest image a worker runs is per model: each model's memory need sets it, and an out-of-memory
-- failure lowers it for the model that failed. Comma-separated model=pixels; max_pixels stays the operator's cap.
ALTER TABLE workers ADD COLUMN pixel_limits TEXT NOT NULL DEFAULT '';

-- The forecast replays a multi-model worker's claim policy, which depends on how long each queue's head has
-- waited: the queue index carries created_at, so reading the queue stays an index-only scan.
DROP INDEX tasks_queue;
CREATE INDEX tasks_queue ON tasks (status, priority DESC, seq, model, width, height, steps, count, created_at);
