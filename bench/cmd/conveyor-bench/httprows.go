package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/store"
)

const (
	httpClients     = 64
	batchClients    = 8
	batchEvents     = 1000
	uploadBytes     = 100 << 20 // 100 MiB
	uploadRuns      = 5
	mib             = 1 << 20
	trimEvery       = 500 * time.Millisecond
	trimMaxLen      = 200_000
	ingestStream    = events.TypeEmailRequested
	minimalDocument = "bench:minimal:document"
)

// apiPlacement describes where the API runs, for the notes.
func (b *bench) apiPlacement() string {
	if b.opts.apiMode == "inproc" {
		return "API in the bench process (api.New(...).Handler() on net/http)"
	}
	return "API = the `conveyor api` binary (go build ./cmd/conveyor) in its own process"
}

// minimalPlacement describes where the minimal baseline servers run.
func (b *bench) minimalPlacement() string {
	if b.opts.apiMode == "inproc" {
		return "minimal servers in the bench process"
	}
	return "minimal servers in their own process (this program, re-executed)"
}

// profiledHTTP profiles an HTTP measurement only when the API runs in this
// process; otherwise the profile would show the load generator.
func (b *bench) profiledHTTP(key string, fn func() error) (string, error) {
	if b.opts.apiMode != "inproc" {
		return "", fn()
	}
	return b.profiled(key, fn)
}

// trimLoop keeps the ingest stream bounded while nobody consumes it.
func (b *bench) trimLoop(ctx context.Context) func() {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for sleep(ctx, trimEvery) == nil {
			_ = b.env.rdb.XTrimMaxLenApprox(ctx, ingestStream, trimMaxLen, 0).Err()
		}
	}()
	return func() { cancel(); <-done }
}

func eventJSON(ev *events.EmailRequested) map[string]any {
	return map[string]any{"type": events.TypeEmailRequested, "data": ev}
}

func runIngest(ctx context.Context, b *bench) error {
	apiSrv, err := b.startAPI(ctx)
	if err != nil {
		return err
	}
	defer apiSrv.stop()
	minSrv, err := b.startMinimal(ctx, "xadd", ingestStream)
	if err != nil {
		return err
	}
	defer minSrv.stop()
	defer b.trimLoop(ctx)()

	single, err := json.Marshal(eventJSON(newEmail()))
	if err != nil {
		return err
	}
	post := func(url string, body []byte) func() (*http.Request, error) {
		return func() (*http.Request, error) {
			req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
			if err == nil {
				req.Header.Set("Content-Type", "application/json")
			}
			return req, err
		}
	}
	var minRes, apiRes loadResult
	if minRes, err = httpLoad(ctx, httpClients, b.opts.warmup, b.opts.duration, post(minSrv.url+"/v1/events", single), expectStatus(http.StatusAccepted, 1)); err != nil {
		return err
	}
	b.add(line{key: "ingest.minimal", what: "7a. minimal net/http server: one XADD per request", value: minRes.rate(), unit: "req/s",
		role: roleBaseline, chart: "throughput", notes: loadNotes(minRes, httpClients)})
	if err := b.env.rdb.Unlink(ctx, ingestStream).Err(); err != nil {
		return err
	}
	var cpu string
	prof, err := b.profiledHTTP("ingest-single", func() error {
		var err error
		c0 := b.cpuSnapshot(apiSrv.pid)
		defer func() { cpu = cpuNote(c0, b.cpuSnapshot(apiSrv.pid)) }()
		apiRes, err = httpLoad(ctx, httpClients, b.opts.warmup, b.opts.duration, post(apiSrv.url+"/v1/events", single), expectStatus(http.StatusAccepted, 1))
		return err
	})
	if err != nil {
		return err
	}
	b.add(line{key: "ingest.single", what: "7b. Conveyor POST /v1/events (email.requested)", value: apiRes.rate(), unit: "req/s",
		baseline: "ingest.minimal", target: target{ratioAtLeast, 0.5}, role: roleConveyor, chart: "throughput",
		notes: loadNotes(apiRes, httpClients) + "; no client id (no dedup mark); " + cpu + " (warm-up included)", profile: prof})
	if err := b.env.rdb.Unlink(ctx, ingestStream).Err(); err != nil {
		return err
	}

	batch := make([]map[string]any, batchEvents)
	for i := range batch {
		batch[i] = eventJSON(newEmail())
	}
	batchBody, err := json.Marshal(map[string]any{"events": batch})
	if err != nil {
		return err
	}
	var batchRes loadResult
	prof, err = b.profiledHTTP("ingest-batch", func() error {
		var err error
		c0 := b.cpuSnapshot(apiSrv.pid)
		defer func() { cpu = cpuNote(c0, b.cpuSnapshot(apiSrv.pid)) }()
		batchRes, err = httpLoad(ctx, batchClients, b.opts.warmup, b.opts.duration, post(apiSrv.url+"/v1/events/batch", batchBody),
			func(resp *http.Response, body []byte) (int64, error) {
				if resp.StatusCode != http.StatusOK {
					return 0, fmt.Errorf("status %d: %.200s", resp.StatusCode, body)
				}
				return parseAccepted(body)
			})
		return err
	})
	if err != nil {
		return err
	}
	b.add(line{key: "ingest.batch", what: "7c. Conveyor POST /v1/events/batch, 1,000 events per request", value: batchRes.rate(), unit: "events/s",
		baseline: "ceiling.xadd", target: target{atLeast, 100_000}, role: roleConveyor, chart: "throughput",
		notes: fmt.Sprintf("%d clients, %s KiB bodies; %s; %d failed requests; %s (warm-up included)",
			batchClients, formatNum(float64(len(batchBody))/1024), batchRes.window, batchRes.failures, cpu),
		profile: prof})
	b.note("ingest and read: %s, %s; load from %d keep-alive clients (%d for batches) in the bench process; the ingest stream is trimmed to ~%s entries every %s since nothing consumes it.",
		b.apiPlacement(), b.minimalPlacement(), httpClients, batchClients, formatNum(trimMaxLen), trimEvery)
	return nil
}

func loadNotes(r loadResult, clients int) string {
	s := fmt.Sprintf("%d clients; %s", clients, r.window)
	if r.failures > 0 {
		s += fmt.Sprintf("; %d failed requests (first: %s)", r.failures, oneLine(r.firstFailure))
	}
	return s
}

func runRead(ctx context.Context, b *bench) error {
	// One processed document in the read model, written through the
	// store's own apply path.
	id := events.NewID()
	up := &events.DocumentUploaded{
		DocID: id, Filename: "report.pdf", Size: 123456, SHA256: hex64(1), BlobKey: hex64(1),
		DeclaredContentType: "application/pdf", UploadedAt: time.Now().UTC(),
	}
	if err := b.env.st.WithTx(ctx, func(tx *store.Tx) error {
		return tx.ApplyDocumentsUploaded(ctx, []*events.DocumentUploaded{up}, []string{events.NewID()})
	}); err != nil {
		return err
	}
	apiSrv, err := b.startAPI(ctx)
	if err != nil {
		return err
	}
	defer apiSrv.stop()
	url := apiSrv.url + "/v1/documents/" + id
	resp, err := http.Get(url) // warm-up: fills the cache
	if err != nil {
		return err
	}
	view, err := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("warm-up GET: status %d: %s", resp.StatusCode, view)
	}
	if err := b.env.rdb.Set(ctx, minimalDocument, view, 0).Err(); err != nil {
		return err
	}
	minSrv, err := b.startMinimal(ctx, "get", minimalDocument)
	if err != nil {
		return err
	}
	defer minSrv.stop()
	get := func(u string) func() (*http.Request, error) {
		return func() (*http.Request, error) { return http.NewRequest(http.MethodGet, u, nil) }
	}
	minRes, err := httpLoad(ctx, httpClients, b.opts.warmup, b.opts.duration, get(minSrv.url+"/v1/documents/"+id), expectStatus(http.StatusOK, 1))
	if err != nil {
		return err
	}
	b.add(line{key: "read.minimal", what: "9a. minimal net/http server: one Redis GET per request", value: minRes.rate(), unit: "req/s",
		role: roleBaseline, chart: "throughput", notes: loadNotes(minRes, httpClients)})
	var apiRes loadResult
	var cpu string
	prof, err := b.profiledHTTP("read", func() error {
		var err error
		c0 := b.cpuSnapshot(apiSrv.pid)
		defer func() { cpu = cpuNote(c0, b.cpuSnapshot(apiSrv.pid)) }()
		apiRes, err = httpLoad(ctx, httpClients, b.opts.warmup, b.opts.duration, get(url), expectStatus(http.StatusOK, 1))
		return err
	})
	if err != nil {
		return err
	}
	b.add(line{key: "read.api", what: "9b. Conveyor GET /v1/documents/{id}, cache hits", value: apiRes.rate(), unit: "req/s",
		baseline: "read.minimal", target: target{ratioAtLeast, 0.5}, role: roleConveyor, chart: "throughput",
		notes: fmt.Sprintf("%s; one id, %d-byte body; %s (warm-up included)", loadNotes(apiRes, httpClients), len(view), cpu), profile: prof})
	return nil
}

func hex64(seed byte) string {
	const digits = "0123456789abcdef"
	out := make([]byte, 64)
	for i := range out {
		out[i] = digits[(int(seed)+i)%16]
	}
	return string(out)
}

func runUpload(ctx context.Context, b *bench) error {
	apiSrv, err := b.startAPI(ctx, fmt.Sprintf("MAX_UPLOAD_BYTES=%d", 2*uploadBytes))
	if err != nil {
		return err
	}
	defer apiSrv.stop()
	var idleRSS int64
	if apiSrv.pid != 0 {
		if idleRSS, err = peakRSS(apiSrv.pid); err != nil {
			return err
		}
	}
	chunk := make([]byte, mib)
	_, _ = rand.Read(chunk)

	// Raw disk: the same bytes to a file on the blob folder's disk, then
	// fsync. Both measurements take turns, run by run, after the earlier
	// rows' dirty pages are written out (a CHECKPOINT and a sync): an
	// fsync also waits for other files' data the kernel flushes with it,
	// so writers left over from the earlier rows (PostgreSQL's checkpoint,
	// autovacuum) would otherwise slow whichever side ran while they did.
	dir := filepath.Join(b.env.tmp, "blobs")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if _, err := b.env.pgx.Exec(ctx, "CHECKPOINT"); err != nil {
		return fmt.Errorf("checkpoint before the upload row: %w", err)
	}
	syncDisks()
	var disk, up []time.Duration
	client := &http.Client{Timeout: 5 * time.Minute}
	prof, err := b.profiledHTTP("upload", func() error {
		for i := range uploadRuns + 1 {
			syncDisks()
			d, err := writeFile(filepath.Join(dir, "raw-write.bin"), chunk, i)
			if err != nil {
				return err
			}
			syncDisks()
			u, err := upload(ctx, client, apiSrv.url+"/v1/documents", chunk, 100+i)
			if err != nil {
				return err
			}
			if i > 0 {
				disk, up = append(disk, d), append(up, u)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	rate := func(d time.Duration) float64 { return float64(uploadBytes) / mib / d.Seconds() }
	// Each side reports its best run: on a shared disk a run can only be
	// slowed by others' write-back, never sped up, so the fastest of
	// several is the closest to what the side itself costs. The medians
	// go in the notes.
	disk, up = sortDurations(disk), sortDurations(up)
	spread := func(d []time.Duration) string {
		return fmt.Sprintf("median %.0f, slowest %.0f MiB/s", rate(percentile(d, 50)), rate(d[len(d)-1]))
	}
	b.add(line{key: "upload.disk", what: "8a. raw disk: write 100 MiB to a file + fsync", value: rate(disk[0]), unit: "MiB/s",
		role: roleBaseline, chart: "throughput", notes: fmt.Sprintf("best of %d after a warm-up (%s), 1 MiB writes, same file system as BLOB_DIR, taking turns with 8b, each after a sync", uploadRuns, spread(disk))})
	b.add(line{key: "upload.api", what: "8b. Conveyor POST /v1/documents, one 100 MiB multipart file", value: rate(up[0]), unit: "MiB/s",
		baseline: "upload.disk", target: target{ratioAtLeast, 0.5}, role: roleConveyor, chart: "throughput",
		notes: fmt.Sprintf("%s; best of %d after a warm-up (%s); request sent → 202 received", b.apiPlacement(), uploadRuns, spread(up)), profile: prof})
	if apiSrv.pid == 0 {
		b.note("upload: no RSS with -api inproc (the API must be its own process for its RSS to be its own).")
		return nil
	}
	peak, err := peakRSS(apiSrv.pid)
	if err != nil {
		return err
	}
	b.add(line{what: "8c. `conveyor api` peak RSS (VmHWM) while uploading", value: float64(peak) / mib, unit: "MiB",
		target: target{atMost, 64}, role: roleConveyor, worst: true, notes: fmt.Sprintf("VmHWM was %.1f MiB before the uploads", float64(idleRSS)/mib)})
	return nil
}

// writeFile writes uploadBytes of chunk (the first bytes varied by run) to
// path, fsyncs, and returns the time taken. The file is removed after.
func writeFile(path string, chunk []byte, run int) (time.Duration, error) {
	start := time.Now()
	f, err := os.Create(path)
	if err != nil {
		return 0, err
	}
	defer os.Remove(path)
	first := append([]byte(nil), chunk...)
	binary.BigEndian.PutUint64(first, uint64(run))
	for i := 0; i < uploadBytes/mib; i++ {
		c := chunk
		if i == 0 {
			c = first
		}
		if _, err := f.Write(c); err != nil {
			_ = f.Close()
			return 0, err
		}
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return 0, err
	}
	if err := f.Close(); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

// upload posts one multipart file of uploadBytes, streamed, with its
// Content-Length, and returns the time from sending to the 202.
func upload(ctx context.Context, client *http.Client, url string, chunk []byte, run int) (time.Duration, error) {
	var head, tail bytes.Buffer
	mw := multipart.NewWriter(&head)
	if _, err := mw.CreateFormFile("file", fmt.Sprintf("bench-%d.bin", run)); err != nil {
		return 0, err
	}
	headLen := head.Len()
	if err := mw.Close(); err != nil {
		return 0, err
	}
	tail.Write(head.Bytes()[headLen:])
	head.Truncate(headLen)
	first := append([]byte(nil), chunk...)
	binary.BigEndian.PutUint64(first, uint64(run))
	parts := []io.Reader{&head, bytes.NewReader(first)}
	for i := 1; i < uploadBytes/mib; i++ {
		parts = append(parts, bytes.NewReader(chunk))
	}
	parts = append(parts, &tail)
	size := int64(head.Len() + uploadBytes + tail.Len())
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, io.MultiReader(parts...))
	if err != nil {
		return 0, err
	}
	req.ContentLength = size
	req.Header.Set("Content-Type", mw.FormDataContentType())
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	d := time.Since(start)
	if resp.StatusCode != http.StatusAccepted {
		return 0, fmt.Errorf("upload: status %d: %s", resp.StatusCode, body)
	}
	return d, nil
}
