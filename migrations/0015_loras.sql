-- The LoRAs a task asks for, by library name with their scales (a JSON list of [name, scale]); '' for none,
-- which runs the worker's default set (--lora-paths).
ALTER TABLE tasks ADD COLUMN loras TEXT NOT NULL DEFAULT '';
