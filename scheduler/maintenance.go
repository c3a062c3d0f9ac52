package scheduler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/blob"
	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/store"
)

// Names of the built-in schedules.
const (
	BuiltinStuckDocuments = "stuck-documents"
	BuiltinBlobRetention  = "blob-retention"
)

// MaxRedrives bounds how often one document is re-driven; a document still
// stuck after that needs an operator (see conveyor status and dlq).
const MaxRedrives = 3

// Redrive returns the stuck-document re-drive: documents still processing
// longer than after since their upload get their upload event published
// again, under its original id. Every consumer absorbs the repeat (the
// projector by its inbox, the processor by publishing its outcome under ids
// derived from the upload's), so a document that was only slow is not
// harmed, and one whose event was lost or dead-lettered gets processed.
func Redrive(st *store.Store, pub *bus.Publisher, rdb redis.UniversalClient, after time.Duration, log *slog.Logger) Job {
	return func(ctx context.Context, tick time.Time) error {
		docs, err := st.StuckDocuments(ctx, tick.Add(-after), 500)
		if err != nil {
			return err
		}
		var errs []error
		redriven := 0
		for _, d := range docs {
			key := "conveyor:redrive:" + d.DocID
			n, err := rdb.Incr(ctx, key).Result()
			if err != nil {
				errs = append(errs, err)
				continue
			}
			rdb.Expire(ctx, key, 30*24*time.Hour)
			if n > MaxRedrives {
				if n == MaxRedrives+1 {
					log.Error("document still processing after every re-drive; look at the dead letters", "doc_id", d.DocID, "redrives", MaxRedrives)
				}
				continue
			}
			ev := &events.DocumentUploaded{
				DocID:               d.DocID,
				Filename:            d.Filename.String,
				Size:                d.Size.Int64,
				SHA256:              d.SHA256.String,
				BlobKey:             d.BlobKey.String,
				DeclaredContentType: d.DeclaredContentType.String,
				Notify:              d.Notify.String,
				UploadedAt:          d.UploadedAt.Time,
			}
			if _, err := pub.PublishEvent(ctx, ev, bus.WithID(d.UploadEventID.String), bus.WithOccurredAt(d.UploadedAt.Time)); err != nil {
				errs = append(errs, fmt.Errorf("re-drive %s: %w", d.DocID, err))
				continue
			}
			redriven++
			log.Warn("re-drove a stuck document", "doc_id", d.DocID, "uploaded_at", d.UploadedAt.Time, "redrive", strconv.FormatInt(n, 10))
		}
		if redriven > 0 {
			log.Info("stuck-document re-drive", "redriven", redriven)
		}
		return errors.Join(errs...)
	}
}

// BlobRetention returns the blob retention job: the stored bytes of
// documents that failed more than retention ago are removed, unless
// another document still uses the same bytes or a new upload stored them
// again within retention.
func BlobRetention(st *store.Store, blobs blob.Store, retention time.Duration, log *slog.Logger) Job {
	return func(ctx context.Context, tick time.Time) error {
		cutoff := tick.Add(-retention)
		keys, err := st.ExpiredBlobKeys(ctx, cutoff, 30*24*time.Hour, 1000)
		if err != nil {
			return err
		}
		var errs []error
		removed := 0
		for _, k := range keys {
			info, err := blobs.Stat(ctx, k)
			if errors.Is(err, blob.ErrNotFound) {
				continue
			}
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if info.LastPut.After(cutoff) {
				continue // a newer upload stored the same bytes
			}
			if err := blobs.Delete(ctx, k); err != nil {
				errs = append(errs, err)
				continue
			}
			removed++
		}
		if removed > 0 {
			log.Info("blob retention removed bytes of failed documents", "removed", removed, "older_than", retention)
		}
		return errors.Join(errs...)
	}
}
