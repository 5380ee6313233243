-- The largest image a worker runs is per model: each model's memory need sets it, and an out-of-memory
-- failure lowers it for the model that failed. Comma-separated model=pixels; max_pixels stays the operator's cap.
ALTER TABLE workers ADD COLUMN pixel_limits TEXT NOT NULL DEFAULT '';
