-- As SQLite's migration 0021: whether a stored image carries signed C2PA Content Credentials.
ALTER TABLE images ADD COLUMN credentials integer NOT NULL DEFAULT 0;
