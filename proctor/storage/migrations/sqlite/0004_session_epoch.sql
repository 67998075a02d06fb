-- Session cookies are signed, not stored: to end them (logout, deactivation) the account's epoch goes up and
-- every cookie signed with an older one stops matching (web/auth.py session_fingerprint).
ALTER TABLE users ADD COLUMN session_epoch INTEGER NOT NULL DEFAULT 0;
