-- As SQLite's migration 0023: the range a task was given at submit, for the forecast's calibration.
ALTER TABLE tasks ADD COLUMN forecast_low double precision;
ALTER TABLE tasks ADD COLUMN forecast_high double precision;
