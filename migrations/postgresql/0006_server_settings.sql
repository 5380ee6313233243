-- As SQLite's migration 0014: settings the API changes at run time and every server process shares (the default
-- model POST /api/load sets).
CREATE TABLE server_settings (
    name text PRIMARY KEY,
    value text NOT NULL
);
