-- A TrackingEvent's eventID is the shipper's own id: SPEC §5 names the field, not its form, and a
-- shipper whose ids are not UUIDs (`evt-123`) had every event dead-lettered as malformed. The inbox
-- and the parked events keep it as text (non-empty, at most 200 bytes, checked when a record is
-- parsed). The UUIDs already stored keep their canonical text, which is what a UUID eventID reads as,
-- so a redelivered event is still recognised.
alter table tracking_inbox alter column event_id type text;
alter table tracking_retries alter column event_id type text;
