-- As SQLite's migration 0019: the strength of each image prompt of a variation ('' for the default).
ALTER TABLE tasks ADD COLUMN image_strengths text NOT NULL DEFAULT '';
