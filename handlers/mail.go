package handlers

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	gomail "github.com/wneessen/go-mail"
	"github.com/wneessen/go-mail/smtp"

	"github.com/conveyor/conveyor/bus"
)

// Mail is one email to send.
type Mail struct {
	// ID is the email id; it becomes the Message-ID, so a receiving system
	// can recognise a duplicate too.
	ID      string
	From    string
	To      string
	Subject string
	Body    string
	Date    time.Time
}

// Mailer sends mail. A permanent failure (the server rejected the message
// for good) is returned wrapped in bus.Permanent.
type Mailer interface {
	Send(ctx context.Context, m Mail) error
}

func (m Mail) msg() (*gomail.Msg, error) {
	msg := gomail.NewMsg()
	if err := msg.From(m.From); err != nil {
		return nil, bus.Permanent(fmt.Errorf("from address %q: %w", m.From, err))
	}
	if err := msg.To(m.To); err != nil {
		return nil, bus.Permanent(fmt.Errorf("to address %q: %w", m.To, err))
	}
	msg.Subject(m.Subject)
	msg.SetMessageIDWithValue(m.ID + "@conveyor")
	msg.SetDateWithValue(m.Date)
	msg.SetBodyString(gomail.TypeTextPlain, m.Body)
	return msg, nil
}

// SMTPConfig configures an SMTP mailer.
type SMTPConfig struct {
	// URL is smtp://[user:pass@]host[:port] (STARTTLS when offered; add
	// ?tls=required to insist, ?tls=none to never try) or
	// smtps://[user:pass@]host[:port] (implicit TLS). Required.
	URL string
	// Timeout bounds each of a send's two parts: the connection (its
	// greeting, TLS and authentication), then the message. Defaults to
	// 30s.
	Timeout time.Duration
}

// SMTP sends through an SMTP server with go-mail.
type SMTP struct {
	opts []gomail.Option
	host string
}

// NewSMTP parses the URL and returns an SMTP mailer.
func NewSMTP(cfg SMTPConfig) (*SMTP, error) {
	if cfg.Timeout == 0 {
		cfg.Timeout = 30 * time.Second
	}
	// Errors never quote the URL: it may hold a password.
	u, err := url.Parse(cfg.URL)
	if err != nil {
		return nil, errors.New("SMTP URL is not a valid URL (percent-encode special characters in the user name or password)")
	}
	if u.Hostname() == "" {
		return nil, errors.New("SMTP URL names no host")
	}
	// One message per connection: without the NOOP go-mail sends before a
	// message to check the connection (it is fresh) and the RSET after it
	// (the QUIT ends the session), two round trips less per mail, and none
	// between the server's acceptance and Send's return.
	opts := []gomail.Option{gomail.WithTimeout(cfg.Timeout), gomail.WithoutNoop(), gomail.WithoutRset()}
	port := 25
	switch u.Scheme {
	case "smtp":
		port = 587
		switch u.Query().Get("tls") {
		case "", "opportunistic":
			opts = append(opts, gomail.WithTLSPolicy(gomail.TLSOpportunistic))
		case "required":
			opts = append(opts, gomail.WithTLSPolicy(gomail.TLSMandatory))
		case "none":
			opts = append(opts, gomail.WithTLSPolicy(gomail.NoTLS))
			port = 25
		default:
			return nil, fmt.Errorf("SMTP URL: tls must be opportunistic, required or none")
		}
	case "smtps":
		port = 465
		opts = append(opts, gomail.WithSSL())
	default:
		return nil, fmt.Errorf("SMTP URL scheme must be smtp or smtps, not %q", u.Scheme)
	}
	if p := u.Port(); p != "" {
		if port, err = strconv.Atoi(p); err != nil {
			return nil, fmt.Errorf("SMTP URL port %q: %w", p, err)
		}
		// url.Parse checks only that the port is digits. A port no
		// server can listen on would fail every send, as a transient
		// error retried until each email gives up.
		if port < 1 || port > 65535 {
			return nil, fmt.Errorf("SMTP URL port %d is not in 1..65535", port)
		}
	}
	opts = append(opts, gomail.WithPort(port))
	if u.User != nil {
		pass, _ := u.User.Password()
		opts = append(opts, gomail.WithSMTPAuth(gomail.SMTPAuthAutoDiscover),
			gomail.WithUsername(u.User.Username()), gomail.WithPassword(pass))
	}
	return &SMTP{opts: opts, host: u.Hostname()}, nil
}

// Send implements Mailer. A 5xx reply is permanent; anything else (4xx,
// network, timeout) may succeed on a retry.
//
// Send returns as soon as the server has accepted the message (its reply to
// the end of DATA), and reports success from then on: the QUIT runs in the
// background, and its failure is not a failure to send. Otherwise the mail
// would be sent again, by a retry after an error that came after the
// acceptance, or by a crash during the QUIT's round trip, before the caller
// records the send.
func (s *SMTP) Send(ctx context.Context, m Mail) error {
	msg, err := m.msg()
	if err != nil {
		return err
	}
	client, err := gomail.NewClient(s.host, s.opts...)
	if err != nil {
		return fmt.Errorf("smtp client: %w", err)
	}
	conn, err := client.DialToSMTPClientWithContext(ctx)
	if err != nil {
		return sendError(fmt.Errorf("dial failed: %w", err))
	}
	err = client.SendWithSMTPClient(conn, msg)
	if msg.IsDelivered() {
		// Accepted; a QUIT that fails changes nothing. The connection's
		// deadline (Timeout) bounds it.
		go quit(client, conn)
		return nil
	}
	quit(client, conn)
	return sendError(fmt.Errorf("send failed: %w", err))
}

// quit ends an SMTP session, and closes its connection if the QUIT failed
// (go-mail then leaves it open).
func quit(client *gomail.Client, conn *smtp.Client) {
	if err := client.CloseWithSMTPClient(conn); err != nil {
		_ = conn.Close()
	}
}

// sendError wraps an error of an SMTP conversation that did not deliver the
// message: permanent for a 5xx reply about the message or its recipient,
// to be retried otherwise.
//
// A 5xx reply to MAIL FROM refuses the sender: this service's From
// address, its account or its quota. That is setup every email shares, not
// something wrong with this one, so it is retried (an operator can fix it
// within RETRY_MAX_ATTEMPTS), except 552, a message larger than the
// server takes.
func sendError(err error) error {
	var se *gomail.SendError
	if errors.As(err, &se) && !se.IsTemp() && se.ErrorCode() >= 500 {
		if se.Reason == gomail.ErrSMTPMailFrom && se.ErrorCode() != 552 {
			return fmt.Errorf("smtp refused the sender: %w", err)
		}
		return bus.Permanent(fmt.Errorf("smtp rejected the message: %w", err))
	}
	return fmt.Errorf("smtp send: %w", err)
}

// Outbox writes each mail as an .eml file to a folder and logs it, for
// machines without an SMTP server. A mail written twice lands in the same
// file.
type Outbox struct {
	Dir    string
	Logger *slog.Logger
}

// Send implements Mailer.
func (o Outbox) Send(_ context.Context, m Mail) error {
	msg, err := m.msg()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	final := filepath.Join(o.Dir, m.ID+".eml")
	tmp, err := os.CreateTemp(o.Dir, ".tmp-*.eml")
	if err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := msg.WriteTo(tmp); err != nil {
		tmp.Close()
		return fmt.Errorf("outbox: write %s: %w", final, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("outbox: write %s: %w", final, err)
	}
	if err := os.Rename(tmp.Name(), final); err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	if o.Logger != nil {
		o.Logger.Info("email written to outbox (no SMTP_URL configured)", "email_id", m.ID, "to", m.To, "subject", m.Subject, "file", final)
	}
	return nil
}
