-- The LoRA set a worker holds now (tasks.loras' text; '' for its default set), so the forecast charges a
-- change of set only to a task whose set no worker holds.
ALTER TABLE workers ADD COLUMN loras TEXT NOT NULL DEFAULT '';
