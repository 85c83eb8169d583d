-- Account lifecycle (`ostore-orders users disable|enable|delete`, `/admin/users/{userID}`).
-- A disabled user cannot log in and every token of theirs is refused; enabling lets them log in
-- again. A deleted user is disabled for good; the row stays, so their orders (which reference it)
-- stay readable to admins, and their e-mail may be given to a new account.
alter table users
    add column disabled_at timestamptz,
    add column deleted_at timestamptz,
    add constraint users_deleted_is_disabled check (deleted_at is null or disabled_at is not null);

drop index users_email_lower_key;
create unique index users_email_lower_key on users (lower(email)) where deleted_at is null;

-- Every instance keeps the inactive users in memory (src/auth/revocations.rs), told on the channel
-- of migration 0010: `user-off:<id>` when a user stops being active, `user-on:<id>` when enabled.
create or replace function auth_user_notify() returns trigger language plpgsql as $$
begin
    if new.disabled_at is not null and old.disabled_at is null then
        perform pg_notify('auth_revocations', 'user-off:' || new.user_id::text);
    elsif new.disabled_at is null and old.disabled_at is not null then
        perform pg_notify('auth_revocations', 'user-on:' || new.user_id::text);
    end if;
    return null;
end;
$$;
create trigger users_lifecycle_notify after update of disabled_at on users
    for each row execute function auth_user_notify();

-- Users are never removed: a token's user id must always resolve to a row that says whether it is
-- still active, and orders reference their user. `users delete` marks the row instead.
create or replace function users_no_hard_delete() returns trigger language plpgsql as $$
begin
    raise exception 'users are not deleted with SQL; use `ostore-orders users delete` (it keeps the row)'
        using errcode = 'restrict_violation';
end;
$$;
create trigger users_no_hard_delete before delete on users
    for each row execute function users_no_hard_delete();
