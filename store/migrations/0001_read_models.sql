-- Read models written by the projector alone, and its inbox.

CREATE TABLE documents (
    doc_id                uuid PRIMARY KEY,
    status                text NOT NULL CHECK (status IN ('processing', 'processed', 'failed')),
    filename              text,
    size                  bigint,
    declared_content_type text,
    content_type          text,
    sha256                text,
    blob_key              text,
    notify                text,
    words                 integer,
    lines                 integer,
    summary               text,
    error                 text,
    uploaded_at           timestamptz,
    processed_at          timestamptz,
    updated_at            timestamptz NOT NULL DEFAULT now()
);

-- The stuck-document re-drive and operators look for old unfinished work.
CREATE INDEX documents_processing_idx ON documents (uploaded_at) WHERE status = 'processing';

CREATE TABLE emails (
    email_id     uuid PRIMARY KEY,
    status       text NOT NULL CHECK (status IN ('scheduled', 'queued', 'sent', 'failed')),
    recipient    text,
    subject      text,
    doc_id       uuid,
    attempts     integer NOT NULL DEFAULT 0,
    message_id   text,
    error        text,
    requested_at timestamptz,
    send_at      timestamptz,
    sent_at      timestamptz,
    failed_at    timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX emails_doc_id_idx ON emails (doc_id) WHERE doc_id IS NOT NULL;

-- The projector's inbox: one row per applied event, written in the same
-- transaction as the change, so a redelivered event changes nothing twice.
-- Event ids are text: events from other Watermill publishers may use ids
-- that are not UUIDs.
CREATE TABLE processed_events (
    event_id     text PRIMARY KEY,
    event_type   text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX processed_events_processed_at_idx ON processed_events (processed_at);
