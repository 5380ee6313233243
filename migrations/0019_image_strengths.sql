-- Variations (FLUX.1 Redux): the strength of each image prompt, a JSON list in the images' order ('' for the
-- model's default).
ALTER TABLE tasks ADD COLUMN image_strengths TEXT NOT NULL DEFAULT '';
