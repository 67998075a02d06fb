-- SQLite has no LISTEN/NOTIFY. A process that publishes a notification while nobody in it listens (a
-- command such as `proctor heads add`) leaves it here; the server process reads new rows every second.
CREATE TABLE notifications (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT    NOT NULL,
    payload TEXT    NOT NULL,
    at      TEXT    NOT NULL
);
CREATE INDEX notifications_at ON notifications (at);
