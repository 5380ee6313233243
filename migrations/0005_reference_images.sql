-- Edits with several reference images (Qwen-Image-Edit, FLUX.2 klein edit): roles image2..image4 after
-- 'image'. SQLite cannot alter a CHECK, so the table is rebuilt with its rows.
CREATE TABLE task_inputs_new (
    task_id  TEXT    NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    role     TEXT    NOT NULL CHECK (role IN ('image', 'image2', 'image3', 'image4', 'mask')),
    mime     TEXT    NOT NULL,
    width    INTEGER NOT NULL,
    height   INTEGER NOT NULL,
    data     BLOB    NOT NULL,
    PRIMARY KEY (task_id, role)
) WITHOUT ROWID;
INSERT INTO task_inputs_new (task_id, role, mime, width, height, data)
SELECT task_id, role, mime, width, height, data FROM task_inputs;
DROP TABLE task_inputs;
ALTER TABLE task_inputs_new RENAME TO task_inputs;
