-- Metrics kept where every server process reads the same figures (GET /metrics): counters and histograms
-- written by triggers as tasks start and end, so no writer needs code of its own and deleted tasks still count.
-- Histogram buckets are cumulative (each observation counts in every bucket whose bound is at least it), as
-- Prometheus reads them; the last bound (9e999, +Inf) counts everything.
CREATE TABLE metric_bounds (
    name  TEXT NOT NULL,
    le    REAL NOT NULL,
    PRIMARY KEY (name, le)
) WITHOUT ROWID;
INSERT INTO metric_bounds (name, le) VALUES
    ('generation_seconds', 0.25),
    ('generation_seconds', 0.5),
    ('generation_seconds', 1),
    ('generation_seconds', 2),
    ('generation_seconds', 5),
    ('generation_seconds', 10),
    ('generation_seconds', 20),
    ('generation_seconds', 30),
    ('generation_seconds', 60),
    ('generation_seconds', 120),
    ('generation_seconds', 300),
    ('generation_seconds', 600),
    ('generation_seconds', 9e999),
    ('step_seconds', 0.01),
    ('step_seconds', 0.05),
    ('step_seconds', 0.1),
    ('step_seconds', 0.25),
    ('step_seconds', 0.5),
    ('step_seconds', 1),
    ('step_seconds', 2),
    ('step_seconds', 5),
    ('step_seconds', 10),
    ('step_seconds', 30),
    ('step_seconds', 9e999),
    ('queue_wait_seconds', 0.1),
    ('queue_wait_seconds', 1),
    ('queue_wait_seconds', 5),
    ('queue_wait_seconds', 10),
    ('queue_wait_seconds', 30),
    ('queue_wait_seconds', 60),
    ('queue_wait_seconds', 120),
    ('queue_wait_seconds', 300),
    ('queue_wait_seconds', 600),
    ('queue_wait_seconds', 1800),
    ('queue_wait_seconds', 3600),
    ('queue_wait_seconds', 9e999),
    ('forecast_ratio', 0.25),
    ('forecast_ratio', 0.5),
    ('forecast_ratio', 0.75),
    ('forecast_ratio', 0.9),
    ('forecast_ratio', 1.0),
    ('forecast_ratio', 1.1),
    ('forecast_ratio', 1.25),
    ('forecast_ratio', 1.5),
    ('forecast_ratio', 2),
    ('forecast_ratio', 4),
    ('forecast_ratio', 9e999);

CREATE TABLE metric_buckets (
    name   TEXT    NOT NULL,
    model  TEXT    NOT NULL,
    le     REAL    NOT NULL,
    count  INTEGER NOT NULL,
    PRIMARY KEY (name, model, le)
) WITHOUT ROWID;

CREATE TABLE metric_sums (
    name   TEXT    NOT NULL,
    model  TEXT    NOT NULL,
    sum    REAL    NOT NULL,
    count  INTEGER NOT NULL,
    PRIMARY KEY (name, model)
) WITHOUT ROWID;

CREATE TABLE metric_counters (
    name   TEXT    NOT NULL,
    label  TEXT    NOT NULL,
    value  INTEGER NOT NULL,
    PRIMARY KEY (name, label)
) WITHOUT ROWID;

ALTER TABLE tasks ADD COLUMN forecast_seconds REAL;  -- the forecast at submit (expected_time_seconds)

CREATE TRIGGER metrics_task_started AFTER UPDATE OF status ON tasks
WHEN NEW.status = 'processing' AND OLD.status = 'waiting' AND NEW.attempts = 1 AND NEW.started_at IS NOT NULL
BEGIN
    INSERT OR IGNORE INTO metric_buckets (name, model, le, count)
        SELECT 'queue_wait_seconds', NEW.model, le, 0 FROM metric_bounds WHERE name = 'queue_wait_seconds';
    UPDATE metric_buckets SET count = count + 1 WHERE name = 'queue_wait_seconds' AND model = NEW.model AND le >= (max(0, NEW.started_at - NEW.created_at));
    INSERT INTO metric_sums (name, model, sum, count) VALUES ('queue_wait_seconds', NEW.model, (max(0, NEW.started_at - NEW.created_at)), 1)
        ON CONFLICT (name, model) DO UPDATE SET sum = sum + excluded.sum, count = count + 1;
END;

CREATE TRIGGER metrics_task_done AFTER UPDATE OF status ON tasks
WHEN NEW.status = 'done' AND OLD.status != 'done' AND NEW.started_at IS NOT NULL AND NEW.finished_at IS NOT NULL
BEGIN
    INSERT OR IGNORE INTO metric_buckets (name, model, le, count)
        SELECT 'generation_seconds', NEW.model, le, 0 FROM metric_bounds WHERE name = 'generation_seconds';
    UPDATE metric_buckets SET count = count + 1 WHERE name = 'generation_seconds' AND model = NEW.model AND le >= (max(0, NEW.finished_at - NEW.started_at));
    INSERT INTO metric_sums (name, model, sum, count) VALUES ('generation_seconds', NEW.model, (max(0, NEW.finished_at - NEW.started_at)), 1)
        ON CONFLICT (name, model) DO UPDATE SET sum = sum + excluded.sum, count = count + 1;
END;

CREATE TRIGGER metrics_forecast_ratio AFTER UPDATE OF status ON tasks
WHEN NEW.status = 'done' AND OLD.status != 'done' AND NEW.forecast_seconds > 0 AND NEW.finished_at IS NOT NULL
BEGIN
    INSERT OR IGNORE INTO metric_buckets (name, model, le, count)
        SELECT 'forecast_ratio', NEW.model, le, 0 FROM metric_bounds WHERE name = 'forecast_ratio';
    UPDATE metric_buckets SET count = count + 1 WHERE name = 'forecast_ratio' AND model = NEW.model AND le >= ((NEW.finished_at - NEW.created_at) / NEW.forecast_seconds);
    INSERT INTO metric_sums (name, model, sum, count) VALUES ('forecast_ratio', NEW.model, ((NEW.finished_at - NEW.created_at) / NEW.forecast_seconds), 1)
        ON CONFLICT (name, model) DO UPDATE SET sum = sum + excluded.sum, count = count + 1;
END;

CREATE TRIGGER metrics_task_ended AFTER UPDATE OF status ON tasks
WHEN NEW.status IN ('done', 'error', 'canceled') AND OLD.status != NEW.status
BEGIN
    INSERT INTO metric_counters (name, label, value) VALUES ('tasks_finished', NEW.status, 1)
        ON CONFLICT (name, label) DO UPDATE SET value = value + 1;
END;

CREATE TRIGGER metrics_delivery_ended AFTER UPDATE OF state ON deliveries
WHEN NEW.state != OLD.state AND NEW.state IN ('delivered', 'failed')
BEGIN
    INSERT INTO metric_counters (name, label, value) VALUES ('webhook_deliveries', NEW.state, 1)
        ON CONFLICT (name, label) DO UPDATE SET value = value + 1;
END;

CREATE TRIGGER metrics_delivery_attempt AFTER UPDATE OF attempts ON deliveries
WHEN NEW.attempts > OLD.attempts
BEGIN
    INSERT INTO metric_counters (name, label, value) VALUES ('webhook_attempts', '', 1)
        ON CONFLICT (name, label) DO UPDATE SET value = value + 1;
END;
