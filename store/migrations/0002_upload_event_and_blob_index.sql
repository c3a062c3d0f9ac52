-- The id of a document's upload event, so the stuck-document re-drive can
-- re-publish it under the same id (the repeat is then absorbed downstream),
-- and an index for blob retention, which looks documents up by blob.

ALTER TABLE documents ADD COLUMN upload_event_id text;

CREATE INDEX documents_blob_key_idx ON documents (blob_key) WHERE blob_key IS NOT NULL;
CREATE INDEX documents_failed_idx ON documents (processed_at) WHERE status = 'failed';
