package api

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"path"
	"strings"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/conveyor/conveyor/blob"
	"github.com/conveyor/conveyor/cache"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/store"
)

// DocumentView is the JSON of a document. Fields not known yet are null.
type DocumentView struct {
	DocID       string     `json:"doc_id"`
	Status      string     `json:"status"`
	Filename    *string    `json:"filename"`
	Size        *int64     `json:"size"`
	ContentType *string    `json:"content_type"`
	SHA256      *string    `json:"sha256"`
	Words       *int64     `json:"words"`
	Lines       *int64     `json:"lines"`
	Summary     *string    `json:"summary"`
	Error       *string    `json:"error"`
	UploadedAt  *time.Time `json:"uploaded_at"`
	ProcessedAt *time.Time `json:"processed_at"`
}

func documentView(d store.Document) DocumentView {
	return DocumentView{
		DocID:       d.DocID,
		Status:      d.Status,
		Filename:    nullStr(d.Filename.String, d.Filename.Valid),
		Size:        nullInt(d.Size.Int64, d.Size.Valid),
		ContentType: nullStr(d.ContentType.String, d.ContentType.Valid),
		SHA256:      nullStr(d.SHA256.String, d.SHA256.Valid),
		Words:       nullInt(d.Words.Int64, d.Words.Valid),
		Lines:       nullInt(d.Lines.Int64, d.Lines.Valid),
		Summary:     nullStr(d.Summary.String, d.Summary.Valid),
		Error:       nullStr(d.Error.String, d.Error.Valid),
		UploadedAt:  nullTime(d.UploadedAt.Time, d.UploadedAt.Valid),
		ProcessedAt: nullTime(d.ProcessedAt.Time, d.ProcessedAt.Valid),
	}
}

func nullStr(s string, ok bool) *string {
	if !ok {
		return nil
	}
	return &s
}

func nullInt(n int64, ok bool) *int64 {
	if !ok {
		return nil
	}
	return &n
}

func nullTime(t time.Time, ok bool) *time.Time {
	if !ok {
		return nil
	}
	t = t.UTC()
	return &t
}

type acceptedDocument struct {
	DocID  string `json:"doc_id"`
	Status string `json:"status"`
}

// acceptedTTL is how long the api remembers what it accepted, so a read
// right after the 202 answers "processing" before the projector catches up.
const acceptedTTL = time.Hour

func acceptedDocKey(id string) string   { return "accepted:document:" + id }
func acceptedEmailKey(id string) string { return "accepted:email:" + id }

// multipartSlack allows for multipart headers and small fields around the
// file.
const multipartSlack = 64 << 10

func (a *API) postDocument(w http.ResponseWriter, r *http.Request) {
	mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/form-data" {
		writeError(w, http.StatusUnsupportedMediaType, "unsupported_media_type",
			"upload a document as multipart/form-data with a field named file")
		return
	}
	if r.ContentLength > a.cfg.MaxUploadBytes+multipartSlack {
		writeError(w, http.StatusRequestEntityTooLarge, "too_large",
			fmt.Sprintf("the document exceeds the limit of %d bytes", a.cfg.MaxUploadBytes))
		return
	}
	if !a.uploadSlot(r.Context()) {
		w.Header().Set("Retry-After", "2")
		writeError(w, http.StatusServiceUnavailable, "too_many_uploads",
			fmt.Sprintf("the server is receiving its limit of %d uploads at once; retry later", a.cfg.MaxConcurrentUploads))
		return
	}
	defer a.uploadDone()
	r.Body = http.MaxBytesReader(w, r.Body, a.cfg.MaxUploadBytes+multipartSlack)
	rc := http.NewResponseController(w)
	r = r.WithContext(context.WithValue(r.Context(), bodyReadKey{}, func() {
		_ = rc.SetWriteDeadline(time.Now().Add(replyTime))
	}))
	a.idempotent(w, r, "upload", func() []string { return []string{""} }, a.verifyUpload, a.upload)
}

// uploadSlot takes one of the MaxConcurrentUploads slots, waiting up to
// UploadWait for one. It reports whether it got one; uploadDone gives it
// back.
func (a *API) uploadSlot(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, a.cfg.UploadWait)
	defer cancel()
	if a.uploads.Acquire(ctx, 1) != nil {
		return false
	}
	a.metrics.uploads.Inc()
	return true
}

func (a *API) uploadDone() {
	a.metrics.uploads.Dec()
	a.uploads.Release(1)
}

// replyTime is how long an upload whose body is read has for storing,
// publishing and answering. The server's write timeout runs from the
// request's start, so a body that took most of it (a large file on a slow
// link) would leave no time to answer: the event published, the client
// would see a reset and upload again.
const replyTime = time.Minute

// bodyReadKey holds, in an upload's context, the function to call once its
// body is read: it gives the reply its own time (replyTime).
type bodyReadKey struct{}

// bodyRead calls the function bodyReadKey holds in ctx, if any.
func bodyRead(ctx context.Context) {
	if f, ok := ctx.Value(bodyReadKey{}).(func()); ok {
		f()
	}
}

// upload streams the file part into blob storage and publishes
// document.uploaded. It returns the response to send.
func (a *API) upload(r *http.Request) (int, any) {
	ctx := r.Context()
	put := &storedPart{a: a, ctx: ctx}
	up, status, refused := a.readUpload(r, put.keep)
	info := put.info
	if status != 0 {
		put.remove()
		return status, refused
	}
	if call := idemCallFrom(ctx); call != nil {
		call.bodyFingerprint = up.fingerprint()
	}
	ev := &events.DocumentUploaded{
		DocID:               events.NewID(),
		Filename:            up.filename,
		Size:                info.Size,
		SHA256:              info.SHA256,
		BlobKey:             info.Key,
		DeclaredContentType: up.declared,
		Notify:              up.notify,
		UploadedAt:          time.Now().UTC(),
	}
	view := DocumentView{
		DocID: ev.DocID, Status: store.DocumentProcessing, Filename: &ev.Filename, Size: &ev.Size,
		SHA256: &ev.SHA256, UploadedAt: &ev.UploadedAt,
	}
	resp := acceptedDocument{DocID: ev.DocID, Status: store.DocumentProcessing}
	if out := a.accept(ctx, acceptedDocKey(ev.DocID), view, ev, resp); !out.ok {
		// The bytes are removed only if the event surely was not
		// written: after a lost connection it may have been, and an
		// accepted document must find its bytes.
		if !out.maybePublished {
			put.remove()
		} else {
			a.log.Warn("keeping the bytes of an upload whose event may have been published", "doc_id", ev.DocID, "blob_key", info.Key)
		}
		return out.status, out.body
	}
	return http.StatusAccepted, resp
}

// uploadForm is what an upload's multipart body holds, as it is recorded.
type uploadForm struct {
	sha256   string
	filename string // cleaned
	declared string // the file part's media type, without parameters
	notify   string // normalised address, or ""
}

// fingerprint identifies the upload for its Idempotency-Key: a key reused
// for other bytes, another name or another notify address is refused.
func (u uploadForm) fingerprint() string {
	return fingerprint([]byte("upload\x00" + u.sha256 + "\x00" + u.filename + "\x00" + u.declared + "\x00" + u.notify))
}

// readUpload reads an upload's multipart body, handing the file part to
// keep, which returns its SHA-256. It returns the form, or the error
// response (a non-zero status) for a body that is refused.
func (a *API) readUpload(r *http.Request, keep func(io.Reader) (string, error)) (uploadForm, int, any) {
	// However it ends, the body is read: the reply gets its own time.
	defer bodyRead(r.Context())
	var up uploadForm
	_, params, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	boundary := params["boundary"]
	if boundary == "" {
		st, resp := errResp(http.StatusUnsupportedMediaType, "unsupported_media_type", "the body is not multipart/form-data: no boundary")
		return up, st, resp
	}
	// The multipart reader reads 4 KiB at a time; a large buffer under it
	// turns those into memory copies instead of as many reads of the
	// connection.
	body := newCloseWatch(r.Body, boundary)
	mr := multipart.NewReader(bufio.NewReaderSize(body, 256<<10), boundary)
	haveFile := false
	refuse := func(st int, resp any) (uploadForm, int, any) { return up, st, resp }
	for {
		part, err := mr.NextPart()
		if errors.Is(err, io.EOF) && body.closed {
			break
		}
		if errors.Is(err, io.EOF) {
			// A body that ends without the close delimiter was cut:
			// the fields after the cut would be lost without a word.
			// (mime/multipart answers a cut right after a part's
			// delimiter line with a plain io.EOF.)
			err = fmt.Errorf("the body ends without its closing boundary: %w", io.ErrUnexpectedEOF)
		}
		if err != nil {
			return refuse(a.uploadReadError(err))
		}
		switch part.FormName() {
		case "file":
			if haveFile {
				part.Close()
				return refuse(errResp(http.StatusBadRequest, "bad_request", "send exactly one field named file"))
			}
			up.sha256, err = keep(part)
			part.Close()
			if err != nil {
				return refuse(a.uploadReadError(err))
			}
			haveFile = true
			up.filename = cleanFilename(part.FileName())
			up.declared = part.Header.Get("Content-Type")
		case "notify":
			b, err := io.ReadAll(io.LimitReader(part, 1025))
			part.Close()
			if err != nil {
				return refuse(a.uploadReadError(err))
			}
			if len(b) > 1024 {
				return refuse(validationResp("notify", "must be an email address of at most 1024 bytes"))
			}
			up.notify = strings.TrimSpace(string(b))
		default:
			_, err := io.Copy(io.Discard, part)
			part.Close()
			if err != nil {
				return refuse(a.uploadReadError(err))
			}
		}
	}
	if !haveFile {
		return refuse(errResp(http.StatusBadRequest, "missing_file", "the multipart body has no field named file"))
	}
	if up.notify != "" {
		addr, err := events.ParseAddress(up.notify)
		if err != nil {
			return refuse(validationResp("notify", err.Error()))
		}
		up.notify = addr.String()
	}
	if mt, _, err := mime.ParseMediaType(up.declared); err == nil {
		up.declared = mt
	} else {
		up.declared = ""
	}
	return up, 0, nil
}

// closeWatch passes a multipart body through and notes whether it held
// the close delimiter ("--boundary--" after a line break: CRLF, or a bare
// LF, which mime/multipart takes too).
type closeWatch struct {
	r      io.Reader
	delim  []byte
	tail   []byte // the last len(delim)-1 bytes read, to find a delimiter split between reads
	closed bool
}

func newCloseWatch(r io.Reader, boundary string) *closeWatch {
	delim := []byte("\n--" + boundary + "--")
	// A body may begin with the delimiter: it has no line break before.
	return &closeWatch{r: r, delim: delim, tail: []byte("\n")}
}

func (c *closeWatch) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if n > 0 && !c.closed {
		b := p[:n]
		keep := len(c.delim) - 1
		joined := append(c.tail, b[:min(len(b), keep)]...)
		c.closed = bytes.Contains(joined, c.delim) || bytes.Contains(b, c.delim)
		if len(b) >= keep {
			c.tail = append(c.tail[:0], b[len(b)-keep:]...)
		} else {
			c.tail = append(c.tail[:0], joined[max(0, len(joined)-keep):]...)
		}
	}
	return n, err
}

// verifyUpload reads a repeated upload's body for the fingerprint its
// Idempotency-Key was recorded with, and answers 422 if it differs. A
// retry that will finish a prepared upload (pending) stores the bytes
// again: its event refers to them, and since the first request stored
// them, blob retention may have removed them (bytes a failed document
// also used, say), while bytes stored now are kept for a retention.
func (a *API) verifyUpload(r *http.Request, want string, pending bool) (int, any) {
	put := &storedPart{a: a, ctx: r.Context()}
	keep := func(part io.Reader) (string, error) {
		h := sha256.New()
		n, err := io.Copy(h, io.LimitReader(part, a.cfg.MaxUploadBytes+1))
		if err == nil && n > a.cfg.MaxUploadBytes {
			err = blob.ErrTooLarge
		}
		return hex.EncodeToString(h.Sum(nil)), err
	}
	if pending {
		keep = put.keep
	}
	up, status, resp := a.readUpload(r, keep)
	if status == 0 && up.fingerprint() == want {
		return 0, nil
	}
	put.remove() // bytes of another request, or of a refused body
	if status != 0 {
		return status, resp
	}
	return keyReused()
}

// storedPart stores an upload's file part (keep, for readUpload) and can
// remove it again (remove) when the request is refused after all.
type storedPart struct {
	a      *API
	ctx    context.Context
	info   blob.Info
	stored bool
}

func (p *storedPart) keep(part io.Reader) (string, error) {
	var err error
	p.info, err = p.a.cfg.Blobs.Put(p.ctx, part, p.a.cfg.MaxUploadBytes)
	p.stored = err == nil
	return p.info.SHA256, err
}

// remove deletes the stored bytes, unless identical bytes were there
// before (another document uses them) or an upload of the same bytes came
// since (it relies on them).
func (p *storedPart) remove() {
	if !p.stored || !p.info.Created {
		return
	}
	if _, err := p.a.cfg.Blobs.DeleteIfUnchanged(context.WithoutCancel(p.ctx), p.info); err != nil {
		p.a.log.Error("remove bytes of a refused upload", "blob_key", p.info.Key, "error", err)
	}
}

// uploadReadError is the answer to an upload whose body could not be read
// or stored: the client's fault (4xx), or the storage's (507 when it is
// full, else 503, each logged: an operator must see them).
func (a *API) uploadReadError(err error) (int, any) {
	limit := a.cfg.MaxUploadBytes
	var mbe *http.MaxBytesError
	if errors.Is(err, blob.ErrTooLarge) || errors.As(err, &mbe) {
		return errResp(http.StatusRequestEntityTooLarge, "too_large", fmt.Sprintf("the document exceeds the limit of %d bytes", limit))
	}
	if status, resp, ok := clientReadError(err, "the upload took too long"); ok {
		return status, resp
	}
	// A part header that is not valid MIME (a control character in a
	// filename, say) is the client's error, as is a body cut short.
	var hdrErr textproto.ProtocolError
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.As(err, &hdrErr) || strings.Contains(err.Error(), "multipart") {
		return errResp(http.StatusBadRequest, "bad_multipart", "the multipart body is malformed: "+err.Error())
	}
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		a.log.Error("cannot store an upload: the blob storage is full", "error", err)
		return errResp(http.StatusInsufficientStorage, "insufficient_storage", "the document storage is full; retry later")
	}
	a.log.Error("cannot store an upload", "error", err)
	return errResp(http.StatusServiceUnavailable, "unavailable", "cannot store the document right now; retry later")
}

// clientReadError is the answer to a request whose body could not be read
// through its client's doing, and ok is false for any other error: a
// client that went away gets 499 (only the logs and metrics see it), one
// that sent its body too slowly for the read deadline gets 408 with
// message slow. A deadline that passed fails the read with a net.Error
// whose Timeout is true (os.ErrDeadlineExceeded, wrapped), which is how it
// is told apart.
func clientReadError(err error, slow string) (status int, resp any, ok bool) {
	if errors.Is(err, context.Canceled) {
		status, resp = errResp(499, "client_closed", "the client went away")
		return status, resp, true
	}
	var perr interface{ Timeout() bool }
	if errors.As(err, &perr) && perr.Timeout() {
		status, resp = errResp(http.StatusRequestTimeout, "timeout", slow)
		return status, resp, true
	}
	return 0, nil, false
}

// cleanFilename keeps the base name, without control characters, at most
// 255 bytes.
func cleanFilename(name string) string {
	name = path.Base(strings.ReplaceAll(name, `\`, "/"))
	name = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return -1
		}
		return r
	}, name)
	if name == "." || name == "/" {
		name = ""
	}
	if len(name) > events.MaxFilenameBytes {
		// Cut at the start of the rune that crosses the limit. (The
		// name's runes are whole: strings.Map wrote them.)
		end := events.MaxFilenameBytes
		for end > 0 && !utf8.RuneStart(name[end]) {
			end--
		}
		name = name[:end]
	}
	return name
}

func (a *API) getDocument(w http.ResponseWriter, r *http.Request) {
	// A UUID may come in capitals; every key (the cache's, the accepted
	// marker's) uses the lowercase form that the api hands out.
	id := strings.ToLower(r.PathValue("doc_id"))
	if !events.IsUUID(id) {
		writeError(w, http.StatusBadRequest, "malformed_id", "doc_id must be a UUID")
		return
	}
	// Only a row read from the database is cached; a not-found is an error,
	// which Fetch never caches, and the accepted marker is answered outside
	// the cache. The projector relies on it: it does not invalidate the key
	// of a row it creates.
	view, err := cache.Fetch(r.Context(), a.cfg.Cache, store.DocumentKey(id), a.cfg.CacheTTL,
		func(ctx context.Context) (DocumentView, error) {
			ctx, cancel := context.WithTimeout(ctx, readTimeout)
			defer cancel()
			d, err := a.cfg.Reader.Document(ctx, id)
			if err != nil {
				return DocumentView{}, err
			}
			return documentView(d), nil
		})
	if err == nil && view.UploadedAt == nil {
		// The outcome was projected before the upload itself (they travel
		// on different streams): the facts of the upload are still in
		// what the api accepted.
		view = a.withAcceptedUpload(r.Context(), view)
	}
	a.respondRead(w, r, err, view, acceptedDocKey(id), "document")
}

func (a *API) withAcceptedUpload(ctx context.Context, view DocumentView) DocumentView {
	raw, ok, err := a.cfg.Idem.Get(ctx, acceptedDocKey(view.DocID))
	if err != nil || !ok {
		return view
	}
	var up DocumentView
	if json.Unmarshal([]byte(raw), &up) != nil {
		return view
	}
	view.Filename, view.Size, view.SHA256, view.UploadedAt = up.Filename, up.Size, up.SHA256, up.UploadedAt
	return view
}

// readTimeout bounds the database read of a GET. The read is shared by
// the concurrent GETs of one id (cache.Fetch), and outlives the request
// that started it, so it needs a bound of its own.
const readTimeout = 10 * time.Second

// respondRead answers a read: the row, else what the api itself accepted
// but the projector has not written yet, else 404.
func (a *API) respondRead(w http.ResponseWriter, r *http.Request, err error, view any, acceptedKey, what string) {
	switch {
	case err == nil:
		writeJSON(w, http.StatusOK, view)
	case errors.Is(err, context.Canceled) && r.Context().Err() != nil:
		// The client went away: nothing failed here.
		writeError(w, 499, "client_closed", "the client went away")
	case errors.Is(err, store.ErrNotFound):
		raw, ok, aerr := a.cfg.Idem.Get(r.Context(), acceptedKey)
		if aerr != nil {
			// Not knowing whether the api accepted it, the answer
			// cannot be 404: an accepted id is never "not found".
			a.log.Error("read accepted marker", "error", aerr)
			writeError(w, http.StatusServiceUnavailable, "unavailable", "cannot read right now; retry later")
			return
		}
		if ok {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusOK)
			_, _ = io.WriteString(w, raw)
			return
		}
		writeError(w, http.StatusNotFound, "not_found", "no "+what+" with this id")
	default:
		a.log.Error("read "+what, "error", err)
		writeError(w, http.StatusServiceUnavailable, "unavailable", "cannot read right now; retry later")
	}
}

func errBody(code, msg string) errorBody {
	return errorBody{Error: errorDetail{Code: code, Message: msg}}
}

func errResp(status int, code, msg string) (int, any) { return status, errBody(code, msg) }

func validationResp(field, msg string) (int, any) {
	ve := &events.ValidationError{Fields: []events.FieldError{{Field: field, Message: msg}}}
	return http.StatusUnprocessableEntity, errorBody{Error: errorDetail{Code: "validation_failed", Message: ve.Error(), Fields: ve.Fields}}
}

func fingerprint(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}
