-- As SQLite's migration 0018: a task's control settings ('' for none) and the 'control' input role.
ALTER TABLE tasks ADD COLUMN control text NOT NULL DEFAULT '';
ALTER TABLE task_inputs DROP CONSTRAINT task_inputs_role_check;
ALTER TABLE task_inputs ADD CONSTRAINT task_inputs_role_check
    CHECK (role IN ('image', 'image2', 'image3', 'image4', 'mask', 'control'));
