package testenv_test

import (
	"errors"
	"fmt"
	"net"
	"net/mail"
	"net/smtp"
	"net/textproto"
	"strings"
	"testing"

	"github.com/conveyor/conveyor/internal/testenv"
)

// sendMail sends one message per subject over a single SMTP session.
func sendMail(t *testing.T, addr, from, to string, subjects ...string) error {
	t.Helper()
	c, err := smtp.Dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	for _, subject := range subjects {
		if err := c.Mail(from); err != nil {
			return err
		}
		if err := c.Rcpt(to); err != nil {
			return err
		}
		w, err := c.Data()
		if err != nil {
			return err
		}
		msg := "From: " + from + "\r\nTo: " + to + "\r\nSubject: " + subject +
			"\r\nMessage-ID: <" + subject + "@testenv>\r\n\r\nBody of " + subject + ".\r\n"
		if _, err := w.Write([]byte(msg)); err != nil {
			return err
		}
		if err := w.Close(); err != nil {
			return err
		}
	}
	return c.Quit()
}

func TestMailpit(t *testing.T) {
	t.Parallel()
	var addr string
	t.Run("receives", func(t *testing.T) {
		mp := testenv.StartMailpit(t)
		addr = mp.SMTPAddr
		if want := "smtp://" + mp.SMTPAddr + "?tls=none"; mp.SMTPURL != want {
			t.Errorf("SMTPURL = %q, want %q", mp.SMTPURL, want)
		}
		if got := mp.Messages(t); len(got) != 0 {
			t.Fatalf("new Mailpit holds %d messages", len(got))
		}

		// More than one page of the API, to cover the paging.
		subjects := make([]string, 205)
		for i := range subjects {
			subjects[i] = fmt.Sprintf("m%03d", i)
		}
		if err := sendMail(t, mp.SMTPAddr, "sender@example.com", "rcpt@example.com", subjects...); err != nil {
			t.Fatalf("send: %v", err)
		}
		got := mp.Messages(t)
		if len(got) != len(subjects) {
			t.Fatalf("Messages returned %d messages, want %d", len(got), len(subjects))
		}
		for i, m := range got {
			if m.Subject != subjects[i] || m.MessageID != subjects[i]+"@testenv" || m.From != "sender@example.com" ||
				len(m.To) != 1 || m.To[0] != "rcpt@example.com" || m.ID == "" {
				t.Fatalf("message %d = %+v, want subject %s oldest first, from sender@, to rcpt@", i, m, subjects[i])
			}
		}
		if text := strings.TrimSpace(mp.Text(t, got[0].ID)); text != "Body of m000." {
			t.Errorf("Text = %q, want %q", text, "Body of m000.")
		}
		raw, err := mail.ReadMessage(strings.NewReader(mp.Raw(t, got[1].ID)))
		if err != nil {
			t.Fatalf("parse Raw: %v", err)
		}
		if id := raw.Header.Get("Message-Id"); id != "<m001@testenv>" {
			t.Errorf("raw Message-Id = %q, want <m001@testenv>", id)
		}
	})
	// The subtest's cleanup stopped Mailpit: its SMTP port is closed now.
	if addr != "" {
		if c, err := net.Dial("tcp", addr); err == nil {
			_ = c.Close()
			t.Errorf("Mailpit still accepts connections on %s after cleanup", addr)
		}
	}
}

func TestMailpitFlags(t *testing.T) {
	t.Parallel()
	mp := testenv.StartMailpit(t, `--smtp-allowed-recipients=@allowed\.test$`)
	if err := sendMail(t, mp.SMTPAddr, "sender@example.com", "ok@allowed.test", "accepted"); err != nil {
		t.Fatalf("send to an allowed recipient: %v", err)
	}
	err := sendMail(t, mp.SMTPAddr, "sender@example.com", "nobody@elsewhere.test", "refused")
	var te *textproto.Error
	if !errors.As(err, &te) || te.Code != 550 {
		t.Fatalf("send to a refused recipient: %v, want a 550 reply", err)
	}
	if got := mp.Messages(t); len(got) != 1 || got[0].Subject != "accepted" {
		t.Errorf("Messages = %+v, want only the accepted one", got)
	}
}
