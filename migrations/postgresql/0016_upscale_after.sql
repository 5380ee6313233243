-- As SQLite's migration 0024: a generate request's upscale, and the upscale tasks it queued.
ALTER TABLE tasks ADD COLUMN then_upscale text NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN upscales_task text;
ALTER TABLE tasks ADD COLUMN upscales_index integer;
CREATE INDEX tasks_upscales ON tasks (upscales_task) WHERE upscales_task IS NOT NULL;
