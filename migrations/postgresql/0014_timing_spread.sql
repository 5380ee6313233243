-- As SQLite's migration 0022: the sum of squared seconds, for the spread behind the forecast's range.
ALTER TABLE timing_stats ADD COLUMN total_sq double precision NOT NULL DEFAULT 0;
UPDATE timing_stats SET total_sq = total * total / n WHERE n > 0;
