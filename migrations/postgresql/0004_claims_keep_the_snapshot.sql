-- As SQLite's migration 0012: a claim no longer moves queue_state's change counter, since the API's queue snapshot
-- corrects for claims by itself; only cancels, deletes, failed waiting tasks and requeues do. A claim then also
-- stops writing that one row, for which every claiming transaction used to wait on the others' commits.
CREATE OR REPLACE FUNCTION mflux_tasks_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mflux', 'queue');
    IF TG_OP = 'INSERT' THEN
        PERFORM mflux_event(NEW.id, 'status', json_build_object('status', NEW.status), NEW.created_at);
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        PERFORM mflux_event(OLD.id, 'deleted', json_build_object('status', 'deleted'), mflux_now());
        IF OLD.status = 'waiting' THEN
            UPDATE queue_state SET changes = changes + 1 WHERE id = 1;
        END IF;
        RETURN NULL;
    END IF;
    IF OLD.status IS DISTINCT FROM NEW.status THEN
        PERFORM mflux_event(NEW.id, CASE NEW.status WHEN 'done' THEN 'done' WHEN 'error' THEN 'error' ELSE 'status' END,
                            json_build_object('status', NEW.status, 'error', NEW.error, 'attempts', NEW.attempts),
                            mflux_now());
        IF (OLD.status = 'waiting') != (NEW.status = 'waiting') AND NOT (OLD.status = 'waiting' AND NEW.status = 'processing') THEN
            UPDATE queue_state SET changes = changes + 1 WHERE id = 1;  -- not on a claim (SQLite's migration 0012)
        END IF;
        IF NEW.status != 'processing' THEN
            DELETE FROM previews WHERE task_id = NEW.id;
        END IF;
        IF NEW.status = 'processing' AND OLD.status = 'waiting' THEN
            UPDATE fair_clock SET virtual = GREATEST(virtual, NEW.fair_tag) WHERE id = 1;
            IF NEW.attempts = 1 AND NEW.started_at IS NOT NULL THEN
                PERFORM mflux_observe('queue_wait_seconds', NEW.model, GREATEST(0, NEW.started_at - NEW.created_at));
            END IF;
        END IF;
        IF NEW.status IN ('done', 'error', 'canceled') THEN
            PERFORM mflux_count('tasks_finished', NEW.status);
            IF NEW.callback_url IS NOT NULL THEN
                INSERT INTO deliveries (id, task_id, url, surface, task, next_at, created_at)
                VALUES ('msg_' || NEW.id, NEW.id, NEW.callback_url, NEW.surface,
                        json_build_object('id', NEW.id, 'status', NEW.status, 'error', NEW.error, 'model', NEW.model,
                                          'prompt', NEW.prompt, 'seed', NEW.seed, 'count', NEW.count,
                                          'width', NEW.width, 'height', NEW.height, 'format', NEW.format,
                                          'created_at', NEW.created_at, 'started_at', NEW.started_at,
                                          'finished_at', NEW.finished_at, 'link_base', NEW.link_base)::text,
                        mflux_now(), mflux_now())
                ON CONFLICT DO NOTHING;
            END IF;
        END IF;
        IF NEW.status = 'done' AND NEW.finished_at IS NOT NULL THEN
            IF NEW.started_at IS NOT NULL THEN
                PERFORM mflux_observe('generation_seconds', NEW.model, GREATEST(0, NEW.finished_at - NEW.started_at));
            END IF;
            IF NEW.forecast_seconds > 0 THEN
                PERFORM mflux_observe('forecast_ratio', NEW.model,
                                      (NEW.finished_at - NEW.created_at) / NEW.forecast_seconds);
            END IF;
        END IF;
    ELSIF NEW.status = 'processing' AND OLD.status = 'processing'
          AND (OLD.step != NEW.step OR OLD.image_index != NEW.image_index) THEN
        PERFORM mflux_event(NEW.id, 'progress', json_build_object('image', NEW.image_index + 1, 'count', NEW.count,
                                                                  'step', NEW.step, 'steps', NEW.steps), mflux_now());
    END IF;
    RETURN NULL;
END $$;
