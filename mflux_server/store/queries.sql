-- The statements both stores run with the same text, by name, each with a one-line description under its name.
-- A statement whose text differs is written once per backend instead, in sqlite/queries.sql and
-- postgresql/queries.sql; query_files.py loads this file and the backend's, and refuses a name defined twice.

-- name: insert_task
-- Queue a new waiting task; its seq (AUTOINCREMENT, never reused) orders it within its priority.
INSERT INTO tasks (id, priority, model, prompt, width, height, steps, guidance, seed, count,
                   format, quality, created_at, negative_prompt, image_strength, guidance_auto,
                   surface, callback_url, link_base, keep_for, client_user, key_id, fair_tag, fair_start,
                   input_count, loras, control, image_strengths, private, then_upscale, upscales_task,
                   upscales_index)
VALUES (:id, :priority, :model, :prompt, :width, :height, :steps, :guidance, :seed, :count,
        :format, :quality, :created_at, :negative_prompt, :image_strength, :guidance_auto,
        :surface, :callback_url, :link_base, :keep_for, :client_user, :key_id, :fair_tag, :fair_start,
        :input_count, :loras, :control, :image_strengths, :private, :then_upscale, :upscales_task,
        :upscales_index)
RETURNING *;

-- name: upscale_tasks_of
-- The upscale tasks a done task's then_upscale queued, in the order of its images.
SELECT id FROM tasks WHERE upscales_task = ? ORDER BY upscales_index;

-- name: insert_input
-- Store an image a task was submitted with (its start image or reference, or its mask).
INSERT INTO task_inputs (task_id, role, mime, width, height, data)
VALUES (:task_id, :role, :mime, :width, :height, :data);

-- name: task_inputs
-- The images a task was submitted with.
SELECT role, mime, width, height, data FROM task_inputs WHERE task_id = ? ORDER BY role;

-- name: fail_waiting
-- Fail every waiting task of a model (one no worker can load), with a message for the client.
UPDATE tasks SET status = 'error', finished_at = :now, error = :error
 WHERE status = 'waiting' AND model = :model;

-- name: fail_unserved
-- Fail a model's waiting tasks queued before :before, while workers run and none serves that model.
UPDATE tasks SET status = 'error', finished_at = :now, error = :error
 WHERE status = 'waiting' AND model = :model AND created_at <= :before;

-- name: get_task
-- One task by its public id.
SELECT * FROM tasks WHERE id = ?;

-- name: record_progress
-- Publish the image and step a worker has reached, only while the task is still its own.
UPDATE tasks SET image_index = :image_index, step = :step, step_at = :step_at
 WHERE id = :id AND worker_id = :worker_id AND status = 'processing';

-- name: still_mine
-- Whether a task is still processing under this worker (not canceled, not recovered by another).
SELECT 1 FROM tasks WHERE id = :id AND worker_id = :worker_id AND status = 'processing';

-- name: insert_image_if_mine
-- Store one encoded image of a task, if the task is still processing under this worker.
INSERT INTO images (task_id, idx, seed, mime, data, gen_started, gen_ended, credentials)
SELECT :task_id, :idx, :seed, :mime, :data, :gen_started, :gen_ended, :credentials
 WHERE EXISTS (SELECT 1 FROM tasks WHERE id = :task_id AND worker_id = :worker_id AND status = 'processing');

-- name: mark_done
-- Finish a task this worker holds, with its progress at the end.
UPDATE tasks SET status = 'done', finished_at = :now, image_index = count - 1, step = steps
 WHERE id = :id AND worker_id = :worker_id AND status = 'processing';

-- name: mark_error
-- Fail a task this worker holds, with a message for the client.
UPDATE tasks SET status = 'error', finished_at = :now, error = :error
 WHERE id = :id AND worker_id = :worker_id AND status = 'processing';

-- name: timing_stat
-- The running totals of one model, size and kind (outliers are judged against their mean).
SELECT n, total FROM timing_stats WHERE model = :model AND width = :width AND height = :height AND kind = :kind;

-- name: timing_stats
-- Every aggregated timing, for fitting the cost model.
SELECT model, width, height, kind, n, total, total_sq FROM timing_stats;

-- name: timing_version
-- A cheap fingerprint of the timing stats: the cost model is refit only when it moves.
SELECT COALESCE(MAX(updated_at), 0) AS version, COUNT(*) AS rows FROM timing_stats;

-- name: cancel_task
-- Cancel a waiting or processing task; a worker running it notices at its next step.
UPDATE tasks SET status = 'canceled', finished_at = :now
 WHERE id = :id AND status IN ('waiting', 'processing');

-- name: delete_task
-- Remove a task; its images go with it (ON DELETE CASCADE).
DELETE FROM tasks WHERE id = ?;

-- name: get_image
-- One stored image of a task.
SELECT idx, seed, mime, data, gen_started, gen_ended, credentials FROM images WHERE task_id = ? AND idx = ?;

-- name: image_credentials
-- Which stored images of a task carry signed Content Credentials, in image order (their bytes are not read).
SELECT idx, credentials FROM images WHERE task_id = ? ORDER BY idx;

-- name: mark_served
-- Note that an image has been sent to a client.
UPDATE images SET served = 1 WHERE task_id = ? AND idx = ?;

-- name: unserved_count
-- Images of a task not yet sent to any client.
SELECT COUNT(*) FROM images WHERE task_id = ? AND served = 0;

-- name: generation_spans
-- When the engine generated each stored image, in order: the duty-cycle benchmark's raw data.
SELECT gen_started, gen_ended FROM images ORDER BY gen_started;

-- name: status_counts
-- Tasks per status.
SELECT status, COUNT(*) AS n FROM tasks GROUP BY status;

-- name: running_tasks
-- Tasks being generated right now, oldest start first.
SELECT * FROM tasks WHERE status = 'processing' ORDER BY started_at;

-- name: waiting_queue
-- Every waiting task in claim order, read from the tasks_queue index alone.
SELECT t.model, t.priority, t.seq, t.width, t.height, t.steps, t.count, t.created_at, t.fair_tag, t.fair_start,
       t.loras
  FROM tasks t
 WHERE t.status = 'waiting'
 ORDER BY t.priority DESC, t.fair_tag, t.fair_start DESC, t.seq;

-- name: waiting_front
-- The first task of a variant (a model and LoRA set) in claim order that is still waiting, among those up to seq:
-- everything of that variant's queue in a snapshot ahead of it has been claimed (or canceled) since the snapshot
-- was read. One lookup in tasks_variant_queue.
SELECT t.priority, t.seq, t.fair_tag, t.fair_start FROM tasks t
 WHERE t.status = 'waiting' AND t.model = :model AND t.loras = :loras AND t.seq <= :seq
 ORDER BY t.priority DESC, t.fair_tag, t.fair_start DESC, t.seq
 LIMIT 1;

-- name: max_seq
-- The newest task's sequence number (0 for an empty queue).
SELECT COALESCE(MAX(seq), 0) FROM tasks;

-- name: arrivals_since
-- Tasks submitted after a sequence number (any status): the arrival stream, a range read on the rowid.
SELECT seq, model, priority, width, height, steps, count, created_at FROM tasks
 WHERE seq > :seq AND created_at >= :since
 ORDER BY seq;

-- name: queue_changes
-- The counter that moves whenever a task leaves or re-enters the waiting set (not on fresh submits).
SELECT changes FROM queue_state WHERE id = 1;

-- name: register_worker
-- Record a worker process under a fresh id, alive as of now.
INSERT INTO workers (id, hostname, pid, engine, model, quantize, started_at, heartbeat_at, models, max_pixels,
                     affinity_wait, pixel_limits)
VALUES (:id, :hostname, :pid, :engine, :model, :quantize, :now, :now, :models, :max_pixels, :affinity_wait,
        :pixel_limits);

-- name: worker_loading
-- Say which model a worker is loading (NULL once loaded), which one it holds (on its default LoRA set), and
-- which it may still serve.
UPDATE workers SET loading = :loading, model = :model, models = :models, loras = '' WHERE id = :id;

-- name: worker_loras
-- Say which LoRA set a worker holds now ('' for its default set).
UPDATE workers SET loras = :loras WHERE id = :id;

-- name: worker_pixel_limits
-- Publish the largest image a worker runs with each model (lowered after it ran out of memory).
UPDATE workers SET pixel_limits = :pixel_limits WHERE id = :id;

-- name: load_stats
-- Every model's measured load times.
SELECT model, n, total, last FROM load_stats;

-- name: heartbeat
-- Tell everyone a worker is alive.
UPDATE workers SET heartbeat_at = :now WHERE id = :id;

-- name: stop_worker
-- Mark a worker as cleanly stopped.
UPDATE workers SET stopped_at = :now WHERE id = :id;

-- name: live_workers
-- Workers that heartbeated since a time and have not stopped, oldest first.
SELECT * FROM workers WHERE stopped_at IS NULL AND heartbeat_at >= :since ORDER BY started_at;

-- name: worker_pids
-- Process ids of the workers on one machine that have not stopped.
SELECT pid FROM workers WHERE hostname = :hostname AND stopped_at IS NULL;

-- name: worker_count
-- Workers ever registered (and not yet forgotten).
SELECT COUNT(*) FROM workers;

-- name: held_tasks
-- Tasks held by a worker, with what we know of that worker's liveness.
SELECT t.id, t.attempts, t.worker_id, w.hostname, w.pid, w.heartbeat_at, w.stopped_at
  FROM tasks t LEFT JOIN workers w ON w.id = t.worker_id
 WHERE t.status = 'processing';

-- name: requeue_orphan
-- Put a dead worker's task back in line; its attempt stays counted.
UPDATE tasks SET status = 'waiting', worker_id = NULL, started_at = NULL, step = 0, image_index = 0,
                 step_at = NULL
 WHERE id = :id AND worker_id = :worker_id AND status = 'processing';

-- name: release_ghosts
-- Put back in line the tasks a live worker is shown running but is not (its claim or completion was lost, or it
-- lost track): not the one it runs, and only once their progress is older than any pending completion's.
UPDATE tasks SET status = 'waiting', worker_id = NULL, started_at = NULL, step = 0, image_index = 0,
                 step_at = NULL
 WHERE worker_id = :worker_id AND status = 'processing' AND id <> :running AND id <> :claimed
   AND step_at < :before
RETURNING id;

-- name: fail_orphan
-- Give up on a task whose workers died too often.
UPDATE tasks SET status = 'error', finished_at = :now, error = :error
 WHERE id = :id AND worker_id = :worker_id AND status = 'processing';

-- name: forget_old_workers
-- Drop workers silent for a long time that hold no task.
DELETE FROM workers WHERE heartbeat_at < :before
   AND id NOT IN (SELECT worker_id FROM tasks WHERE status = 'processing' AND worker_id IS NOT NULL);

-- name: events_after
-- Events newer than an id, oldest first (what a stream has not sent yet).
SELECT id, task_id, kind, data, at FROM events WHERE id > :after ORDER BY id LIMIT :limit;

-- name: task_events_after
-- One task's events newer than an id, oldest first (a stream resuming from Last-Event-ID).
SELECT id, task_id, kind, data, at FROM events WHERE task_id = :task_id AND id > :after ORDER BY id LIMIT :limit;

-- name: last_event_id
-- The newest event's id, 0 when there is none.
SELECT coalesce(max(id), 0) FROM events;

-- name: prune_events
-- Forget events older than the retention (a stream resuming from before it gets the task's current state).
DELETE FROM events WHERE at < :before;

-- name: get_preview
-- A task's latest preview.
SELECT task_id, image, step, mime, data, at FROM previews WHERE task_id = ?;

-- name: delivery_sent
-- A receiver acknowledged a webhook (2xx).
UPDATE deliveries SET state = 'delivered', delivered_at = :now, lease_until = NULL, last_status = :status,
       last_error = NULL
 WHERE id = :id;

-- name: task_deliveries
-- A task's webhooks, for its status.
SELECT * FROM deliveries WHERE task_id = ? ORDER BY created_at;

-- name: get_secret
-- A secret the server generated and keeps.
SELECT value FROM server_secrets WHERE name = ?;

-- name: keep_secret
-- Store a generated secret unless another process stored one first.
INSERT INTO server_secrets (name, value) VALUES (:name, :value) ON CONFLICT (name) DO NOTHING;

-- name: insert_key
-- Record a new API key by its hash.
INSERT INTO api_keys (name, hash, admin, priority, created_at) VALUES (:name, :hash, :admin, :priority, :now)
RETURNING *;

-- name: list_keys
-- Every key, oldest first (hashes stay inside the store).
SELECT * FROM api_keys ORDER BY id;

-- name: revoke_key
-- Revoke a key by name; every server process sees it on its next request.
UPDATE api_keys SET revoked_at = :now WHERE name = :name AND revoked_at IS NULL;

-- name: key_by_hash
-- The live key with this hash, if any.
SELECT * FROM api_keys WHERE hash = ? AND revoked_at IS NULL;

-- name: keys_exist
-- Whether any key was ever created (then every request needs a live one; revoking the last locks the server).
SELECT EXISTS (SELECT 1 FROM api_keys);

-- name: touch_key
-- Note when a key was last used.
UPDATE api_keys SET last_used_at = :now WHERE id = :id;

-- name: find_idempotent
-- The task an Idempotency-Key created within the window, with the hash of the body that created it.
SELECT body_hash, task_id FROM idempotency WHERE key_id = :key_id AND idem_key = :idem_key AND created_at >= :since;

-- name: record_idempotent
-- Remember which task an Idempotency-Key created (in the task's own transaction).
INSERT INTO idempotency (key_id, idem_key, body_hash, task_id, created_at)
VALUES (:key_id, :idem_key, :body_hash, :task_id, :now)
ON CONFLICT (key_id, idem_key) DO UPDATE SET body_hash = excluded.body_hash, task_id = excluded.task_id,
       created_at = excluded.created_at;

-- name: forget_idempotent
-- Forget Idempotency-Keys older than the window.
DELETE FROM idempotency WHERE created_at < :before;

-- name: forget_expired
-- Forget expired ids older than the memory window.
DELETE FROM expired_tasks WHERE expired_at < :before;

-- name: is_expired
-- Whether an id belonged to a task removed by retention.
SELECT 1 FROM expired_tasks WHERE id = ?;

-- name: touch_queue_state
-- A write that changes nothing, to prove the file takes writes (readiness).
UPDATE queue_state SET changes = changes WHERE id = 1;

-- name: unfinished_of_key
-- How many of a key's tasks are waiting or processing, with the upscale tasks they will queue when done.
SELECT coalesce(sum(CASE WHEN then_upscale = '' THEN 1 ELSE 1 + count END), 0)
  FROM tasks WHERE key_id = :key_id AND status IN ('waiting', 'processing');

-- name: histogram_observe
-- Count an observation in every bucket whose bound is at least it (buckets are cumulative).
UPDATE metric_buckets SET count = count + 1 WHERE name = :name AND model = :model AND le >= :value;

-- name: set_forecast
-- Keep the forecast a task was given at submit (for the forecast-error metric and the calibration) and the
-- model's range for it.
UPDATE tasks SET forecast_seconds = :seconds, forecast_low = :low, forecast_high = :high WHERE id = :id
RETURNING status, model, created_at, finished_at;

-- name: recent_forecasts
-- The latest finished tasks' forecasts at submit and their model range's top, with what they took (newest first,
-- by tasks_finished).
SELECT forecast_seconds AS point, finished_at - created_at AS took, forecast_high AS high
  FROM tasks
 WHERE finished_at IS NOT NULL AND status = 'done' AND forecast_seconds > 0
 ORDER BY finished_at DESC
 LIMIT :limit;

-- name: metric_buckets
-- Every histogram bucket, for /metrics.
SELECT name, model, le, count FROM metric_buckets ORDER BY name, model, le;

-- name: metric_sums
-- Every histogram's sum and count, for /metrics.
SELECT name, model, sum, count FROM metric_sums;

-- name: metric_counters
-- Every counter, for /metrics.
SELECT name, label, value FROM metric_counters;

-- name: tasks_by_status_and_model
-- Tasks now, by status and model.
SELECT status, model, count(*) FROM tasks GROUP BY status, model;

-- name: pending_deliveries
-- Webhooks not yet delivered nor given up.
SELECT count(*) FROM deliveries WHERE state = 'pending';

-- name: fifo_tag
-- A new task's tag under first-in first-out scheduling: the largest tag yet, so it queues behind every task.
SELECT last_tag FROM fair_clock WHERE id = 1;

-- name: prune_removed_events
-- Forget the events of tasks that no longer exist, once they are older than a reconnecting stream needs.
DELETE FROM events WHERE at < :before AND NOT EXISTS (SELECT 1 FROM tasks WHERE tasks.id = events.task_id);

-- name: server_setting
-- One setting the API changed at run time, or no row.
SELECT value FROM server_settings WHERE name = :name;

-- name: set_server_setting
-- Change one run-time setting of the API.
INSERT INTO server_settings (name, value) VALUES (:name, :value)
ON CONFLICT (name) DO UPDATE SET value = excluded.value;

-- name: record_timing
-- Add measured seconds of one kind of cost to the running totals of a model and size.
INSERT INTO timing_stats (model, width, height, kind, n, total, total_sq, updated_at)
VALUES (:model, :width, :height, :kind, :n, :total, :total_sq, :now)
ON CONFLICT (model, width, height, kind) DO UPDATE
   SET n = timing_stats.n + excluded.n, total = timing_stats.total + excluded.total,
       total_sq = timing_stats.total_sq + excluded.total_sq, updated_at = excluded.updated_at;

-- name: record_load
-- Add one measured load (and warm-up) of a model to its running totals.
INSERT INTO load_stats (model, n, total, last, updated_at) VALUES (:model, 1, :seconds, :seconds, :now)
ON CONFLICT (model) DO UPDATE
   SET n = load_stats.n + 1, total = load_stats.total + excluded.total, last = excluded.last,
       updated_at = excluded.updated_at;

-- name: histogram_sum
-- Add an observation to a histogram's sum and count.
INSERT INTO metric_sums (name, model, sum, count) VALUES (:name, :model, :value, 1)
ON CONFLICT (name, model) DO UPDATE SET sum = metric_sums.sum + excluded.sum, count = metric_sums.count + 1;

-- name: expire_task
-- Remember one removed task's id as expired.
INSERT INTO expired_tasks (id, expired_at) VALUES (:id, :now) ON CONFLICT DO NOTHING;

-- name: count_request
-- Add a process's requests of a key to its minute, and return the minute's count of every process so far.
INSERT INTO rate_windows (key_id, "window", count) VALUES (:key_id, :window, :n)
ON CONFLICT (key_id, "window") DO UPDATE SET count = rate_windows.count + excluded.count
RETURNING count;

-- name: forget_rate_windows
-- Drop request counts of past minutes.
DELETE FROM rate_windows WHERE "window" < :before;

-- name: histogram_buckets
-- Make a histogram's buckets for a model, once.
INSERT INTO metric_buckets (name, model, le, count)
SELECT :name, :model, le, 0 FROM metric_bounds WHERE name = :name ON CONFLICT DO NOTHING;

-- name: list_tasks
-- A page of tasks: running, then waiting in claim order, then the newest finished.
SELECT * FROM tasks
 WHERE (CAST(:status AS TEXT) IS NULL OR status = :status) AND (CAST(:owner AS BIGINT) IS NULL OR key_id = :owner)
 ORDER BY CASE status WHEN 'processing' THEN 0 WHEN 'waiting' THEN 1 ELSE 2 END,
          CASE WHEN status IN ('waiting', 'processing') THEN -priority ELSE 0 END,
          CASE WHEN status IN ('waiting', 'processing') THEN seq ELSE -seq END
 LIMIT :limit OFFSET :offset;

-- name: count_tasks
-- How many tasks match a listing's status filter.
SELECT COUNT(*) FROM tasks
 WHERE (CAST(:status AS TEXT) IS NULL OR status = :status) AND (CAST(:owner AS BIGINT) IS NULL OR key_id = :owner);

-- name: release_task
-- Put a task this worker holds back in line (graceful stop), uncounting the interrupted attempt.
UPDATE tasks SET status = 'waiting', worker_id = NULL, started_at = NULL, step = 0, image_index = 0,
                 step_at = NULL, attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END
 WHERE id = :id AND worker_id = :worker_id AND status = 'processing';

-- name: note_tag
-- Remember the largest tag given.
UPDATE fair_clock SET last_tag = CASE WHEN last_tag > :tag THEN last_tag ELSE :tag END WHERE id = 1;
