package handlers_test

import (
	"context"
	"net/mail"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/handlers"
	"github.com/conveyor/conveyor/idem"
	"github.com/conveyor/conveyor/internal/testenv"
)

// newMarks returns an idempotency store on the test's Redis, under its
// prefix.
func newMarks(t *testing.T, f *busFixture) *idem.Store {
	t.Helper()
	s, err := idem.New(idem.Config{Redis: f.rdb, Prefix: f.prefix + "idem:"})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func newSender(t *testing.T, f *busFixture, mailer handlers.Mailer, marks handlers.Marks) *handlers.EmailSender {
	t.Helper()
	return newSenderWithLease(t, f, mailer, marks, 0)
}

// newSenderWithLease is newSender with the emails' lock lease (0: the
// default).
func newSenderWithLease(t *testing.T, f *busFixture, mailer handlers.Mailer, marks handlers.Marks, lease time.Duration) *handlers.EmailSender {
	t.Helper()
	s, err := handlers.NewEmailSender(handlers.EmailSenderConfig{
		Mailer:    mailer,
		Marks:     marks,
		Publisher: f.pub,
		Timeout:   liveness,
		LockLease: lease,
		Logger:    discard,
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func newSMTP(t *testing.T, url string) *handlers.SMTP {
	t.Helper()
	m, err := handlers.NewSMTP(handlers.SMTPConfig{URL: url, Timeout: liveness})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func request(to, subject, body string) *events.EmailRequested {
	return &events.EmailRequested{
		EmailID:     events.NewID(),
		To:          to,
		Subject:     subject,
		Body:        body,
		RequestedAt: time.Now().Truncate(time.Second),
	}
}

// mailText normalises a mail body for comparison: line ends and the
// trailing line break are transport details.
func mailText(s string) string {
	return strings.TrimSpace(strings.ReplaceAll(s, "\r\n", "\n"))
}

func TestEmailSent(t *testing.T) {
	t.Parallel()
	mp := testenv.StartMailpit(t)
	tests := []struct {
		name    string
		to      string
		subject string
		body    string
		wantTo  string
	}{
		{name: "plain", to: "plain@example.com", subject: "Your report", body: "Hello,\nthe report is ready.\n", wantTo: "plain@example.com"},
		{
			name:    "display name and non-ASCII text",
			to:      "Jörg Müller <joerg@example.com>",
			subject: "Grüße — Ihr Bericht",
			body:    "Hallo Jörg,\n\nder Bericht ist fertig: 日本語も大丈夫。\n",
			wantTo:  "joerg@example.com",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newBus(t)
			marks := newMarks(t, f)
			s := newSender(t, f, newSMTP(t, mp.SMTPURL), marks)
			req := request(tt.to, tt.subject, tt.body)
			// Requested an hour ago, as an email held back until its
			// send_at: its Date is when it is sent.
			req.RequestedAt = req.RequestedAt.Add(-time.Hour)
			ctx, env := handling(t, events.TypeEmailRequested)

			// The second call is a redelivery of the same event: the mail
			// is not sent again, but email.sent is published again, with
			// the same id, in case the first publish was lost.
			before := time.Now().Truncate(time.Second)
			for i := range 2 {
				if err := s.Handle(ctx, req); err != nil {
					t.Fatalf("Handle %d: %v", i+1, err)
				}
			}
			after := time.Now()

			var got []testenv.MailpitMessage
			for _, m := range mp.Messages(t) {
				if len(m.To) == 1 && m.To[0] == tt.wantTo {
					got = append(got, m)
				}
			}
			if len(got) != 1 {
				t.Fatalf("Mailpit received %d mails for %s, want exactly 1", len(got), tt.wantTo)
			}
			m := got[0]
			if m.Subject != tt.subject || m.From != "conveyor@localhost" || m.MessageID != req.EmailID+"@conveyor" {
				t.Errorf("mail = %+v, want subject %q from conveyor@localhost with Message-ID %s@conveyor", m, tt.subject, req.EmailID)
			}
			if text := mailText(mp.Text(t, m.ID)); text != mailText(tt.body) {
				t.Errorf("body = %q, want %q", text, mailText(tt.body))
			}
			raw, err := mail.ReadMessage(strings.NewReader(mp.Raw(t, m.ID)))
			if err != nil {
				t.Fatalf("parse the received mail: %v", err)
			}
			if id := raw.Header.Get("Message-Id"); id != "<"+req.EmailID+"@conveyor>" {
				t.Errorf("Message-Id header = %q, want <%s@conveyor>", id, req.EmailID)
			}
			if date, err := raw.Header.Date(); err != nil || date.Before(before) || date.After(after) {
				t.Errorf("Date header = %v, %v; want the time of the send, within [%v, %v]", date, err, before, after)
			}

			sent := f.entries(t, events.TypeEmailSent)
			if len(sent) != 2 {
				t.Fatalf("%d email.sent published by two calls, want 2", len(sent))
			}
			for _, e := range sent {
				checkEnvelope(t, e, events.TypeEmailSent, events.DerivedID(env.ID, "sent"), env)
				ev := decode[events.EmailSent](t, e)
				if ev.EmailID != req.EmailID || ev.To != tt.to || ev.MessageID != "<"+req.EmailID+"@conveyor>" || ev.Attempts != 1 || ev.SentAt.IsZero() {
					t.Errorf("email.sent = %+v", ev)
				}
			}
			if n := len(f.entries(t, events.TypeEmailFailed)); n != 0 {
				t.Errorf("%d email.failed published too", n)
			}
			if _, ok, err := marks.Get(t.Context(), "email-sent:"+req.EmailID); err != nil || !ok {
				t.Errorf("sent mark = %t, %v; want it recorded", ok, err)
			}
		})
	}
}

// TestEmailServerDown: an unreachable server is a transient failure, left
// to the retries.
func TestEmailServerDown(t *testing.T) {
	t.Parallel()
	f := newBus(t)
	marks := newMarks(t, f)
	s := newSender(t, f, newSMTP(t, "smtp://"+refusedAddr+"?tls=none"), marks)
	req := request("reader@example.com", "Hello", "Body.")
	ctx, _ := handling(t, events.TypeEmailRequested)
	err := s.Handle(ctx, req)
	if err == nil || bus.IsPermanent(err) || !strings.Contains(err.Error(), "send email "+req.EmailID) {
		t.Fatalf("Handle = %v, want a retryable send error", err)
	}
	for _, typ := range []string{events.TypeEmailSent, events.TypeEmailFailed} {
		if n := len(f.entries(t, typ)); n != 0 {
			t.Errorf("%d %s published for a send that will be retried", n, typ)
		}
	}
	if _, ok, err := marks.Get(t.Context(), "email-sent:"+req.EmailID); err != nil || ok {
		t.Errorf("sent mark = %t, %v; want none", ok, err)
	}
}

// TestEmailRejected: Mailpit refuses recipients outside its allow list with
// 550, a permanent rejection: email.failed at once, on the first attempt.
func TestEmailRejected(t *testing.T) {
	t.Parallel()
	mp := testenv.StartMailpit(t, `--smtp-allowed-recipients=@allowed\.test$`)
	f := newBus(t)
	marks := newMarks(t, f)
	s := newSender(t, f, newSMTP(t, mp.SMTPURL), marks)
	req := request("someone@elsewhere.test", "Hello", "Body.")
	ctx, env := handling(t, events.TypeEmailRequested)
	if err := s.Handle(ctx, req); err != nil {
		t.Fatalf("Handle = %v, want nil: a rejection is final, not retried", err)
	}
	failed := f.entries(t, events.TypeEmailFailed)
	if len(failed) != 1 {
		t.Fatalf("%d email.failed published, want 1", len(failed))
	}
	checkEnvelope(t, failed[0], events.TypeEmailFailed, events.DerivedID(env.ID, "failed"), env)
	ev := decode[events.EmailFailed](t, failed[0])
	if ev.EmailID != req.EmailID || ev.Attempts != 1 || !strings.Contains(ev.Reason, "550") || ev.FailedAt.IsZero() {
		t.Errorf("email.failed = %+v, want attempt 1 with the 550 reply as the reason", ev)
	}
	if n := len(f.entries(t, events.TypeEmailSent)); n != 0 {
		t.Errorf("%d email.sent published for a rejected mail", n)
	}
	if got := mp.Messages(t); len(got) != 0 {
		t.Errorf("Mailpit received %d mails, want none", len(got))
	}
	if _, ok, err := marks.Get(t.Context(), "email-sent:"+req.EmailID); err != nil || ok {
		t.Errorf("sent mark = %t, %v; want none", ok, err)
	}

	// The same server accepts an allowed recipient: the rejection was
	// about the address.
	ok := request("someone@allowed.test", "Hello", "Body.")
	okCtx, _ := handling(t, events.TypeEmailRequested)
	if err := s.Handle(okCtx, ok); err != nil {
		t.Fatalf("Handle for an allowed recipient: %v", err)
	}
	if got := mp.Messages(t); len(got) != 1 {
		t.Errorf("Mailpit received %d mails, want the allowed one", len(got))
	}
}

// TestEmailThroughRouter runs the sender in a real router with two
// attempts per event and checks the final outcome of each kind of send.
func TestEmailThroughRouter(t *testing.T) {
	t.Parallel()
	mp := testenv.StartMailpit(t, `--smtp-allowed-recipients=@allowed\.test$`)
	tests := []struct {
		name         string
		url          string
		to           string
		outcome      string
		suffix       string
		wantAttempts int
		reason       string
		wantMails    int
	}{
		{
			name:         "delivered",
			url:          mp.SMTPURL,
			to:           "reader@allowed.test",
			outcome:      events.TypeEmailSent,
			suffix:       "sent",
			wantAttempts: 1,
			wantMails:    1,
		},
		{
			name:         "server down: failed after the retries",
			url:          "smtp://" + refusedAddr + "?tls=none",
			to:           "reader@allowed.test",
			outcome:      events.TypeEmailFailed,
			suffix:       "failed",
			wantAttempts: 2,
			reason:       "smtp send",
		},
		{
			// The relay refuses the sender, not the message: a setup
			// problem that every email shares, left to the retries.
			name:         "sender refused: failed after the retries",
			url:          refusingSMTP(t, "550 5.7.1 sender address rejected"),
			to:           "reader@allowed.test",
			outcome:      events.TypeEmailFailed,
			suffix:       "failed",
			wantAttempts: 2,
			reason:       "550",
		},
		{
			name:         "message too large for the relay: failed without a retry",
			url:          refusingSMTP(t, "552 5.3.4 message size exceeds fixed limit"),
			to:           "reader@allowed.test",
			outcome:      events.TypeEmailFailed,
			suffix:       "failed",
			wantAttempts: 1,
			reason:       "552",
		},
		{
			name:         "rejected: failed without a retry",
			url:          mp.SMTPURL,
			to:           "reader@elsewhere.test",
			outcome:      events.TypeEmailFailed,
			suffix:       "failed",
			wantAttempts: 1,
			reason:       "550",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newBus(t)
			s := newSender(t, f, newSMTP(t, tt.url), newMarks(t, f))
			router, err := bus.NewRouter(bus.RouterConfig{
				Client:       f.rdb,
				Consumer:     "test-1",
				StreamPrefix: f.prefix,
				DrainTimeout: 5 * time.Second,
				Logger:       discard,
			})
			if err != nil {
				t.Fatal(err)
			}
			group := f.prefix + handlers.EmailGroup
			retry := bus.RetryPolicy{MaxAttempts: 2, MinBackoff: 10 * time.Millisecond}
			if err := bus.Handle(router, group, s.Handle, bus.WithRetry(retry)); err != nil {
				t.Fatal(err)
			}
			runRouter(t, router)

			req := request(tt.to, "Through the router "+f.prefix, "Body.")
			id, err := f.pub.PublishEvent(t.Context(), req)
			if err != nil {
				t.Fatal(err)
			}
			got := f.waitEntries(t, tt.outcome, 1)
			if got[0].ID != events.DerivedID(id, tt.suffix) {
				t.Errorf("%s id = %s, want %s", tt.outcome, got[0].ID, events.DerivedID(id, tt.suffix))
			}
			switch tt.outcome {
			case events.TypeEmailSent:
				if ev := decode[events.EmailSent](t, got[0]); ev.Attempts != tt.wantAttempts {
					t.Errorf("email.sent = %+v, want attempts %d", ev, tt.wantAttempts)
				}
			case events.TypeEmailFailed:
				ev := decode[events.EmailFailed](t, got[0])
				if ev.Attempts != tt.wantAttempts || !strings.Contains(ev.Reason, tt.reason) {
					t.Errorf("email.failed = %+v, want attempts %d and a reason containing %q", ev, tt.wantAttempts, tt.reason)
				}
			}

			// The handler acked the entry itself: nothing is pending and
			// nothing was dead-lettered.
			f.waitAcked(t, events.TypeEmailRequested, group)
			if dead, err := bus.NewDeadLetters(f.rdb).Count(t.Context(), group); err != nil || dead != 0 {
				t.Errorf("dead letters = %d, %v; want none", dead, err)
			}
			for _, typ := range []string{events.TypeEmailSent, events.TypeEmailFailed} {
				want := 0
				if typ == tt.outcome {
					want = 1
				}
				if n := len(f.entries(t, typ)); n != want {
					t.Errorf("%d %s published, want %d", n, typ, want)
				}
			}
			mails := 0
			for _, m := range mp.Messages(t) {
				if m.Subject == req.Subject {
					mails++
				}
			}
			if mails != tt.wantMails {
				t.Errorf("Mailpit received %d mails, want %d", mails, tt.wantMails)
			}
		})
	}
}

// countingMailer counts sends; the first waits for hold (if set), and
// each runs then (if set) before it succeeds, as a server that accepts the
// mail.
type countingMailer struct {
	sends atomic.Int64
	hold  chan struct{}
	then  func()
}

func (m *countingMailer) Send(ctx context.Context, _ handlers.Mail) error {
	if m.sends.Add(1) == 1 && m.hold != nil {
		<-m.hold
	}
	if m.then != nil {
		m.then()
	}
	return nil
}

// TestEmailConcurrentDeliveries: two deliveries of one email at once (the
// request published twice) send it once. The second finds the email being
// sent and is retried; its retry finds it sent, and does not send.
func TestEmailConcurrentDeliveries(t *testing.T) {
	t.Parallel()
	f := newBus(t)
	marks := newMarks(t, f)
	mailer := &countingMailer{hold: make(chan struct{})}
	s := newSender(t, f, mailer, marks)
	req := request("reader@example.com", "Hello", "Body.")

	first := sendingHeld(t, s, mailer, req)
	ctx, _ := handling(t, events.TypeEmailRequested)
	err := s.Handle(ctx, req)
	if err == nil || bus.IsPermanent(err) || !strings.Contains(err.Error(), "another delivery of this email is sending it") {
		t.Errorf("second delivery during the first's send: %v, want a retryable error", err)
	}
	close(mailer.hold)
	if err := <-first; err != nil {
		t.Fatalf("first delivery: %v", err)
	}
	retry, _ := handling(t, events.TypeEmailRequested)
	if err := s.Handle(retry, req); err != nil {
		t.Fatalf("retry of the second delivery: %v", err)
	}
	if n := mailer.sends.Load(); n != 1 {
		t.Errorf("%d sends, want 1", n)
	}
	if n := len(f.entries(t, events.TypeEmailSent)); n != 2 {
		t.Errorf("%d email.sent published, want one per completed delivery (2)", n)
	}
	if n, err := f.rdb.Exists(t.Context(), f.prefix+"idem:email-sending:"+req.EmailID).Result(); err != nil || n != 0 {
		t.Errorf("sending lock left after the sends (%d, %v)", n, err)
	}

	// The same email named in capitals is the same email.
	upper := *req
	upper.EmailID = strings.ToUpper(req.EmailID)
	ctx, _ = handling(t, events.TypeEmailRequested)
	if err := s.Handle(ctx, &upper); err != nil {
		t.Fatalf("delivery of the email named in capitals: %v", err)
	}
	if n := mailer.sends.Load(); n != 1 {
		t.Errorf("%d sends after the email named in capitals, want 1", n)
	}

	// A mark written before ids were lowercased, under the id in capitals,
	// still counts.
	old := request("reader@example.com", "Hello", "Body.")
	old.EmailID = strings.ToUpper(old.EmailID)
	if _, err := marks.Set(t.Context(), "email-sent:"+old.EmailID, "2026-01-01T00:00:00Z"); err != nil {
		t.Fatal(err)
	}
	ctx, _ = handling(t, events.TypeEmailRequested)
	if err := s.Handle(ctx, old); err != nil {
		t.Fatalf("delivery of an email marked sent under its id in capitals: %v", err)
	}
	if n := mailer.sends.Load(); n != 1 {
		t.Errorf("%d sends after the email marked sent in capitals, want 1", n)
	}

	// A failed send lets the next delivery send at once.
	down := newSender(t, f, newSMTP(t, "smtp://"+refusedAddr+"?tls=none"), marks)
	other := request("reader@example.com", "Hello", "Body.")
	ctx, _ = handling(t, events.TypeEmailRequested)
	if err := down.Handle(ctx, other); err == nil || !strings.Contains(err.Error(), "send email") {
		t.Fatalf("send to a closed port: %v, want a send error", err)
	}
	ctx, _ = handling(t, events.TypeEmailRequested)
	if err := s.Handle(ctx, other); err != nil {
		t.Fatalf("delivery after a failed send: %v", err)
	}
	if n := mailer.sends.Load(); n != 2 {
		t.Errorf("%d sends, want 2", n)
	}
}

// TestEmailCancelledAfterAcceptance: the handler's context is cancelled
// (shutdown, the handler timeout) while the server accepts the mail. The
// send is recorded all the same, so the redelivery does not send it again.
func TestEmailCancelledAfterAcceptance(t *testing.T) {
	t.Parallel()
	f := newBus(t)
	marks := newMarks(t, f)
	mailer := &countingMailer{}
	s := newSender(t, f, mailer, marks)
	req := request("reader@example.com", "Hello", "Body.")
	hctx, _ := handling(t, events.TypeEmailRequested)
	ctx, cancel := context.WithCancel(hctx)
	mailer.then = cancel
	if err := s.Handle(ctx, req); err != nil {
		t.Errorf("Handle cancelled after the server accepted: %v, want nil", err)
	}
	if _, ok, err := marks.Get(t.Context(), "email-sent:"+req.EmailID); err != nil || !ok {
		t.Errorf("sent mark = %t, %v; want it recorded", ok, err)
	}
	mailer.then = nil
	again, _ := handling(t, events.TypeEmailRequested)
	if err := s.Handle(again, req); err != nil {
		t.Fatalf("redelivery: %v", err)
	}
	if n := mailer.sends.Load(); n != 1 {
		t.Errorf("%d sends, want 1", n)
	}
	if n := len(f.entries(t, events.TypeEmailSent)); n != 2 {
		t.Errorf("%d email.sent published, want 2", n)
	}
}

// TestEmailLockLease: a send keeps its email's lock past the lock's lease
// by renewing it, while the lock of a holder that died (kill -9 during a
// send) ends with its lease, and the email is sent by the redelivery.
func TestEmailLockLease(t *testing.T) {
	t.Parallel()
	// The lock is renewed every second: only a renewal stalled for two
	// seconds loses it.
	const lease = 3 * time.Second
	f := newBus(t)
	marks := newMarks(t, f)
	mailer := &countingMailer{hold: make(chan struct{})}
	s := newSenderWithLease(t, f, mailer, marks, lease)
	req := request("reader@example.com", "Hello", "Body.")
	first := sendingHeld(t, s, mailer, req)
	// The send outlasts its lock's first lease: the lock lives on only as
	// it is renewed.
	testenv.WaitRenewed(t, f.rdb, f.prefix+"idem:email-sending:"+strings.ToLower(req.EmailID), lease, 2)
	ctx, _ := handling(t, events.TypeEmailRequested)
	if err := s.Handle(ctx, req); err == nil || !strings.Contains(err.Error(), "another delivery of this email is sending it") {
		t.Errorf("a delivery during a send longer than the lock's lease: %v, want a retryable error", err)
	}
	close(mailer.hold)
	if err := <-first; err != nil {
		t.Fatalf("first delivery: %v", err)
	}
	if n := mailer.sends.Load(); n != 1 {
		t.Errorf("%d sends, want 1", n)
	}

	// A holder that died: its lock is never renewed nor released.
	other := request("reader@example.com", "Hello", "Body.")
	if _, ok, err := marks.Lock(t.Context(), "email-sending:"+other.EmailID, lease); err != nil || !ok {
		t.Fatalf("lock as a holder that dies: %v, %v", ok, err)
	}
	ctx, _ = handling(t, events.TypeEmailRequested)
	if err := s.Handle(ctx, other); err == nil {
		t.Errorf("a delivery while a dead holder's lock lives: nil, want a retryable error")
	}
	time.Sleep(lease + 500*time.Millisecond)
	ctx, _ = handling(t, events.TypeEmailRequested)
	if err := s.Handle(ctx, other); err != nil {
		t.Fatalf("redelivery after the dead holder's lease: %v", err)
	}
	if n := mailer.sends.Load(); n != 2 {
		t.Errorf("%d sends, want 2", n)
	}
}

// sendingHeld starts handling req with s on a goroutine and returns once
// its send (held by mailer) started; the channel gets Handle's result.
func sendingHeld(t *testing.T, s *handlers.EmailSender, mailer *countingMailer, req *events.EmailRequested) <-chan error {
	t.Helper()
	first := make(chan error, 1)
	go func() {
		ctx, _ := handling(t, events.TypeEmailRequested)
		first <- s.Handle(ctx, req)
	}()
	deadline := time.Now().Add(liveness)
	for mailer.sends.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no send after %s", liveness)
		}
		time.Sleep(time.Millisecond)
	}
	return first
}

// TestEmailDuplicateOnItsLastAttempt: a delivery of an email that finds it
// being sent by another delivery on its last attempt leaves the email to
// that one: it is neither dead-lettered nor failed, and the email is sent
// once.
func TestEmailDuplicateOnItsLastAttempt(t *testing.T) {
	t.Parallel()
	f := newBus(t)
	mailer := &countingMailer{hold: make(chan struct{})}
	s := newSenderWithLease(t, f, mailer, newMarks(t, f), time.Second)
	router, group := lastAttemptRouter(t, f, s)
	runRouter(t, router)
	req := request("reader@example.com", "Twice", "Body.")
	for range 2 { // the request published twice, under two event ids
		if _, err := f.pub.PublishEvent(t.Context(), req); err != nil {
			t.Fatal(err)
		}
	}
	// The second delivery finds the first sending and finishes first.
	deadline := time.Now().Add(liveness)
	for {
		var count int64
		// The group exists once the first delivery is sending.
		if mailer.sends.Load() == 1 {
			pending, err := f.rdb.XPending(t.Context(), f.prefix+events.TypeEmailRequested, group).Result()
			if err != nil {
				t.Fatal(err)
			}
			if count = pending.Count; count == 1 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no second delivery finished while the first sends (pending %d, sends %d)", count, mailer.sends.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
	close(mailer.hold)
	f.waitEntries(t, events.TypeEmailSent, 1)
	f.waitAcked(t, events.TypeEmailRequested, group)
	if dead, err := bus.NewDeadLetters(f.rdb).Count(t.Context(), group); err != nil || dead != 0 {
		t.Errorf("dead letters = %d, %v; want none", dead, err)
	}
	if n := len(f.entries(t, events.TypeEmailFailed)); n != 0 {
		t.Errorf("%d email.failed published", n)
	}
	if n := mailer.sends.Load(); n != 1 {
		t.Errorf("%d sends, want 1", n)
	}
}

// TestEmailDeadHolderOnTheLastAttempt: a delivery on its last attempt that
// finds the email's lock held by a delivery that died (this entry, claimed
// after a kill -9 during its send) waits for that lock to end and sends
// the email, instead of leaving it to a holder that is gone.
func TestEmailDeadHolderOnTheLastAttempt(t *testing.T) {
	t.Parallel()
	const lease = time.Second
	f := newBus(t)
	marks := newMarks(t, f)
	mailer := &countingMailer{}
	s := newSenderWithLease(t, f, mailer, marks, lease)
	router, group := lastAttemptRouter(t, f, s)
	req := request("reader@example.com", "Dead holder", "Body.")
	// The dead holder's lock: never renewed, never released.
	if _, ok, err := marks.Lock(t.Context(), "email-sending:"+req.EmailID, lease); err != nil || !ok {
		t.Fatalf("lock as a holder that dies: %v, %v", ok, err)
	}
	runRouter(t, router)
	if _, err := f.pub.PublishEvent(t.Context(), req); err != nil {
		t.Fatal(err)
	}
	f.waitEntries(t, events.TypeEmailSent, 1)
	f.waitAcked(t, events.TypeEmailRequested, group)
	if n := mailer.sends.Load(); n != 1 {
		t.Errorf("%d sends, want 1", n)
	}
	if dead, err := bus.NewDeadLetters(f.rdb).Count(t.Context(), group); err != nil || dead != 0 {
		t.Errorf("dead letters = %d, %v; want none", dead, err)
	}
}

// lastAttemptRouter returns a router running s in the email sender's group
// (also returned) with one attempt per event: every attempt is the last.
// It is not running yet.
func lastAttemptRouter(t *testing.T, f *busFixture, s *handlers.EmailSender) (*bus.Router, string) {
	t.Helper()
	router, err := bus.NewRouter(bus.RouterConfig{
		Client: f.rdb, Consumer: "test-1", StreamPrefix: f.prefix, DrainTimeout: 5 * time.Second, Logger: discard,
	})
	if err != nil {
		t.Fatal(err)
	}
	group := f.prefix + handlers.EmailGroup
	if err := bus.Handle(router, group, s.Handle, bus.WithRetry(bus.RetryPolicy{MaxAttempts: 1})); err != nil {
		t.Fatal(err)
	}
	return router, group
}
