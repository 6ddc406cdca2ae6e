-- Identity links: every (appid, openid) and every unionid points at exactly one user.
-- The primary keys and the unique constraint on unionids.user_id are what make two concurrent
-- first logins of one person produce one user (DESIGN.md identity rule 6): luck plays no part.

CREATE TABLE users (
    user_id     TEXT PRIMARY KEY NOT NULL,
    created_at  INTEGER NOT NULL,              -- unix seconds
    merged_into TEXT REFERENCES users (user_id),
    merged_at   INTEGER
);

CREATE TABLE app_openids (
    appid     TEXT NOT NULL,
    openid    TEXT NOT NULL,
    user_id   TEXT NOT NULL REFERENCES users (user_id),
    linked_at INTEGER NOT NULL,
    PRIMARY KEY (appid, openid)
) WITHOUT ROWID;

CREATE INDEX app_openids_by_user ON app_openids (user_id);

CREATE TABLE unionids (
    unionid   TEXT PRIMARY KEY NOT NULL,
    user_id   TEXT NOT NULL UNIQUE REFERENCES users (user_id),
    linked_at INTEGER NOT NULL
) WITHOUT ROWID;
