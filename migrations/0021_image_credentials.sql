-- Whether a stored image carries signed C2PA Content Credentials (1) or not (0: its worker runs with --c2pa false),
-- so a task's view says what each of its images carries without reading the images.
ALTER TABLE images ADD COLUMN credentials INTEGER NOT NULL DEFAULT 0;
