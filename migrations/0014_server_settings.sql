-- Settings the API changes at run time and every server process shares: the default model that POST /api/load
-- (the original mflux-server's model switch) sets for requests that name none.
CREATE TABLE server_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
