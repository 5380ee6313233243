-- ControlNet and depth: a task's control settings (a JSON object of type, strength and preprocess; '' for
-- none), and 'control' as an input role for its control image. SQLite cannot alter a CHECK, so task_inputs
-- is rebuilt with its rows, as in 0005.
ALTER TABLE tasks ADD COLUMN control TEXT NOT NULL DEFAULT '';
CREATE TABLE task_inputs_new (
    task_id  TEXT    NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    role     TEXT    NOT NULL CHECK (role IN ('image', 'image2', 'image3', 'image4', 'mask', 'control')),
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
