-- Leave room in each page of the read models for the new versions of its
-- rows. Every row is updated after it is inserted (a document when it is
-- processed, an email when it is sent), and none of those updates touches an
-- indexed column: with room on the row's page, PostgreSQL writes the new
-- version there as a heap-only tuple and adds no index entry for it.
ALTER TABLE documents SET (fillfactor = 70);
ALTER TABLE emails SET (fillfactor = 70);
