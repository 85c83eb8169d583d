-- Users, refresh-token families and the access-token deny list.

create or replace function set_updated_at() returns trigger language plpgsql as $$
begin
    new.updated_at := now();
    return new;
end;
$$;

create table users (
    user_id       serial primary key,
    email         text not null,
    password_hash text not null,
    role          text not null check (role in ('user', 'admin')),
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now()
);
create unique index users_email_lower_key on users (lower(email));
create trigger users_updated_at before update on users for each row execute function set_updated_at();

-- One family per login; every refresh token of the login belongs to it.
create table refresh_families (
    family_id  uuid primary key,
    user_id    int not null references users (user_id) on delete cascade,
    created_at timestamptz not null default now(),
    revoked_at timestamptz,
    revoked_reason text
);
create index refresh_families_user_idx on refresh_families (user_id);

-- Refresh tokens are stored as SHA-256 hashes; `used_at` marks a rotated token.
create table refresh_tokens (
    token_hash bytea primary key,
    family_id  uuid not null references refresh_families (family_id) on delete cascade,
    expires_at timestamptz not null,
    used_at    timestamptz,
    created_at timestamptz not null default now()
);
create index refresh_tokens_family_idx on refresh_tokens (family_id);

-- Access tokens denied before they expire (logout).
create table denied_access_tokens (
    jti        uuid primary key,
    expires_at timestamptz not null
);
create index denied_access_tokens_expires_idx on denied_access_tokens (expires_at);
