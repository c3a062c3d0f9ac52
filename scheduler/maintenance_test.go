package scheduler_test

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/blob"
	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/config"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/internal/testenv"
	"github.com/conveyor/conveyor/scheduler"
	"github.com/conveyor/conveyor/store"
)

func migrated(t *testing.T) *store.Store {
	t.Helper()
	st, err := store.Open(store.Config{URL: testenv.DatabaseURL(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	if _, err := st.Migrate(t.Context()); err != nil {
		t.Fatal(err)
	}
	return st
}

func upload(doc, key string, at time.Time) *events.DocumentUploaded {
	return &events.DocumentUploaded{DocID: doc, Filename: "a.txt", Size: 3, SHA256: key, BlobKey: key, UploadedAt: at}
}

func TestRedriveRepublishesStuckDocumentsUnderTheirUploadID(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	st, rdb, prefix, pub := redriveFixture(t)
	key := strings.Repeat("ab", 32)
	now := time.Now()
	stuck, fresh, done := events.NewID(), events.NewID(), events.NewID()
	stuckEvent := events.NewID()
	err := st.WithTx(ctx, func(tx *store.Tx) error {
		if err := tx.ApplyDocumentsUploaded(ctx,
			[]*events.DocumentUploaded{upload(stuck, key, now.Add(-time.Hour)), upload(fresh, key, now), upload(done, key, now.Add(-time.Hour))},
			[]string{stuckEvent, events.NewID(), events.NewID()}); err != nil {
			return err
		}
		return tx.ApplyDocumentsProcessed(ctx, []*events.DocumentProcessed{{DocID: done, ContentType: "text/plain", ProcessedAt: now}})
	})
	if err != nil {
		t.Fatal(err)
	}
	job := scheduler.Redrive(st, pub, rdb, 15*time.Minute, nil, logger())
	for i := 0; i < scheduler.MaxRedrives+2; i++ {
		if err := job(ctx, now); err != nil {
			t.Fatal(err)
		}
	}
	xs, err := rdb.XRange(ctx, prefix+events.TypeDocumentUploaded, "-", "+").Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(xs) != scheduler.MaxRedrives {
		t.Fatalf("%d re-drives, want %d (only the stuck document, at most MaxRedrives times)", len(xs), scheduler.MaxRedrives)
	}
	for _, x := range xs {
		if x.Values["_watermill_message_uuid"] != stuckEvent || !strings.Contains(x.Values["payload"].(string), stuck) {
			t.Fatalf("re-drive %v is not the stuck document's upload event %s", x.Values, stuckEvent)
		}
	}
	t.Cleanup(func() { rdb.Del(ctx, "conveyor:redrive:"+stuck) })
}

func TestBlobRetentionRemovesOnlyBytesNoDocumentNeeds(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	st := migrated(t)
	root := t.TempDir()
	blobs, err := blob.NewDir(blob.DirConfig{Dir: root})
	if err != nil {
		t.Fatal(err)
	}
	put := func(s string) string {
		info, err := blobs.Put(ctx, strings.NewReader(s), 100)
		if err != nil {
			t.Fatal(err)
		}
		return info.Key
	}
	// Times are relative to a tick far in the future, so the files' real
	// modification times count as long ago.
	tick := time.Now().Add(30 * 24 * time.Hour)
	old := tick.Add(-10 * 24 * time.Hour)
	expired, shared, recent := put("expired"), put("shared"), put("recent")
	// Bytes no document refers to (an upload whose outcome stayed unknown
	// and was never retried): removed once older than the retention, kept
	// while an upload stored them within it (its event may still be on
	// its way to the projector).
	// Past the retention but within OrphanMinAge, an upload's retry under
	// its Idempotency-Key may still publish an event for them: kept.
	orphan, freshOrphan, retriable := put("orphan"), put("fresh orphan"), put("retriable orphan")
	for key, at := range map[string]time.Time{freshOrphan: tick.Add(-time.Hour), retriable: tick.Add(-scheduler.OrphanMinAge + time.Hour)} {
		if err := os.Chtimes(filepath.Join(root, key[0:2], key[2:4], key), at, at); err != nil {
			t.Fatal(err)
		}
	}
	docs := map[string]string{events.NewID(): expired, events.NewID(): shared, events.NewID(): shared, events.NewID(): recent}
	var ups []*events.DocumentUploaded
	var fails []*events.DocumentProcessingFailed
	var sharedOK string
	for doc, key := range docs {
		ups = append(ups, upload(doc, key, old))
		failedAt := old
		if key == recent {
			failedAt = tick.Add(-time.Hour)
		}
		if key == shared && sharedOK == "" {
			sharedOK = doc // this one was processed: its bytes stay
			continue
		}
		fails = append(fails, &events.DocumentProcessingFailed{DocID: doc, Reason: "x", FailedAt: failedAt})
	}
	err = st.WithTx(ctx, func(tx *store.Tx) error {
		if err := tx.ApplyDocumentsUploaded(ctx, ups, nil); err != nil {
			return err
		}
		if err := tx.ApplyDocumentsProcessed(ctx, []*events.DocumentProcessed{{DocID: sharedOK, ContentType: "text/plain", ProcessedAt: old}}); err != nil {
			return err
		}
		return tx.ApplyDocumentsFailed(ctx, fails)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := scheduler.BlobRetention(st, blobs, 7*24*time.Hour, logger())(ctx, tick); err != nil {
		t.Fatal(err)
	}
	for key, wantKept := range map[string]bool{expired: false, shared: true, recent: true, orphan: false, freshOrphan: true, retriable: true} {
		_, err := blobs.Stat(ctx, key)
		if kept := err == nil; kept != wantKept {
			t.Errorf("blob %s kept=%v, want %v (%v)", key[:8], kept, wantKept, err)
		}
	}
}

// TestInboxRetentionForgetsOnlyOldEvents: the job removes the inbox rows of
// events applied longer than the retention before its tick, and a
// redelivery of an event still remembered changes nothing.
func TestInboxRetentionForgetsOnlyOldEvents(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	st := migrated(t)
	ids := []store.InboxEntry{{EventID: events.NewID(), EventType: events.TypeEmailSent}, {EventID: events.NewID(), EventType: events.TypeEmailSent}}
	record := func() map[string]bool {
		t.Helper()
		var fresh map[string]bool
		if err := st.WithTx(ctx, func(tx *store.Tx) error {
			var err error
			fresh, err = tx.Inbox(ctx, ids)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return fresh
	}
	if fresh := record(); len(fresh) != 2 {
		t.Fatalf("first record: %d new, want 2", len(fresh))
	}
	job := scheduler.InboxRetention(st, 7*24*time.Hour, logger())
	if err := job(ctx, time.Now().Add(6*24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if fresh := record(); len(fresh) != 0 {
		t.Fatalf("after a tick 6 days later: %d events new again, want none (still remembered)", len(fresh))
	}
	if err := job(ctx, time.Now().Add(8*24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if fresh := record(); len(fresh) != 2 {
		t.Fatalf("after a tick 8 days later: %d events new, want both forgotten", len(fresh))
	}
}

// TestInboxRetentionRefusesAShortRetention: a retention of zero would empty
// the inbox, so the job refuses what config would refuse.
func TestInboxRetentionRefusesAShortRetention(t *testing.T) {
	t.Parallel()
	st := migrated(t)
	for _, r := range []time.Duration{0, -time.Hour, config.MinInboxRetention - time.Second} {
		if err := scheduler.InboxRetention(st, r, logger())(t.Context(), time.Now()); err == nil {
			t.Errorf("retention %s: no error", r)
		}
	}
}

// TestRedriveReadsPastDocumentsThatUsedUpTheirRedrives: more stuck
// documents than one page that used up their re-drives (an incident an
// operator has not dealt with yet) do not hide a newer stuck document.
func TestRedriveReadsPastDocumentsThatUsedUpTheirRedrives(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	st, rdb, prefix, pub := redriveFixture(t)
	key := strings.Repeat("cd", 32)
	now := time.Now()
	const usedUp = 600
	var ups []*events.DocumentUploaded
	var ids []string
	for i := range usedUp + 1 {
		ups = append(ups, upload(events.NewID(), key, now.Add(-2*time.Hour+time.Duration(i)*time.Millisecond)))
		ids = append(ids, events.NewID())
	}
	if err := st.WithTx(ctx, func(tx *store.Tx) error { return tx.ApplyDocumentsUploaded(ctx, ups, ids) }); err != nil {
		t.Fatal(err)
	}
	for _, up := range ups[:usedUp] {
		if err := rdb.Set(ctx, "conveyor:redrive:"+up.DocID, scheduler.MaxRedrives+1, time.Hour).Err(); err != nil {
			t.Fatal(err)
		}
	}
	newest := ups[usedUp]
	t.Cleanup(func() {
		for _, up := range ups {
			rdb.Del(ctx, "conveyor:redrive:"+up.DocID)
		}
	})
	if err := scheduler.Redrive(st, pub, rdb, 15*time.Minute, nil, logger())(ctx, now); err != nil {
		t.Fatal(err)
	}
	xs, err := rdb.XRange(ctx, prefix+events.TypeDocumentUploaded, "-", "+").Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(xs) != 1 || xs[0].Values["_watermill_message_uuid"] != ids[usedUp] {
		t.Fatalf("%d re-drives (%v), want one: the newest stuck document %s", len(xs), xs, newest.DocID)
	}
	// The used-up counts live on while their documents are stuck, so
	// they are never re-driven again.
	for _, up := range []*events.DocumentUploaded{ups[0], ups[usedUp-1]} {
		if ttl := rdb.TTL(ctx, "conveyor:redrive:"+up.DocID).Val(); ttl < 24*time.Hour {
			t.Errorf("used-up re-drive count of %s lives %s more, want it renewed", up.DocID, ttl)
		}
	}
}

// TestBlobRetentionRemovesMoreThanAPage: one run removes the bytes of
// every expired failed document, however many there are.
func TestBlobRetentionRemovesMoreThanAPage(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	st := migrated(t)
	blobs, err := blob.NewDir(blob.DirConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	tick := time.Now().Add(30 * 24 * time.Hour)
	old := tick.Add(-10 * 24 * time.Hour)
	const n = 1_100
	var ups []*events.DocumentUploaded
	var fails []*events.DocumentProcessingFailed
	var keys []string
	for i := range n {
		info, err := blobs.Put(ctx, strings.NewReader(fmt.Sprintf("failed document %d", i)), 100)
		if err != nil {
			t.Fatal(err)
		}
		doc := events.NewID()
		keys = append(keys, info.Key)
		ups = append(ups, upload(doc, info.Key, old))
		fails = append(fails, &events.DocumentProcessingFailed{DocID: doc, Reason: "x", FailedAt: old})
	}
	err = st.WithTx(ctx, func(tx *store.Tx) error {
		if err := tx.ApplyDocumentsUploaded(ctx, ups, nil); err != nil {
			return err
		}
		return tx.ApplyDocumentsFailed(ctx, fails)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := scheduler.BlobRetention(st, blobs, 7*24*time.Hour, logger())(ctx, tick); err != nil {
		t.Fatal(err)
	}
	kept := 0
	for _, k := range keys {
		if _, err := blobs.Stat(ctx, k); err == nil {
			kept++
		}
	}
	if kept != 0 {
		t.Errorf("%d of %d expired blobs kept after a run, want none", kept, n)
	}
}

// publisher returns a Publisher on rdb under prefix, closed at cleanup.
func publisher(t *testing.T, rdb *redis.Client, prefix string) *bus.Publisher {
	t.Helper()
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, StreamPrefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	return pub
}

// TestBlobRetentionRemovesStaleTempFiles: temp files of uploads a crash
// interrupted, made after the storage was opened (a process killed
// mid-upload and restarted at once), are removed by the hourly job once
// they are older than the storage's TempMaxAge; a young one, a Put that may
// still run, stays.
func TestBlobRetentionRemovesStaleTempFiles(t *testing.T) {
	t.Parallel()
	st := migrated(t)
	root := t.TempDir()
	blobs, err := blob.NewDir(blob.DirConfig{Dir: root, TempMaxAge: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	stale, young := filepath.Join(root, "tmp", "put-crashed"), filepath.Join(root, "tmp", "put-running")
	for _, f := range []string{stale, young} {
		if err := os.WriteFile(f, []byte("partial upload"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-2 * time.Hour)
	if err := os.Chtimes(stale, old, old); err != nil {
		t.Fatal(err)
	}
	if err := scheduler.BlobRetention(st, blobs, 7*24*time.Hour, logger())(t.Context(), time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("stale temp file: %v, want it removed", err)
	}
	if _, err := os.Stat(young); err != nil {
		t.Errorf("young temp file: %v, want it kept", err)
	}
}

// redriveFixture returns a migrated store, the test's Redis, a stream
// prefix of its own and a publisher on them.
func redriveFixture(t *testing.T) (*store.Store, *redis.Client, string, *bus.Publisher) {
	t.Helper()
	st := migrated(t)
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	return st, rdb, prefix, publisher(t, rdb, prefix)
}

// TestRedriveLeavesDocumentsTheQueuesMayHold: a document uploaded after the
// oldest entry a group of its queues has not finished may be waiting in
// that backlog, and is not re-driven; one uploaded before it is.
func TestRedriveLeavesDocumentsTheQueuesMayHold(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	st, rdb, prefix, pub := redriveFixture(t)
	key := strings.Repeat("ef", 32)
	now := time.Now()
	// An upload an hour ago that the processor has not read yet: a
	// backlog an hour deep.
	stream := prefix + events.TypeDocumentUploaded
	waiting := fmt.Sprintf("%d-0", now.Add(-time.Hour).UnixMilli())
	if err := rdb.XAdd(ctx, &redis.XAddArgs{Stream: stream, ID: waiting, Values: []any{"payload", "{}"}}).Err(); err != nil {
		t.Fatal(err)
	}
	if err := rdb.XGroupCreate(ctx, stream, "document-processor", "0").Err(); err != nil {
		t.Fatal(err)
	}
	before, queued := events.NewID(), events.NewID()
	beforeEvent, queuedEvent := events.NewID(), events.NewID()
	err := st.WithTx(ctx, func(tx *store.Tx) error {
		return tx.ApplyDocumentsUploaded(ctx,
			[]*events.DocumentUploaded{upload(before, key, now.Add(-2*time.Hour)), upload(queued, key, now.Add(-time.Hour))},
			[]string{beforeEvent, queuedEvent})
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Del(ctx, "conveyor:redrive:"+before, "conveyor:redrive:"+queued) })
	queues := map[string][]string{"document-processor": {events.TypeDocumentUploaded}}
	if err := scheduler.Redrive(st, pub, rdb, 15*time.Minute, queues, logger())(ctx, now); err != nil {
		t.Fatal(err)
	}
	xs, err := rdb.XRange(ctx, stream, "("+waiting, "+").Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(xs) != 1 || xs[0].Values["_watermill_message_uuid"] != beforeEvent {
		t.Fatalf("re-drives %v, want one: the document uploaded before the backlog (%s), not the one it may hold (%s)", xs, beforeEvent, queuedEvent)
	}
}
