-- Image inputs (img2img, edit, inpaint), negative prompts, workers that serve several models, load times.

ALTER TABLE tasks ADD COLUMN negative_prompt TEXT;
ALTER TABLE tasks ADD COLUMN image_strength REAL;
-- 1 when the request named no guidance and the model's own default applies (mflux picks it per family).
ALTER TABLE tasks ADD COLUMN guidance_auto INTEGER NOT NULL DEFAULT 0;

-- The images a task was submitted with, checked and normalised at submit; they leave with the task.
CREATE TABLE task_inputs (
    task_id  TEXT    NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    role     TEXT    NOT NULL CHECK (role IN ('image', 'mask')),
    mime     TEXT    NOT NULL,
    width    INTEGER NOT NULL,
    height   INTEGER NOT NULL,
    data     BLOB    NOT NULL,
    PRIMARY KEY (task_id, role)
) WITHOUT ROWID;

-- What a worker may serve (comma-separated; its model column is the one loaded now), the largest image
-- it can run, and how it last measured loading.
ALTER TABLE workers ADD COLUMN models TEXT NOT NULL DEFAULT '';
ALTER TABLE workers ADD COLUMN max_pixels INTEGER;
ALTER TABLE workers ADD COLUMN loading TEXT;  -- the model being loaded right now, if any
-- --max-affinity-wait: how long a task for another model waits before this worker switches for it.
ALTER TABLE workers ADD COLUMN affinity_wait REAL;

-- Seconds to load each model (and warm it up), for the forecast's switch cost.
CREATE TABLE load_stats (
    model       TEXT    PRIMARY KEY,
    n           INTEGER NOT NULL,
    total       REAL    NOT NULL,
    last        REAL    NOT NULL,
    updated_at  REAL    NOT NULL
) WITHOUT ROWID;
