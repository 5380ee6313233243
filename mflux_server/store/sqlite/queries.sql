-- SQLite's versions of the statements whose text differs between the stores (the rest: ../queries.sql).

-- name: waiting_heads
-- Per model, LoRA set and priority: the first waiting task in claim order (SQLite takes the bare created_at from the
-- row MIN(seq) picked) and how much waits, for choosing what to load.
SELECT model, loras, priority, MIN(seq) AS seq, created_at, COUNT(*) AS tasks, SUM(count) AS images FROM tasks
 WHERE status = 'waiting'
 GROUP BY model, loras, priority;

-- name: claim_next
-- Take a model's next waiting task for a worker, counting the attempt: the highest priority, then the smallest
-- fair tag (first in, when one key submits everything), and among equal tags the key whose backlog began later.
-- One lookup in tasks_fair_queue, so a deep queue costs nothing.
UPDATE tasks
   SET status = 'processing', worker_id = :worker_id, started_at = :now, attempts = attempts + 1,
       image_index = 0, step = 0, step_at = :now, engine = :engine, error = NULL
 WHERE seq = (SELECT seq FROM tasks
               WHERE status = 'waiting' AND model = :model
               ORDER BY priority DESC, fair_tag, fair_start DESC, seq
               LIMIT 1)
RETURNING *;

-- name: claim_next_variant
-- As claim_next, among the tasks of one LoRA set of the model (a worker grouping its work by variant): one
-- lookup in tasks_variant_queue, which holds only waiting tasks.
UPDATE tasks
   SET status = 'processing', worker_id = :worker_id, started_at = :now, attempts = attempts + 1,
       image_index = 0, step = 0, step_at = :now, engine = :engine, error = NULL
 WHERE seq = (SELECT seq FROM tasks
               WHERE status = 'waiting' AND model = :model AND loras = :loras
               ORDER BY priority DESC, fair_tag, fair_start DESC, seq
               LIMIT 1)
RETURNING *;

-- name: waiting_since
-- Waiting tasks newer than a snapshot: a range read on the rowid. The unary + keeps SQLite from
-- preferring the status index, which would scan every waiting task.
SELECT t.model, t.priority, t.seq, t.width, t.height, t.steps, t.count, t.created_at, t.fair_tag, t.fair_start,
       t.loras
  FROM tasks t
 WHERE t.seq > :seq AND +t.status = 'waiting' AND +t.model = :model;

-- name: all_waiting_since
-- Every model's waiting tasks newer than a snapshot, to extend it: a range read on the rowid (+ as above).
SELECT t.model, t.priority, t.seq, t.width, t.height, t.steps, t.count, t.created_at, t.fair_tag, t.fair_start,
       t.loras
  FROM tasks t
 WHERE t.seq > :seq AND +t.status = 'waiting';

-- name: data_version
-- A number that changes when another connection commits: a cheap "did anything happen?".
PRAGMA data_version;

-- name: save_preview
-- Replace a running task's preview, only while the task is still this worker's.
INSERT INTO previews (task_id, image, step, mime, data, at)
SELECT :id, :image, :step, :mime, :data, :at FROM tasks
 WHERE id = :id AND worker_id = :worker_id AND status = 'processing'
ON CONFLICT (task_id) DO UPDATE SET image = excluded.image, step = excluded.step, mime = excluded.mime,
       data = excluded.data, at = excluded.at;

-- name: claim_delivery
-- Take the oldest due webhook that no live deliverer holds, leasing it so other processes leave it alone.
UPDATE deliveries SET lease_until = :lease_until, attempts = attempts + 1
 WHERE id = (SELECT id FROM deliveries WHERE state = 'pending' AND next_at <= :now
                AND (lease_until IS NULL OR lease_until < :now) ORDER BY next_at LIMIT 1)
RETURNING *;

-- name: delivery_retry
-- A webhook attempt failed: try again at next_at, or give up (state 'failed') when next_at is NULL.
UPDATE deliveries SET state = CASE WHEN :next_at IS NULL THEN 'failed' ELSE 'pending' END,
       next_at = coalesce(:next_at, next_at), lease_until = NULL, last_status = :status, last_error = :error
 WHERE id = :id;

-- name: next_delivery_due
-- When the soonest pending webhook is due (NULL when none is pending).
SELECT min(max(next_at, coalesce(lease_until, 0))) FROM deliveries WHERE state = 'pending';

-- name: remove_expired
-- Remove finished tasks kept only for their image links, once the links have expired.
DELETE FROM tasks INDEXED BY tasks_link_expiry WHERE keep_for IS NOT NULL AND finished_at < :now - keep_for
   AND status IN ('done', 'error', 'canceled');

-- name: expire_finished
-- Remember the ids of finished tasks past the retention, before they are removed.
INSERT OR IGNORE INTO expired_tasks (id, expired_at)
SELECT id, :now FROM tasks INDEXED BY tasks_finished
 WHERE finished_at < :before AND status IN ('done', 'error', 'canceled');

-- name: remove_finished
-- Remove finished tasks past the retention (their images and inputs go with them).
DELETE FROM tasks INDEXED BY tasks_finished WHERE finished_at < :before AND status IN ('done', 'error', 'canceled');

-- name: store_bytes
-- Disk bytes that image data takes: each row's overflow pages and its share of a leaf page (db.blob_disk_bytes),
-- so the bound counts what the file holds, not just the payload.
SELECT (SELECT coalesce(sum(disk_bytes(length(data), :page)), 0) FROM images)
     + (SELECT coalesce(sum(disk_bytes(length(data), :page)), 0) FROM task_inputs);

-- name: oldest_finished
-- The oldest finished tasks with the bytes each holds, for the store bound.
SELECT t.id, (SELECT coalesce(sum(disk_bytes(length(data), :page)), 0) FROM images WHERE task_id = t.id)
           + (SELECT coalesce(sum(disk_bytes(length(data), :page)), 0) FROM task_inputs WHERE task_id = t.id) AS bytes
  FROM tasks t INDEXED BY tasks_finished WHERE finished_at IS NOT NULL AND status IN ('done', 'error', 'canceled')
 ORDER BY finished_at LIMIT :limit;

-- name: database_pages
-- The database file's size in pages, and the page size.
SELECT page_count, page_size FROM pragma_page_count(), pragma_page_size();

-- name: fair_tag
-- A new task's fair tag for its key (the later of the virtual time and the key's last end) and the start of the
-- key's backlog; the key's end moves on by the task's forecast seconds.
INSERT INTO fair_keys (key_id, last_finish, backlog_start)
VALUES (:key_id, (SELECT virtual FROM fair_clock WHERE id = 1) + :cost, (SELECT virtual FROM fair_clock WHERE id = 1))
ON CONFLICT (key_id) DO UPDATE SET
    -- SET reads the row as it was: a key whose queued work had all started begins a new backlog now.
    backlog_start = CASE WHEN last_finish <= (SELECT virtual FROM fair_clock WHERE id = 1)
                         THEN (SELECT virtual FROM fair_clock WHERE id = 1) ELSE backlog_start END,
    last_finish = max(last_finish, (SELECT virtual FROM fair_clock WHERE id = 1)) + :cost
RETURNING last_finish - :cost, backlog_start;

-- name: page_size
-- The database's page size, which sets how much disk a blob takes.
SELECT page_size FROM pragma_page_size();
