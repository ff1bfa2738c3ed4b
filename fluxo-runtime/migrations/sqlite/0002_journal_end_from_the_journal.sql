-- Fluxo SQLite schema, version 2.
--
-- A step's commit adds its journal entry without updating the instance's
-- row, so that it writes one page instead of two. The number of entries is
-- read from the journal (its last event id + 1) and no longer kept on the
-- instance; a file at this version is refused by builds that still read it.

ALTER TABLE instances DROP COLUMN next_event_id;
