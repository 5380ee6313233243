-- How many input images a task was submitted with, on its own row: the worker reads task_inputs only for a task
-- that has some (most have none), a round trip fewer between two generations on PostgreSQL.
ALTER TABLE tasks ADD COLUMN input_count INTEGER NOT NULL DEFAULT 0;
UPDATE tasks SET input_count = (SELECT count(*) FROM task_inputs WHERE task_id = tasks.id)
 WHERE id IN (SELECT task_id FROM task_inputs);
