package scheduler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/blob"
	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/config"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/idem"
	"github.com/conveyor/conveyor/store"
)

// Names of the built-in schedules.
const (
	BuiltinStuckDocuments = "stuck-documents"
	BuiltinBlobRetention  = "blob-retention"
	BuiltinInboxRetention = "inbox-retention"
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
//
// Documents that used up their re-drives stay stuck until an operator acts;
// the job reads past them, page by page, so that they never hide newer
// stuck documents, and re-drives at most redrivesPerRun per run.
//
// queues names the consumer groups, and the event types they read, that a
// document's events pass through on the way to its read model (the
// processor's, the projector's). A document uploaded after the oldest
// entry any of them has not finished may simply be waiting in that
// backlog (uploads faster than the handlers, a projector held up by a
// PostgreSQL outage): it is not re-driven, since re-driving it would only
// add work behind the backlog and use up the re-drives it may need later.
func Redrive(st *store.Store, pub *bus.Publisher, rdb redis.UniversalClient, after time.Duration, queues map[string][]string, log *slog.Logger) Job {
	topology := make(map[string][]string, len(queues))
	for g, types := range queues {
		for _, typ := range types {
			topology[g] = append(topology[g], pub.Stream(typ))
		}
	}
	return func(ctx context.Context, tick time.Time) error {
		cutoff := tick.Add(-after)
		backlog, err := oldestUnfinished(ctx, rdb, topology)
		if err != nil {
			return fmt.Errorf("read the backlog of %v: %w", slices.Sorted(maps.Keys(queues)), err)
		}
		if backlog > 0 {
			// Less a margin for the clocks of the api (uploaded_at) and
			// of Redis (entry ids).
			if queued := time.Now().Add(-backlog - clockMargin); queued.Before(cutoff) {
				log.Info("stuck-document re-drive leaves out documents uploaded after the oldest unfinished entry of its queues", "oldest_unfinished_age", backlog.Round(time.Second), "uploaded_after", queued)
				cutoff = queued
			}
		}
		var errs []error
		redriven := 0
		var lastAt time.Time
		var lastID string
		for redriven < redrivesPerRun && ctx.Err() == nil {
			docs, err := st.StuckDocuments(ctx, cutoff, lastAt, lastID, redrivePage)
			if err != nil {
				return errors.Join(append(errs, err)...)
			}
			if len(docs) == 0 {
				break
			}
			lastAt, lastID = docs[len(docs)-1].UploadedAt.Time, docs[len(docs)-1].DocID
			keys := make([]string, len(docs))
			for i, d := range docs {
				keys[i] = redriveKey(d.DocID)
			}
			counts, err := rdb.MGet(ctx, keys...).Result()
			if err != nil {
				return errors.Join(append(errs, fmt.Errorf("read re-drive counts: %w", err))...)
			}
			var usedUp []string
			for i, d := range docs {
				if redriven >= redrivesPerRun {
					break
				}
				if c, _ := counts[i].(string); c != "" {
					if n, _ := strconv.ParseInt(c, 10, 64); n > MaxRedrives {
						usedUp = append(usedUp, keys[i]) // and said so once
						continue
					}
				}
				n, err := rdb.Incr(ctx, keys[i]).Result()
				if err != nil {
					errs = append(errs, err)
					continue
				}
				rdb.Expire(ctx, keys[i], redriveCountTTL)
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
			// A used-up count lives as long as its document is stuck, so
			// that it is never re-driven again (one round trip per page).
			if len(usedUp) > 0 {
				_, err := rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
					for _, k := range usedUp {
						p.Expire(ctx, k, redriveCountTTL)
					}
					return nil
				})
				if err != nil {
					errs = append(errs, fmt.Errorf("keep re-drive counts: %w", err))
				}
			}
			if len(docs) < redrivePage {
				break
			}
		}
		if redriven > 0 {
			log.Info("stuck-document re-drive", "redriven", redriven)
		}
		return errors.Join(errs...)
	}
}

// clockMargin is how far the clocks of the api and of Redis are assumed
// to differ at most.
const clockMargin = time.Minute

// oldestUnfinished returns the age of the oldest entry that a group of
// topology has not finished (waiting or pending), 0 if none.
func oldestUnfinished(ctx context.Context, rdb redis.UniversalClient, topology map[string][]string) (time.Duration, error) {
	st, err := bus.Inspect(ctx, rdb, topology)
	if err != nil {
		return 0, err
	}
	var oldest float64
	for _, s := range st.Streams {
		for _, g := range s.Groups {
			if _, ours := topology[g.Group]; ours {
				oldest = max(oldest, g.OldestWaitingSeconds, g.OldestPendingSeconds)
			}
		}
	}
	return time.Duration(oldest * float64(time.Second)), nil
}

func redriveKey(docID string) string { return "conveyor:redrive:" + docID }

// redriveCountTTL is how long a document's re-drive count lives after it
// was last looked at: it goes once its document is no longer stuck.
const redriveCountTTL = 30 * 24 * time.Hour

// redrivePage is how many stuck documents the re-drive reads at once, and
// redrivesPerRun how many it re-drives at most per run.
const (
	redrivePage    = 500
	redrivesPerRun = 500
)

// InboxRetention returns the inbox retention job: the projector's inbox
// rows (one per applied event, which make a redelivered event change
// nothing twice) are deleted retention after the event was applied, so that
// the inbox does not grow forever. An event redelivered later than that is
// applied again, so a retention under config.MinInboxRetention is refused.
//
// One run deletes at most inboxPerRun rows (about a second or two of
// statements): run every minute, that keeps up with about 8,000 applied
// events a second, and a backlog, such as the whole inbox after an
// upgrade, goes down over successive runs, none of them long (runs of a
// job never overlap: a tick that finds the last run still going is
// skipped).
func InboxRetention(st *store.Store, retention time.Duration, log *slog.Logger) Job {
	return func(ctx context.Context, tick time.Time) error {
		if retention < config.MinInboxRetention {
			return fmt.Errorf("inbox retention %s is under the minimum of %s", retention, config.MinInboxRetention)
		}
		cutoff := tick.Add(-retention)
		n, err := st.PruneInbox(ctx, cutoff, inboxBatch, inboxPerRun)
		if n > 0 {
			log.Info("inbox retention", "removed", n, "applied_before", cutoff.UTC().Format(time.RFC3339), "more_left", n == inboxPerRun)
		}
		return err
	}
}

// inboxBatch is how many inbox rows one statement of the inbox retention
// deletes, and inboxPerRun how many one run deletes at most.
const (
	inboxBatch  = 10_000
	inboxPerRun = 500_000
)

// BlobRetention returns the blob retention job: the stored bytes of
// documents that failed more than retention ago are removed, unless
// another document still uses the same bytes or a new upload stored them
// again within retention.
//
// If blobs can list what it holds (blob.Walker), bytes that no document
// refers to and that no upload stored within retention are removed too:
// they are left by an upload whose event may or may not have been
// published (Redis went away mid-write) and that its client never retried.
// They are kept for retention, and at least for OrphanMinAge: a retry
// under the upload's Idempotency-Key can publish its event (which refers
// to them) for as long as the key's record lives. Temp files of uploads a
// crash interrupted are removed too (see blob.Dir.RemoveStaleTemps).
func BlobRetention(st *store.Store, blobs blob.Store, retention time.Duration, log *slog.Logger) Job {
	return func(ctx context.Context, tick time.Time) error {
		cutoff := tick.Add(-retention)
		err := removeFailedDocumentBlobs(ctx, st, blobs, cutoff, retention, log)
		if w, ok := blobs.(blob.Walker); ok {
			orphanCutoff := tick.Add(-max(retention, OrphanMinAge))
			err = errors.Join(err, removeOrphanBlobs(ctx, st, blobs, w, orphanCutoff, log))
		}
		if s, ok := blobs.(tempSweeper); ok {
			err = errors.Join(err, s.RemoveStaleTemps())
		}
		return err
	}
}

// tempSweeper is blob storage that keeps temp files of Puts in progress
// (blob.Dir): those of Puts a crash interrupted are removed once old.
type tempSweeper interface{ RemoveStaleTemps() error }

// OrphanMinAge is the least age of stored bytes no document refers to
// before blob retention removes them: the lifetime of an Idempotency-Key
// record, which a retry can finish until it expires, plus a day.
const OrphanMinAge = idem.DefaultTTL + 24*time.Hour

// orphanBatch is how many old blobs are looked up in the database at once.
const orphanBatch = 500

func removeOrphanBlobs(ctx context.Context, st *store.Store, blobs blob.Store, w blob.Walker, cutoff time.Time, log *slog.Logger) error {
	var errs []error
	removed := 0
	var batch []string
	flush := func() error {
		keys, err := st.UnreferencedBlobKeys(ctx, batch)
		batch = batch[:0]
		if err != nil {
			return err
		}
		// Looked at again just before the removal: an upload of the same
		// bytes since the walk refreshed LastPut.
		n, err := removeUntouched(ctx, blobs, keys, cutoff)
		removed += n
		if err != nil {
			errs = append(errs, err)
		}
		return nil
	}
	err := w.Walk(ctx, func(info blob.Info) error {
		if !info.LastPut.Before(cutoff) {
			return nil
		}
		batch = append(batch, info.Key)
		if len(batch) < orphanBatch {
			return nil
		}
		return flush()
	})
	if err == nil && len(batch) > 0 {
		err = flush()
	}
	if removed > 0 {
		log.Info("blob retention removed bytes no document refers to", "removed", removed, "stored_before", cutoff)
	}
	return errors.Join(append(errs, err)...)
}

// expiredPage is how many blob keys of failed documents blob retention
// reads at once.
const expiredPage = 1000

func removeFailedDocumentBlobs(ctx context.Context, st *store.Store, blobs blob.Store, cutoff time.Time, retention time.Duration, log *slog.Logger) error {
	var errs []error
	removed := 0
	for after := ""; ctx.Err() == nil; {
		keys, err := st.ExpiredBlobKeys(ctx, cutoff, 30*24*time.Hour, after, expiredPage)
		if err != nil {
			errs = append(errs, err)
			break
		}
		n, err := removeUntouched(ctx, blobs, keys, cutoff)
		removed += n
		if err != nil {
			errs = append(errs, err)
		}
		if len(keys) < expiredPage {
			break
		}
		after = keys[len(keys)-1]
	}
	if removed > 0 {
		log.Info("blob retention removed bytes of failed documents", "removed", removed, "older_than", retention)
	}
	return errors.Join(append(errs, ctx.Err())...)
}

// removeUntouched deletes the blobs of keys that no upload stored at or
// after cutoff (a newer upload of the same bytes needs them), and returns
// how many it deleted.
func removeUntouched(ctx context.Context, blobs blob.Store, keys []string, cutoff time.Time) (int, error) {
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
		if !info.LastPut.Before(cutoff) {
			continue
		}
		// Unless an upload stored the same bytes since the Stat.
		gone, err := blobs.DeleteIfUnchanged(ctx, info)
		if err != nil {
			errs = append(errs, err)
		}
		if gone {
			removed++
		}
	}
	return removed, errors.Join(errs...)
}
