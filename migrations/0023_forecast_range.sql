-- The range a task was given at submit beside its forecast: the forecast checks its recent ranges against what
-- the tasks took, and widens or narrows the next ones so that about four in five finish inside (conformal).
ALTER TABLE tasks ADD COLUMN forecast_low REAL;
ALTER TABLE tasks ADD COLUMN forecast_high REAL;
