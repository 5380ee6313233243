-- The sum of squared seconds was written with every timing and never read: the forecast fits means.
ALTER TABLE timing_stats DROP COLUMN total_sq;
