-- As SQLite's migration 0017: the LoRA set a worker holds now ('' for its default set).
ALTER TABLE workers ADD COLUMN loras text NOT NULL DEFAULT '';
