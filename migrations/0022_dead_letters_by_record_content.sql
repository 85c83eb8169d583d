-- A dead letter is the same Kafka record again (redelivered after a crash) only when its offset and
-- its bytes are the same: an offset alone named a different record once the topic or the broker
-- was recreated while the database was kept (every `dev` restart: its embedded broker starts
-- empty), and the new record was then taken for the old one, written nowhere (no row, no DLQ
-- message) and lost. The key now includes a digest of the payload.
drop index dead_letters_record_key;
create unique index dead_letters_record_key on dead_letters (topic, partition, "offset", md5(payload))
    where partition is not null and "offset" is not null;
