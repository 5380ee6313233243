-- The PostgreSQL store's schema: the same tables, columns and trigger behaviour as SQLite's migrations 0001-0011,
-- in one step. Integers that can outgrow 32 bits are bigint; REAL is double precision; BLOB is bytea.
-- Triggers are plpgsql functions; each also NOTIFYs channel 'mflux', which wakes idle workers, event streams and
-- the forecast (delivered at commit, once per transaction).

CREATE FUNCTION mflux_now() RETURNS double precision LANGUAGE sql AS
$$ SELECT extract(epoch FROM clock_timestamp())::double precision $$;

CREATE TABLE tasks (
    seq              bigserial PRIMARY KEY,        -- claim order within a priority; never reused
    id               text    NOT NULL UNIQUE,      -- random, unguessable public id
    status           text    NOT NULL DEFAULT 'waiting'
                     CHECK (status IN ('waiting', 'processing', 'done', 'error', 'canceled')),
    priority         integer NOT NULL DEFAULT 0,
    model            text    NOT NULL,
    prompt           text    NOT NULL,
    width            integer NOT NULL,
    height           integer NOT NULL,
    steps            integer NOT NULL,
    guidance         double precision NOT NULL,
    seed             bigint  NOT NULL,
    count            integer NOT NULL DEFAULT 1,
    format           text    NOT NULL,
    quality          integer NOT NULL,
    created_at       double precision NOT NULL,
    started_at       double precision,
    finished_at      double precision,
    worker_id        text,
    attempts         integer NOT NULL DEFAULT 0,
    image_index      integer NOT NULL DEFAULT 0,
    step             integer NOT NULL DEFAULT 0,
    step_at          double precision,
    engine           text,
    error            text,
    negative_prompt  text,
    image_strength   double precision,
    guidance_auto    integer NOT NULL DEFAULT 0,
    surface          text    NOT NULL DEFAULT 'native' CHECK (surface IN ('native', 'openai', 'acedata', 'nebula')),
    callback_url     text,
    link_base        text,
    keep_for         double precision,
    client_user      text,
    key_id           bigint,
    forecast_seconds double precision,
    fair_tag         double precision NOT NULL DEFAULT 0,
    fair_start       double precision NOT NULL DEFAULT 0
);
CREATE INDEX tasks_fair_queue ON tasks (status, model, priority DESC, fair_tag, fair_start DESC, seq);
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX tasks_link_expiry ON tasks (finished_at) WHERE keep_for IS NOT NULL;
CREATE INDEX tasks_owner ON tasks (key_id, status);
CREATE INDEX tasks_queue ON tasks (status, priority DESC, seq) INCLUDE (model, width, height, steps, count, created_at,
                                                                       fair_tag, fair_start);

CREATE TABLE images (
    task_id     text    NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    idx         integer NOT NULL,
    seed        bigint  NOT NULL,
    mime        text    NOT NULL,
    data        bytea   NOT NULL,
    served      integer NOT NULL DEFAULT 0,
    gen_started double precision NOT NULL,
    gen_ended   double precision NOT NULL,
    PRIMARY KEY (task_id, idx)
);

CREATE TABLE task_inputs (
    task_id  text    NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    role     text    NOT NULL CHECK (role IN ('image', 'image2', 'image3', 'image4', 'mask')),
    mime     text    NOT NULL,
    width    integer NOT NULL,
    height   integer NOT NULL,
    data     bytea   NOT NULL,
    PRIMARY KEY (task_id, role)
);

CREATE TABLE previews (
    task_id  text    PRIMARY KEY REFERENCES tasks (id) ON DELETE CASCADE,
    image    integer NOT NULL,
    step     integer NOT NULL,
    mime     text    NOT NULL,
    data     bytea   NOT NULL,
    at       double precision NOT NULL
);

CREATE TABLE timing_stats (
    model       text    NOT NULL,
    width       integer NOT NULL,
    height      integer NOT NULL,
    kind        text    NOT NULL CHECK (kind IN ('step', 'before', 'after', 'encode')),
    n           bigint  NOT NULL,
    total       double precision NOT NULL,
    updated_at  double precision NOT NULL,
    PRIMARY KEY (model, width, height, kind)
);

CREATE TABLE load_stats (
    model       text    PRIMARY KEY,
    n           bigint  NOT NULL,
    total       double precision NOT NULL,
    last        double precision NOT NULL,
    updated_at  double precision NOT NULL
);

CREATE TABLE workers (
    id            text    PRIMARY KEY,
    hostname      text    NOT NULL,
    pid           integer NOT NULL,
    engine        text    NOT NULL,
    model         text    NOT NULL,
    quantize      integer,
    started_at    double precision NOT NULL,
    heartbeat_at  double precision NOT NULL,
    stopped_at    double precision,
    models        text    NOT NULL DEFAULT '',
    max_pixels    bigint,
    loading       text,
    affinity_wait double precision,
    pixel_limits  text    NOT NULL DEFAULT ''
);

CREATE TABLE queue_state (
    id       integer PRIMARY KEY CHECK (id = 1),
    changes  bigint  NOT NULL
);
INSERT INTO queue_state (id, changes) VALUES (1, 0);

CREATE TABLE events (
    id       bigserial PRIMARY KEY,
    task_id  text    NOT NULL,
    kind     text    NOT NULL CHECK (kind IN ('status', 'progress', 'preview', 'done', 'error', 'deleted')),
    data     text    NOT NULL,
    at       double precision NOT NULL
);
CREATE INDEX events_at ON events (at);
CREATE INDEX events_task ON events (task_id, id);

CREATE TABLE deliveries (
    id            text    PRIMARY KEY,
    task_id       text    NOT NULL,
    url           text    NOT NULL,
    surface       text    NOT NULL,
    task          text    NOT NULL,
    state         text    NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    next_at       double precision NOT NULL,
    lease_until   double precision,
    last_status   integer,
    last_error    text,
    created_at    double precision NOT NULL,
    delivered_at  double precision
);
CREATE INDEX deliveries_due ON deliveries (state, next_at);
CREATE INDEX deliveries_task ON deliveries (task_id);

CREATE TABLE server_secrets (
    name   text PRIMARY KEY,
    value  text NOT NULL
);

CREATE TABLE api_keys (
    id            bigserial PRIMARY KEY,
    name          text    NOT NULL UNIQUE,
    hash          text    NOT NULL UNIQUE,
    admin         integer NOT NULL DEFAULT 0,
    priority      integer NOT NULL DEFAULT 0,
    created_at    double precision NOT NULL,
    last_used_at  double precision,
    revoked_at    double precision
);

CREATE TABLE idempotency (
    key_id     bigint  NOT NULL DEFAULT 0,
    idem_key   text    NOT NULL,
    body_hash  text    NOT NULL,
    task_id    text    NOT NULL,
    created_at double precision NOT NULL,
    PRIMARY KEY (key_id, idem_key)
);
CREATE INDEX idempotency_age ON idempotency (created_at);

CREATE TABLE expired_tasks (
    id          text PRIMARY KEY,
    expired_at  double precision NOT NULL
);
CREATE INDEX expired_tasks_age ON expired_tasks (expired_at);

CREATE TABLE rate_windows (
    key_id    bigint  NOT NULL,
    "window"  bigint  NOT NULL,
    count     bigint  NOT NULL,
    PRIMARY KEY (key_id, "window")
);

CREATE TABLE metric_bounds (
    name  text NOT NULL,
    le    double precision NOT NULL,
    PRIMARY KEY (name, le)
);
INSERT INTO metric_bounds (name, le) VALUES
    ('forecast_ratio', 0.25),
    ('forecast_ratio', 0.5),
    ('forecast_ratio', 0.75),
    ('forecast_ratio', 0.9),
    ('forecast_ratio', 1.0),
    ('forecast_ratio', 1.1),
    ('forecast_ratio', 1.25),
    ('forecast_ratio', 1.5),
    ('forecast_ratio', 2.0),
    ('forecast_ratio', 4.0),
    ('forecast_ratio', 'Infinity'),
    ('generation_seconds', 0.25),
    ('generation_seconds', 0.5),
    ('generation_seconds', 1.0),
    ('generation_seconds', 2.0),
    ('generation_seconds', 5.0),
    ('generation_seconds', 10.0),
    ('generation_seconds', 20.0),
    ('generation_seconds', 30.0),
    ('generation_seconds', 60.0),
    ('generation_seconds', 120.0),
    ('generation_seconds', 300.0),
    ('generation_seconds', 600.0),
    ('generation_seconds', 'Infinity'),
    ('queue_wait_seconds', 0.1),
    ('queue_wait_seconds', 1.0),
    ('queue_wait_seconds', 5.0),
    ('queue_wait_seconds', 10.0),
    ('queue_wait_seconds', 30.0),
    ('queue_wait_seconds', 60.0),
    ('queue_wait_seconds', 120.0),
    ('queue_wait_seconds', 300.0),
    ('queue_wait_seconds', 600.0),
    ('queue_wait_seconds', 1800.0),
    ('queue_wait_seconds', 3600.0),
    ('queue_wait_seconds', 'Infinity'),
    ('step_seconds', 0.01),
    ('step_seconds', 0.05),
    ('step_seconds', 0.1),
    ('step_seconds', 0.25),
    ('step_seconds', 0.5),
    ('step_seconds', 1.0),
    ('step_seconds', 2.0),
    ('step_seconds', 5.0),
    ('step_seconds', 10.0),
    ('step_seconds', 30.0),
    ('step_seconds', 'Infinity');

CREATE TABLE metric_buckets (
    name   text    NOT NULL,
    model  text    NOT NULL,
    le     double precision NOT NULL,
    count  bigint  NOT NULL,
    PRIMARY KEY (name, model, le)
);

CREATE TABLE metric_sums (
    name   text    NOT NULL,
    model  text    NOT NULL,
    sum    double precision NOT NULL,
    count  bigint  NOT NULL,
    PRIMARY KEY (name, model)
);

CREATE TABLE metric_counters (
    name   text    NOT NULL,
    label  text    NOT NULL,
    value  bigint  NOT NULL,
    PRIMARY KEY (name, label)
);

CREATE TABLE fair_clock (
    id        integer PRIMARY KEY CHECK (id = 1),
    virtual   double precision NOT NULL,
    last_tag  double precision NOT NULL
);
INSERT INTO fair_clock (id, virtual, last_tag) VALUES (1, 0, 0);

CREATE TABLE fair_keys (
    key_id         bigint PRIMARY KEY,
    last_finish    double precision NOT NULL,
    backlog_start  double precision NOT NULL
);

-- Trigger helpers

CREATE FUNCTION mflux_event(task text, what text, body json, at double precision) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO events (task_id, kind, data, at) VALUES (task, what, body::text, at);
    PERFORM pg_notify('mflux', 'event');
END $$;

CREATE FUNCTION mflux_observe(metric text, of_model text, observed double precision) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- A model's buckets are made once; checking first is cheaper than a dozen refused inserts every time.
    IF NOT EXISTS (SELECT 1 FROM metric_sums WHERE name = metric AND model = of_model) THEN
        INSERT INTO metric_buckets (name, model, le, count)
            SELECT metric, of_model, le, 0 FROM metric_bounds WHERE name = metric
            ON CONFLICT DO NOTHING;
    END IF;
    UPDATE metric_buckets SET count = count + 1 WHERE name = metric AND model = of_model AND le >= observed;
    INSERT INTO metric_sums (name, model, sum, count) VALUES (metric, of_model, observed, 1)
        ON CONFLICT (name, model) DO UPDATE SET sum = metric_sums.sum + excluded.sum, count = metric_sums.count + 1;
END $$;

CREATE FUNCTION mflux_count(counter text, of_label text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO metric_counters (name, label, value) VALUES (counter, of_label, 1)
        ON CONFLICT (name, label) DO UPDATE SET value = metric_counters.value + 1;
END $$;

-- What SQLite's tasks triggers do (events, queue_state, previews, fair clock, metrics, the webhook outbox).

CREATE FUNCTION mflux_tasks_changed() RETURNS trigger LANGUAGE plpgsql AS $$
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
        IF (OLD.status = 'waiting') != (NEW.status = 'waiting') THEN
            UPDATE queue_state SET changes = changes + 1 WHERE id = 1;
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
CREATE TRIGGER tasks_changed AFTER INSERT OR UPDATE OR DELETE ON tasks
    FOR EACH ROW EXECUTE FUNCTION mflux_tasks_changed();

CREATE FUNCTION mflux_preview_saved() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM mflux_event(NEW.task_id, 'preview', json_build_object('image', NEW.image, 'step', NEW.step), NEW.at);
    RETURN NULL;
END $$;
CREATE TRIGGER previews_saved AFTER INSERT OR UPDATE ON previews
    FOR EACH ROW EXECUTE FUNCTION mflux_preview_saved();

CREATE FUNCTION mflux_delivery_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mflux', 'delivery');
    IF TG_OP = 'UPDATE' THEN
        IF NEW.attempts > OLD.attempts THEN
            PERFORM mflux_count('webhook_attempts', '');
        END IF;
        IF NEW.state != OLD.state AND NEW.state IN ('delivered', 'failed') THEN
            PERFORM mflux_count('webhook_deliveries', NEW.state);
        END IF;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER deliveries_changed AFTER INSERT OR UPDATE ON deliveries
    FOR EACH ROW EXECUTE FUNCTION mflux_delivery_changed();
