-- Whether a task's images leave its prompt out of their metadata (the request's private, or the server's
-- --metadata-prompts false); the AI-generated marking is written either way.
ALTER TABLE tasks ADD COLUMN private INTEGER NOT NULL DEFAULT 0;
