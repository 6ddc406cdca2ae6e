-- Identity links: every (appid, openid) and every unionid points at exactly one user.
-- The primary keys and the unique constraint on unionids.user_id are what make concurrent first
-- logins of one person on several instances produce one user (DESIGN.md identity rule 6), together
-- with the advisory locks each login takes on the person's ids.
-- The same tables as migrations/sqlite, in PostgreSQL's types.

CREATE TABLE users (
    user_id            TEXT PRIMARY KEY,
    created_at         BIGINT NOT NULL,          -- unix seconds
    merged_into        TEXT REFERENCES users (user_id),
    merged_at          BIGINT,
    phone              TEXT,
    phone_country_code TEXT,
    phone_verified_at  BIGINT
);

CREATE INDEX users_by_merged_into ON users (merged_into) WHERE merged_into IS NOT NULL;

CREATE TABLE app_openids (
    appid     TEXT NOT NULL,
    openid    TEXT NOT NULL,
    user_id   TEXT NOT NULL REFERENCES users (user_id),
    linked_at BIGINT NOT NULL,
    PRIMARY KEY (appid, openid)
);

CREATE INDEX app_openids_by_user ON app_openids (user_id);
CREATE INDEX app_openids_by_openid ON app_openids (openid);

CREATE TABLE unionids (
    unionid   TEXT PRIMARY KEY,
    user_id   TEXT NOT NULL UNIQUE REFERENCES users (user_id),
    linked_at BIGINT NOT NULL
);
