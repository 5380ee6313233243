-- As SQLite's migration 0015: the LoRAs a task asks for, by library name with their scales (a JSON list of
-- [name, scale]); '' for none, which runs the worker's default set (--lora-paths).
ALTER TABLE tasks ADD COLUMN loras text NOT NULL DEFAULT '';
