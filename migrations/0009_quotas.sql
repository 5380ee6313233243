-- Per-key request counts in fixed one-minute windows, shared by every server process through the queue file.
CREATE TABLE rate_windows (
    key_id  INTEGER NOT NULL,
    window  INTEGER NOT NULL,   -- Unix minute
    count   INTEGER NOT NULL,
    PRIMARY KEY (key_id, window)
) WITHOUT ROWID;
