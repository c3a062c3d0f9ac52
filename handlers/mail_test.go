package handlers_test

import (
	"encoding/base64"
	"io"
	"mime"
	"mime/quotedprintable"
	"net/mail"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/handlers"
	"github.com/conveyor/conveyor/internal/testenv"
)

func TestOutbox(t *testing.T) {
	t.Parallel()
	date := time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)
	tests := []struct {
		name        string
		mail        handlers.Mail
		wantTo      string
		wantSubject string
	}{
		{
			name:        "plain",
			mail:        handlers.Mail{From: "Conveyor <conveyor@localhost>", To: "reader@example.com", Subject: "Your report", Body: "The report is ready.\n"},
			wantTo:      "reader@example.com",
			wantSubject: "Your report",
		},
		{
			name:        "non-ASCII header and body",
			mail:        handlers.Mail{From: "conveyor@localhost", To: "Jörg <joerg@example.com>", Subject: "Grüße aus Köln", Body: "Schöne Grüße, 日本語。\n"},
			wantTo:      "joerg@example.com",
			wantSubject: "Grüße aus Köln",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			// The folder is created on the first send.
			dir := filepath.Join(t.TempDir(), "outbox")
			o := handlers.Outbox{Dir: dir, Logger: discard}
			m := tt.mail
			m.ID, m.Date = events.NewID(), date
			// A redelivered send writes the same file again.
			for i := range 2 {
				if err := o.Send(t.Context(), m); err != nil {
					t.Fatalf("Send %d: %v", i+1, err)
				}
			}
			files, err := os.ReadDir(dir)
			if err != nil {
				t.Fatal(err)
			}
			if len(files) != 1 || files[0].Name() != m.ID+".eml" {
				var names []string
				for _, f := range files {
					names = append(names, f.Name())
				}
				t.Fatalf("outbox holds %v, want only %s.eml", names, m.ID)
			}
			file, err := os.Open(filepath.Join(dir, m.ID+".eml"))
			if err != nil {
				t.Fatal(err)
			}
			defer file.Close()
			msg, err := mail.ReadMessage(file)
			if err != nil {
				t.Fatalf("parse %s.eml: %v", m.ID, err)
			}
			h := msg.Header
			if id := h.Get("Message-Id"); id != "<"+m.ID+"@conveyor>" {
				t.Errorf("Message-Id = %q, want <%s@conveyor>", id, m.ID)
			}
			if to, err := h.AddressList("To"); err != nil || len(to) != 1 || to[0].Address != tt.wantTo {
				t.Errorf("To = %v, %v; want %s", to, err, tt.wantTo)
			}
			if subject, err := new(mime.WordDecoder).DecodeHeader(h.Get("Subject")); err != nil || subject != tt.wantSubject {
				t.Errorf("Subject = %q, %v; want %q", subject, err, tt.wantSubject)
			}
			if d, err := h.Date(); err != nil || !d.Equal(date) {
				t.Errorf("Date = %v, %v; want %v", d, err, date)
			}
			if h.Get("From") == "" {
				t.Error("no From header")
			}
			var body io.Reader = msg.Body
			switch enc := strings.ToLower(h.Get("Content-Transfer-Encoding")); enc {
			case "quoted-printable":
				body = quotedprintable.NewReader(body)
			case "base64":
				body = base64.NewDecoder(base64.StdEncoding, body)
			case "", "7bit", "8bit":
			default:
				t.Fatalf("unexpected Content-Transfer-Encoding %q", enc)
			}
			text, err := io.ReadAll(body)
			if err != nil {
				t.Fatalf("read body: %v", err)
			}
			if mailText(string(text)) != mailText(m.Body) {
				t.Errorf("body = %q, want %q", text, m.Body)
			}
		})
	}
}

func TestOutboxRefusesBadAddress(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	err := handlers.Outbox{Dir: dir}.Send(t.Context(), handlers.Mail{
		ID: events.NewID(), From: "conveyor@localhost", To: "not an address", Subject: "x", Body: "y", Date: time.Now(),
	})
	if err == nil || !bus.IsPermanent(err) {
		t.Fatalf("Send = %v, want a permanent error", err)
	}
	if files, _ := os.ReadDir(dir); len(files) != 0 {
		t.Errorf("outbox holds %d files after a refused mail", len(files))
	}
}

// TestSMTPAgainstMailpit checks the parts of an SMTP URL that only a server
// can show: tls=required insists on STARTTLS, smtps speaks TLS from the
// first byte, and credentials are not sent over a connection without TLS
// unless the URL allows it with auth=plain-insecure.
func TestSMTPAgainstMailpit(t *testing.T) {
	t.Parallel()
	plain := testenv.StartMailpit(t)
	authFile := filepath.Join(t.TempDir(), "smtp-users")
	// Mailpit splits its auth file at white space: no space in the
	// password.
	if err := os.WriteFile(authFile, []byte("alice:s3cret-p@ss\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// Mailpit requires authentication and offers PLAIN and LOGIN without
	// TLS.
	authed := testenv.StartMailpit(t, "--smtp-auth-file", authFile, "--smtp-auth-allow-insecure")
	tests := []struct {
		name     string
		mailpit  *testenv.Mailpit
		url      string
		wantErr  string
		wantUser string
	}{
		{name: "tls=none", mailpit: plain, url: "smtp://" + plain.SMTPAddr + "?tls=none"},
		{name: "STARTTLS when offered, and it is not", mailpit: plain, url: "smtp://" + plain.SMTPAddr},
		{name: "tls=required without STARTTLS", mailpit: plain, url: "smtp://" + plain.SMTPAddr + "?tls=required", wantErr: "smtp send"},
		{name: "smtps to a plain server", mailpit: plain, url: "smtps://" + plain.SMTPAddr, wantErr: "smtp send"},
		{
			// STARTTLS when offered, and it is not: the password stays
			// home, though this Mailpit would take it.
			name:    "credentials are sent only inside TLS",
			mailpit: authed,
			url:     "smtp://alice:s3cret-p%40ss@" + authed.SMTPAddr,
			wantErr: "does not offer STARTTLS",
		},
		{
			name:     "credentials in clear text when the URL allows it",
			mailpit:  authed,
			url:      "smtp://alice:s3cret-p%40ss@" + authed.SMTPAddr + "?tls=none&auth=plain-insecure",
			wantUser: "alice",
		},
		{name: "no credentials where they are required", mailpit: authed, url: "smtp://" + authed.SMTPAddr + "?tls=none", wantErr: "Authentication required"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			m := handlers.Mail{
				ID: events.NewID(), From: "conveyor@localhost", To: "reader@example.com",
				Subject: tt.name, Body: "Body.", Date: time.Now(),
			}
			err := newSMTP(t, tt.url).Send(t.Context(), m)
			var got []testenv.MailpitMessage
			for _, msg := range tt.mailpit.Messages(t) {
				if msg.Subject == tt.name {
					got = append(got, msg)
				}
			}
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("Send = %v, want an error containing %q", err, tt.wantErr)
				}
				if len(got) != 0 {
					t.Errorf("Mailpit received %d mails, want none", len(got))
				}
				return
			}
			if err != nil {
				t.Fatalf("Send: %v", err)
			}
			if len(got) != 1 || got[0].Username != tt.wantUser {
				t.Errorf("Mailpit received %+v, want one mail sent as user %q", got, tt.wantUser)
			}
		})
	}
}
