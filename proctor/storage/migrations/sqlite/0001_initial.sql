-- Proctor schema, version 1 (SQLite). Times are UTC text 'YYYY-MM-DDTHH:MM:SS.ffffffZ' so they sort as text.
CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT    NOT NULL UNIQUE,
    full_name     TEXT    NOT NULL DEFAULT '',
    role          TEXT    NOT NULL CHECK (role IN ('admin', 'teacher', 'student')),
    active        INTEGER NOT NULL DEFAULT 1,
    password_hash TEXT    NOT NULL,
    created_at    TEXT    NOT NULL
);

CREATE TABLE heads (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT    NOT NULL UNIQUE,
    program       TEXT    NOT NULL,
    description   TEXT    NOT NULL DEFAULT '',
    threshold     REAL    NOT NULL CHECK (threshold >= 0 AND threshold <= 1),
    backbone_hash TEXT    NOT NULL,
    metrics       TEXT    NOT NULL DEFAULT '{}',
    active        INTEGER NOT NULL DEFAULT 1,
    weights       BLOB    NOT NULL,
    created_at    TEXT    NOT NULL
);

CREATE TABLE exams (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT    NOT NULL,
    owner_id      INTEGER NOT NULL REFERENCES users (id),
    allowed_heads TEXT    NOT NULL DEFAULT '[]',
    state         TEXT    NOT NULL DEFAULT 'draft' CHECK (state IN ('draft', 'running', 'ended')),
    join_code     TEXT    NOT NULL UNIQUE,
    created_at    TEXT    NOT NULL,
    started_at    TEXT,
    ended_at      TEXT,
    purged_at     TEXT
);
CREATE INDEX exams_owner ON exams (owner_id);
CREATE INDEX exams_state ON exams (state, ended_at);

CREATE TABLE roster (
    exam_id INTEGER NOT NULL REFERENCES exams (id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users (id),
    PRIMARY KEY (exam_id, user_id)
);
CREATE INDEX roster_user ON roster (user_id);

CREATE TABLE alerts (
    id           TEXT    PRIMARY KEY,
    exam_id      INTEGER NOT NULL REFERENCES exams (id) ON DELETE CASCADE,
    student_id   INTEGER NOT NULL REFERENCES users (id),
    opened_at    TEXT    NOT NULL,
    closed_at    TEXT,
    verdict      TEXT    NOT NULL,
    program      TEXT,
    scores       TEXT    NOT NULL,
    evidence     BLOB    NOT NULL,
    review_state TEXT    NOT NULL DEFAULT 'new' CHECK (review_state IN ('new', 'reviewed', 'false_positive')),
    review_note  TEXT    NOT NULL DEFAULT '',
    reviewer_id  INTEGER REFERENCES users (id)
);
CREATE INDEX alerts_exam ON alerts (exam_id, student_id, opened_at);

CREATE TABLE session_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    exam_id    INTEGER NOT NULL REFERENCES exams (id) ON DELETE CASCADE,
    student_id INTEGER NOT NULL REFERENCES users (id),
    kind       TEXT    NOT NULL,
    at         TEXT    NOT NULL,
    detail     TEXT    NOT NULL DEFAULT '{}'
);
-- The same event of the same student at the same microsecond is a retried write: stored once.
CREATE UNIQUE INDEX session_events_once ON session_events (exam_id, student_id, kind, at);

CREATE TABLE audit_log (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    actor_id INTEGER REFERENCES users (id),
    action   TEXT    NOT NULL,
    target   TEXT    NOT NULL DEFAULT '',
    detail   TEXT    NOT NULL DEFAULT '{}',
    at       TEXT    NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);

CREATE TABLE samples (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    label      TEXT    NOT NULL,
    jpeg       BLOB    NOT NULL,
    source     TEXT    NOT NULL,
    created_at TEXT    NOT NULL
);
CREATE INDEX samples_label ON samples (label);
