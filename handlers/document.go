// Package handlers does Conveyor's work, one file per handler: a typed event
// in, an error out (bus.Permanent for no retry). Each handler is one
// consumer group; replicas of a handler share the group.
//
// Handlers never see Redis Streams or Watermill, never ack, never sleep to
// retry. Every side effect is idempotent, keyed on the event or entity id,
// because delivery is at-least-once. handlers must not import api, store or
// projector.
package handlers

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"
	"unicode"

	"golang.org/x/sync/semaphore"

	"github.com/conveyor/conveyor/blob"
	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
)

// DocumentGroup is the consumer group of the document processor.
const DocumentGroup = "document-processor"

// Publisher publishes follow-up events. *bus.Publisher implements it.
type Publisher interface {
	PublishEvent(ctx context.Context, ev events.Event, opts ...bus.PublishOption) (string, error)
}

// DocumentProcessorConfig configures a DocumentProcessor.
type DocumentProcessorConfig struct {
	// Blobs holds the uploaded bytes. Required.
	Blobs blob.Store
	// Publisher publishes the outcome. Required.
	Publisher Publisher
	// Summarizer writes summaries. Defaults to Extractive (uncached).
	Summarizer Summarizer
	// MaxBytes bounds the bytes read from one document. Defaults to 32 MiB.
	MaxBytes int64
	// MaxBytesInFlight bounds the bytes of the documents processed at once:
	// a document that would pass it waits until others are done. Processing
	// holds a few copies of a document (its bytes, its text, the
	// extraction's), so without it a burst of large uploads at handler
	// concurrency 64 could take gigabytes. Defaults to 128 MiB, or MaxBytes
	// if that is larger (a document of MaxBytes must fit).
	MaxBytesInFlight int64
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Now defaults to time.Now.
	Now func() time.Time
}

// DocumentProcessor handles document.uploaded: it verifies the stored
// bytes, sniffs their real type, extracts text, counts words and lines,
// summarizes, and publishes document.processed or
// document.processing_failed, plus email.requested if the upload asked for
// a notification.
type DocumentProcessor struct {
	cfg      DocumentProcessorConfig
	inFlight *semaphore.Weighted // bytes of the documents being processed
}

// NewDocumentProcessor returns a DocumentProcessor.
func NewDocumentProcessor(cfg DocumentProcessorConfig) (*DocumentProcessor, error) {
	if cfg.Summarizer == nil {
		cfg.Summarizer = Extractive{}
	}
	if cfg.MaxBytes == 0 {
		cfg.MaxBytes = 32 << 20
	}
	if cfg.MaxBytesInFlight == 0 {
		cfg.MaxBytesInFlight = max(128<<20, cfg.MaxBytes)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	var errs []error
	if cfg.Blobs == nil {
		errs = append(errs, errors.New("document processor: Blobs is required"))
	}
	if cfg.Publisher == nil {
		errs = append(errs, errors.New("document processor: Publisher is required"))
	}
	if cfg.MaxBytesInFlight < cfg.MaxBytes {
		errs = append(errs, fmt.Errorf("document processor: MaxBytesInFlight (%d) must be at least MaxBytes (%d)", cfg.MaxBytesInFlight, cfg.MaxBytes))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return &DocumentProcessor{cfg: cfg, inFlight: semaphore.NewWeighted(cfg.MaxBytesInFlight)}, nil
}

// Register adds the handler to r.
func (p *DocumentProcessor) Register(r *bus.Router, opts ...bus.HandlerOption) error {
	return bus.Handle(r, DocumentGroup, p.Handle, opts...)
}

// Handle processes one upload. Outcome events get ids derived from the
// upload event's id, so a redelivery republishes the same events and the
// projector and email sender absorb the repeat.
func (p *DocumentProcessor) Handle(ctx context.Context, ev *events.DocumentUploaded) error {
	env, _ := bus.EnvelopeFrom(ctx)
	parent := env.ID
	if parent == "" {
		parent = ev.DocID
	}
	if ev.Size > 0 && ev.Size <= p.cfg.MaxBytes {
		// Held until the outcome is published: the text lives that long.
		// The wait counts against the handler's timeout; a document that
		// waited through its attempts does not wait on its last one (it
		// goes past the bound rather than fail for the load of others).
		switch {
		case p.inFlight.TryAcquire(ev.Size):
			defer p.inFlight.Release(ev.Size)
		case bus.IsLastAttempt(ctx):
		default:
			if err := p.inFlight.Acquire(ctx, ev.Size); err != nil {
				return fmt.Errorf("wait for memory to process document %s: %w", ev.DocID, err)
			}
			defer p.inFlight.Release(ev.Size)
		}
	}
	data, err := p.read(ctx, ev)
	var ex Extraction
	if err == nil {
		ex, err = Extract(data, ev.Filename)
	}
	var unproc errUnprocessable
	switch {
	case errors.As(err, &unproc):
		return p.fail(ctx, parent, ev, ex.ContentType, unproc.reason)
	case err != nil && finalAttempt(ctx):
		return p.fail(ctx, parent, ev, ex.ContentType, fmt.Sprintf("gave up after %d attempts: %v", bus.Attempt(ctx), err))
	case err != nil:
		return err
	}
	// A document with no text (whitespace, images only) has nothing to
	// summarize: a model asked about nothing answers with a request for the
	// document, which would be stored and mailed as its summary.
	var summary string
	if strings.TrimSpace(ex.Text) != "" {
		summary, err = p.cfg.Summarizer.Summarize(ctx, ex.Text)
	}
	if err != nil {
		if !bus.IsPermanent(err) && !finalAttempt(ctx) {
			return fmt.Errorf("summarize document %s: %w", ev.DocID, err)
		}
		// The summarizer refuses this text for good (too long for the
		// model, say), or failed on every attempt: the document's text
		// and counts are there, so it is processed with the built-in
		// summary rather than failed.
		p.cfg.Logger.WarnContext(ctx, "summarizer failed; using the built-in summary", "doc_id", ev.DocID,
			"attempt", bus.Attempt(ctx), "error", err)
		if summary, err = (Extractive{}).Summarize(ctx, ex.Text); err != nil {
			return p.fail(ctx, parent, ev, ex.ContentType, fmt.Sprintf("summarizer failed: %v", err))
		}
	}
	done := &events.DocumentProcessed{
		DocID:       ev.DocID,
		ContentType: ex.ContentType,
		Words:       ex.Words,
		Lines:       ex.Lines,
		Summary:     truncate(summary, events.MaxSummaryBytes-8),
		ProcessedAt: p.cfg.Now().UTC(),
	}
	if _, err := p.cfg.Publisher.PublishEvent(ctx, done, bus.WithID(events.DerivedID(parent, "processed"))); err != nil {
		if invalid := new(events.ValidationError); errors.As(err, &invalid) {
			// What this document yields cannot be published, and no
			// retry changes that: the document fails, with the reason.
			return p.fail(ctx, parent, ev, ex.ContentType, "the outcome cannot be published: "+invalid.Error())
		}
		return fmt.Errorf("publish document.processed for %s: %w", ev.DocID, err)
	}
	return p.notify(ctx, parent, ev, "processed",
		fmt.Sprintf("Your document %q was processed: %d words, %d lines.\n\nSummary: %s\n", ev.Filename, ex.Words, ex.Lines, done.Summary))
}

// read returns the stored bytes after checking size and SHA-256.
func (p *DocumentProcessor) read(ctx context.Context, ev *events.DocumentUploaded) ([]byte, error) {
	if ev.Size > p.cfg.MaxBytes {
		return nil, unprocessable("document of %d bytes exceeds the processing limit of %d bytes", ev.Size, p.cfg.MaxBytes)
	}
	rc, err := p.cfg.Blobs.Open(ctx, ev.BlobKey)
	if errors.Is(err, blob.ErrNotFound) {
		// The api stored the bytes before it published the event, so
		// they are missing here most likely because this replica's
		// BLOB_DIR is not the api's (a volume not mounted or not
		// shared): retried, on any replica of the group, rather than
		// failing the document at once. Failed on the last attempt.
		if bus.IsLastAttempt(ctx) {
			return nil, unprocessable("the stored bytes are missing (%d attempts)", max(bus.Attempt(ctx), 1))
		}
		p.cfg.Logger.ErrorContext(ctx, "stored bytes of a document are missing; will retry: is BLOB_DIR the api's, and mounted?",
			"doc_id", ev.DocID, "blob_key", ev.BlobKey, "attempt", bus.Attempt(ctx))
		return nil, fmt.Errorf("open blob of document %s: %w", ev.DocID, err)
	}
	if err != nil {
		return nil, fmt.Errorf("open blob of document %s: %w", ev.DocID, err)
	}
	defer rc.Close()
	h := sha256.New()
	data, err := io.ReadAll(io.TeeReader(io.LimitReader(rc, ev.Size+1), h))
	if err != nil {
		return nil, fmt.Errorf("read blob of document %s: %w", ev.DocID, err)
	}
	if int64(len(data)) != ev.Size {
		return nil, unprocessable("stored size differs from the uploaded size %d", ev.Size)
	}
	if sum := hex.EncodeToString(h.Sum(nil)); sum != ev.SHA256 {
		return nil, unprocessable("stored bytes fail the SHA-256 check (got %s, want %s)", sum, ev.SHA256)
	}
	return data, nil
}

// finalAttempt reports whether a failure now is the event's last: its last
// attempt, and not one cut short by a shutdown or the handler's timeout
// (ctx done), whose failure is not the event's (at a shutdown the entry is
// handed back and delivered again).
func finalAttempt(ctx context.Context) bool {
	return bus.IsLastAttempt(ctx) && ctx.Err() == nil
}

func (p *DocumentProcessor) fail(ctx context.Context, parent string, ev *events.DocumentUploaded, contentType, reason string) error {
	failed := &events.DocumentProcessingFailed{
		DocID:       ev.DocID,
		ContentType: contentType,
		Reason:      truncate(reason, events.MaxReasonBytes-8),
		FailedAt:    p.cfg.Now().UTC(),
	}
	if _, err := p.cfg.Publisher.PublishEvent(ctx, failed, bus.WithID(events.DerivedID(parent, "failed"))); err != nil {
		return fmt.Errorf("publish document.processing_failed for %s: %w", ev.DocID, err)
	}
	p.cfg.Logger.InfoContext(ctx, "document cannot be processed", "doc_id", ev.DocID, "reason", reason)
	return p.notify(ctx, parent, ev, "failed", fmt.Sprintf("Your document %q could not be processed: %s\n", ev.Filename, reason))
}

// notify requests the notification email, if the upload asked for one. Its
// email id is derived from the upload event, so it is requested once however
// often this runs.
func (p *DocumentProcessor) notify(ctx context.Context, parent string, ev *events.DocumentUploaded, outcome, body string) error {
	if ev.Notify == "" {
		return nil
	}
	req := &events.EmailRequested{
		EmailID:     events.DerivedID(parent, "notify-email"),
		To:          ev.Notify,
		Subject:     fmt.Sprintf("Document %s %s", oneLine(truncate(ev.Filename, 100)), outcome),
		Body:        body,
		DocID:       ev.DocID,
		RequestedAt: p.cfg.Now().UTC(),
	}
	if _, err := p.cfg.Publisher.PublishEvent(ctx, req, bus.WithID(events.DerivedID(parent, "notify"))); err != nil {
		return fmt.Errorf("publish email.requested for document %s: %w", ev.DocID, err)
	}
	return nil
}

// oneLine drops control characters, so text from outside cannot add mail
// headers.
func oneLine(s string) string {
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return -1
		}
		return r
	}, s)
}
