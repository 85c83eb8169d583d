-- Revocations are announced on channel `auth_revocations` (src/auth/revocations.rs): every instance
-- keeps revoked access tokens and refresh families in memory and checks a request's token without
-- a query. Triggers, so that whoever writes (logout, refresh-token reuse, an operator's SQL) is heard.
create or replace function auth_revocation_notify() returns trigger language plpgsql as $$
begin
    if tg_table_name = 'denied_access_tokens' then
        perform pg_notify('auth_revocations', 'jti:' || new.jti::text);
    elsif new.revoked_at is not null and old.revoked_at is null then
        perform pg_notify('auth_revocations', 'fam:' || new.family_id::text);
    end if;
    return null;
end;
$$;
create trigger denied_access_tokens_notify after insert on denied_access_tokens
    for each row execute function auth_revocation_notify();
create trigger refresh_families_revoked_notify after update of revoked_at on refresh_families
    for each row execute function auth_revocation_notify();
