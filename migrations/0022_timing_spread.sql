-- The sum of squared seconds again (migration 0002 dropped it when nothing read it): the forecast's range
-- comes from the spread of measured times around the fitted cost. Rows from before carry no spread (their
-- sum of squares is set as if every sample equalled the mean); new samples bring theirs.
ALTER TABLE timing_stats ADD COLUMN total_sq REAL NOT NULL DEFAULT 0;
UPDATE timing_stats SET total_sq = total * total / n WHERE n > 0;
