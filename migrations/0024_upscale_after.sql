-- A generate request's `upscale`: the upscale each of its images gets once it is done (then_upscale, JSON; ''
-- for none), and on each upscale task so queued, the task and image it enlarges.
ALTER TABLE tasks ADD COLUMN then_upscale TEXT NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN upscales_task TEXT;
ALTER TABLE tasks ADD COLUMN upscales_index INTEGER;
CREATE INDEX tasks_upscales ON tasks (upscales_task) WHERE upscales_task IS NOT NULL;
