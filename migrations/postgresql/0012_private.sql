-- As SQLite's migration 0020: whether a task's images leave its prompt out of their metadata.
ALTER TABLE tasks ADD COLUMN private integer NOT NULL DEFAULT 0;
