-- Every statement about the queue, by name. store.py loads them once.

-- name: insert_task
INSERT INTO tasks (id, priority, model, prompt, width, height, steps, guidance, seed, count,
                   format, quality, created_at)
VALUES (:id, :priority, :model, :prompt, :width, :height, :steps, :guidance, :seed, :count,
        :format, :quality, :created_at)
RETURNING seq;

-- name: get_task
SELECT * FROM tasks WHERE id = ?;

-- name: claim_next
UPDATE tasks
   SET status = 'processing', worker_id = :worker_id, started_at = :now, attempts = attempts + 1,
       image_index = 0, step = 0, step_at = :now, engine = :engine, error = NULL
 WHERE seq = (SELECT seq FROM tasks
               WHERE status = 'waiting' AND model = :model
               ORDER BY priority DESC, seq
               LIMIT 1)
RETURNING *;

-- name: record_progress
UPDATE tasks SET image_index = :image_index, step = :step, step_at = :step_at
 WHERE id = :id AND worker_id = :worker_id AND status = 'processing';

-- name: still_mine
SELECT 1 FROM tasks WHERE id = :id AND worker_id = :worker_id AND status = 'processing';

-- name: insert_image
INSERT INTO images (task_id, idx, seed, mime, data, gen_started, gen_ended)
VALUES (:task_id, :idx, :seed, :mime, :data, :gen_started, :gen_ended);

-- name: mark_done
UPDATE tasks SET status = 'done', finished_at = :now, image_index = count - 1, step = steps
 WHERE id = :id AND worker_id = :worker_id AND status = 'processing';

-- name: mark_error
UPDATE tasks SET status = 'error', finished_at = :now, error = :error
 WHERE id = :id AND worker_id = :worker_id AND status = 'processing';

-- name: release_task
UPDATE tasks SET status = 'waiting', worker_id = NULL, started_at = NULL, step = 0, image_index = 0,
                 step_at = NULL, attempts = MAX(attempts - 1, 0)
 WHERE id = :id AND worker_id = :worker_id AND status = 'processing';

-- name: record_timing
INSERT INTO timing_stats (model, width, height, kind, n, total, total_sq, updated_at)
VALUES (:model, :width, :height, :kind, :n, :total, :total_sq, :now)
ON CONFLICT (model, width, height, kind) DO UPDATE
   SET n = n + excluded.n, total = total + excluded.total,
       total_sq = total_sq + excluded.total_sq, updated_at = excluded.updated_at;

-- name: timing_stats
SELECT model, width, height, kind, n, total, total_sq FROM timing_stats;

-- name: timing_version
SELECT COALESCE(MAX(updated_at), 0) AS version, COUNT(*) AS rows FROM timing_stats;

-- name: cancel_task
UPDATE tasks SET status = 'canceled', finished_at = :now
 WHERE id = :id AND status IN ('waiting', 'processing')
RETURNING status;

-- name: delete_task
DELETE FROM tasks WHERE id = ?;

-- name: get_image
SELECT idx, seed, mime, data FROM images WHERE task_id = ? AND idx = ?;

-- name: mark_served
UPDATE images SET served = 1 WHERE task_id = ? AND idx = ?;

-- name: unserved_count
SELECT COUNT(*) FROM images WHERE task_id = ? AND served = 0;

-- name: list_tasks
SELECT * FROM tasks
 WHERE (:status IS NULL OR status = :status)
 ORDER BY CASE status WHEN 'processing' THEN 0 WHEN 'waiting' THEN 1 ELSE 2 END,
          CASE WHEN status IN ('waiting', 'processing') THEN -priority ELSE 0 END,
          CASE WHEN status IN ('waiting', 'processing') THEN seq ELSE -seq END
 LIMIT :limit OFFSET :offset;

-- name: count_tasks
SELECT COUNT(*) FROM tasks WHERE (:status IS NULL OR status = :status);

-- name: status_counts
SELECT status, COUNT(*) AS n FROM tasks GROUP BY status;

-- name: running_tasks
SELECT * FROM tasks WHERE status = 'processing' ORDER BY started_at;

-- name: waiting_queue
-- Every waiting task in claim order, read from the tasks_queue index alone.
SELECT model, priority, seq, width, height, steps, count FROM tasks
 WHERE status = 'waiting'
 ORDER BY priority DESC, seq;

-- name: waiting_front
-- The first task in claim order that is still waiting, among those up to seq: everything of a queue
-- snapshot ahead of it has been claimed (or canceled) since the snapshot was read.
SELECT priority, seq FROM tasks
 WHERE status = 'waiting' AND model = :model AND seq <= :seq
 ORDER BY priority DESC, seq
 LIMIT 1;

-- name: max_seq
SELECT COALESCE(MAX(seq), 0) FROM tasks;

-- name: arrivals_since
-- Tasks submitted after a sequence number (any status): the arrival stream, a range read on the rowid.
SELECT seq, model, priority, width, height, steps, count, created_at FROM tasks
 WHERE seq > :seq AND created_at >= :since
 ORDER BY seq;

-- name: queue_changes
SELECT changes FROM queue_state WHERE id = 1;

-- name: waiting_since
-- Waiting tasks newer than a snapshot: a range read on the rowid. The unary + keeps SQLite from
-- preferring the status index, which would scan every waiting task.
SELECT model, priority, seq, width, height, steps, count FROM tasks
 WHERE seq > :seq AND +status = 'waiting' AND +model = :model;

-- name: register_worker
INSERT INTO workers (id, hostname, pid, engine, model, quantize, started_at, heartbeat_at)
VALUES (:id, :hostname, :pid, :engine, :model, :quantize, :now, :now);

-- name: heartbeat
UPDATE workers SET heartbeat_at = :now WHERE id = :id;

-- name: stop_worker
UPDATE workers SET stopped_at = :now WHERE id = :id;

-- name: live_workers
SELECT * FROM workers WHERE stopped_at IS NULL AND heartbeat_at >= :since ORDER BY started_at;

-- name: held_tasks
-- Tasks held by a worker, with what we know of that worker's liveness.
SELECT t.id, t.attempts, t.worker_id, w.hostname, w.pid, w.heartbeat_at, w.stopped_at
  FROM tasks t LEFT JOIN workers w ON w.id = t.worker_id
 WHERE t.status = 'processing';

-- name: requeue_orphan
UPDATE tasks SET status = 'waiting', worker_id = NULL, started_at = NULL, step = 0, image_index = 0,
                 step_at = NULL
 WHERE id = :id AND worker_id = :worker_id AND status = 'processing';

-- name: fail_orphan
UPDATE tasks SET status = 'error', finished_at = :now, error = :error
 WHERE id = :id AND worker_id = :worker_id AND status = 'processing';

-- name: forget_old_workers
DELETE FROM workers WHERE heartbeat_at < :before
   AND id NOT IN (SELECT worker_id FROM tasks WHERE status = 'processing' AND worker_id IS NOT NULL);
