-- Audit trail of operator actions (admin API and CLI).
create table audit_log (
    id     bigserial primary key,
    at     timestamptz not null default now(),
    actor  int not null,
    action text not null,
    target text not null,
    before jsonb,
    after  jsonb
);
