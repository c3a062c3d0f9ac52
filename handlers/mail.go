package handlers

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
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
	//
	// A user name and password are sent only inside TLS, unless the URL
	// has auth=plain-insecure: a server without STARTTLS then fails every
	// send with an error that says so, and tls=none with credentials is
	// refused here.
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
	// tlsConfig verifies the server for STARTTLS and smtps alike.
	tlsConfig   *tls.Config
	implicitTLS bool // smtps
	// creds is set when the URL has a user name.
	creds *credentials
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
	s := &SMTP{
		host: u.Hostname(),
		// The settings of go-mail's default, here so that the dialer of
		// smtps uses them too.
		tlsConfig: &tls.Config{ServerName: u.Hostname(), MinVersion: tls.VersionTLS12},
	}
	// One message per connection: without the NOOP go-mail sends before a
	// message to check the connection (it is fresh) and the RSET after it
	// (the QUIT ends the session), two round trips less per mail, and none
	// between the server's acceptance and Send's return.
	opts := []gomail.Option{gomail.WithTimeout(cfg.Timeout), gomail.WithoutNoop(), gomail.WithoutRset(), gomail.WithTLSConfig(s.tlsConfig)}
	port := 25
	q := u.Query()
	noTLS := false
	switch u.Scheme {
	case "smtp":
		port = 587
		switch q.Get("tls") {
		case "", "opportunistic":
			opts = append(opts, gomail.WithTLSPolicy(gomail.TLSOpportunistic))
		case "required":
			opts = append(opts, gomail.WithTLSPolicy(gomail.TLSMandatory))
		case "none":
			opts = append(opts, gomail.WithTLSPolicy(gomail.NoTLS))
			port = 25
			noTLS = true
		default:
			return nil, fmt.Errorf("SMTP URL: tls must be opportunistic, required or none")
		}
	case "smtps":
		port = 465
		// go-mail skips STARTTLS; Send's dialer speaks the TLS.
		opts = append(opts, gomail.WithSSL())
		s.implicitTLS = true
	default:
		return nil, fmt.Errorf("SMTP URL scheme must be smtp or smtps, not %q", u.Scheme)
	}
	insecure := false
	switch q.Get("auth") {
	case "":
	case "plain-insecure":
		insecure = true
	default:
		return nil, errors.New("SMTP URL: auth must be plain-insecure, or absent")
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
		if noTLS && !insecure {
			return nil, errors.New("SMTP URL has a user name and password, but tls=none would send them unencrypted, " +
				"which this service does not do: use STARTTLS (tls=required) or smtps://, " +
				"or add auth=plain-insecure to send them unencrypted to a server on a network you trust")
		}
		pass, _ := u.User.Password()
		s.creds = &credentials{user: u.User.Username(), pass: pass, host: s.host, insecure: insecure}
	}
	s.opts = opts
	return s, nil
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
	d := &dialer{}
	if s.implicitTLS {
		d.tls = s.tlsConfig
	}
	// Clipped, so that append copies: s.opts is shared by concurrent
	// sends.
	opts := append(slices.Clip(s.opts), gomail.WithDialContextFunc(d.DialContext))
	if s.creds != nil {
		// A copy per send: it holds the mechanism of one session.
		creds := *s.creds
		opts = append(opts, gomail.WithSMTPAuthCustom(&creds))
	}
	client, err := gomail.NewClient(s.host, opts...)
	if err != nil {
		return fmt.Errorf("smtp client: %w", err)
	}
	conn, err := client.DialToSMTPClientWithContext(ctx)
	if err != nil {
		// go-mail 0.8.1 leaves the connection open when the greeting,
		// EHLO, STARTTLS or AUTH fails, and returns no client to close
		// it with: only a garbage collection would, while a broken
		// setup opens one more on every attempt of every email.
		d.close()
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

// dialer opens the TCP connection of one send, and keeps it so that Send
// can close it when go-mail does not.
type dialer struct {
	// tls, when set, is spoken from the first byte (smtps). go-mail
	// dials TLS itself only without a dial function of ours.
	tls  *tls.Config
	conn net.Conn
}

// DialContext is a go-mail DialContextFunc.
func (d *dialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var nd net.Dialer
	conn, err := nd.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	if d.tls == nil {
		d.conn = conn
		return conn, nil
	}
	tc := tls.Client(conn, d.tls)
	if err := tc.HandshakeContext(ctx); err != nil {
		_ = conn.Close()
		return nil, err
	}
	d.conn = conn
	return tc, nil
}

// close closes the connection, if one was made. go-mail may have closed
// it already; the second close changes nothing.
func (d *dialer) close() {
	if d.conn != nil {
		_ = d.conn.Close()
	}
}

// errNoSTARTTLS is why credentials were not sent: the session has no TLS.
var errNoSTARTTLS = errors.New("the SMTP server does not offer STARTTLS, and the user name and password of SMTP_URL " +
	"are sent only inside TLS: enable STARTTLS on the server, or use smtps://, " +
	"or add auth=plain-insecure to SMTP_URL to send them unencrypted to a server on a network you trust")

// authMechanisms are the SASL mechanisms credentials uses, best first:
// those that do not reveal the password before those that do. The
// SCRAM-*-PLUS variants are left out, since their channel binding needs
// the TLS state, which go-mail does not show an smtp.Auth; their servers
// offer plain SCRAM too.
var authMechanisms = []string{"SCRAM-SHA-256", "SCRAM-SHA-1", "NTLM", "CRAM-MD5", "PLAIN", "LOGIN"}

// credentials is the smtp.Auth of an SMTP URL's user name and password. It
// chooses the mechanism once the server's EHLO reply is known, so that it
// can refuse a session without TLS itself, and say why: go-mail's own
// choice refuses PLAIN and LOGIN there too, but with an error that names
// neither the missing STARTTLS nor the way out.
type credentials struct {
	user, pass, host string
	// insecure allows a session without TLS (auth=plain-insecure).
	insecure bool
	mech     smtp.Auth
}

// Start implements smtp.Auth.
func (c *credentials) Start(server *smtp.ServerInfo) (string, []byte, error) {
	if !server.TLS && !c.insecure {
		// Checked first: a server may offer AUTH only inside TLS.
		return "", nil, errNoSTARTTLS
	}
	if len(server.Auth) == 0 {
		return "", nil, errors.New("the SMTP server offers no authentication (AUTH), but SMTP_URL has a user name and password")
	}
	for _, m := range authMechanisms {
		if !slices.ContainsFunc(server.Auth, func(s string) bool { return strings.EqualFold(s, m) }) {
			continue
		}
		switch m {
		case "SCRAM-SHA-256":
			c.mech = smtp.ScramSHA256Auth(c.user, c.pass)
		case "SCRAM-SHA-1":
			c.mech = smtp.ScramSHA1Auth(c.user, c.pass)
		case "NTLM":
			c.mech = smtp.NTLMAuth(c.user, c.pass, "")
		case "CRAM-MD5":
			c.mech = smtp.CRAMMD5Auth(c.user, c.pass)
		case "PLAIN":
			c.mech = smtp.PlainAuth("", c.user, c.pass, c.host, c.insecure)
		case "LOGIN":
			c.mech = smtp.LoginAuth(c.user, c.pass, c.host, c.insecure)
		}
		return c.mech.Start(server)
	}
	return "", nil, fmt.Errorf("the SMTP server offers authentication by %s, and this service supports %s",
		strings.Join(server.Auth, " "), strings.Join(authMechanisms, " "))
}

// Next implements smtp.Auth.
func (c *credentials) Next(fromServer []byte, more bool) ([]byte, error) {
	return c.mech.Next(fromServer, more)
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
//
// A 5xx reply to RCPT TO that refuses to relay is setup too: the server
// takes mail to other domains only from a client that authenticates (an
// SMTP_URL without credentials) or from allowed addresses. The recipient
// is not at fault, and the same email goes through once the setup is
// fixed, so it is retried as well.
func sendError(err error) error {
	var se *gomail.SendError
	if errors.As(err, &se) && !se.IsTemp() && se.ErrorCode() >= 500 {
		if se.Reason == gomail.ErrSMTPMailFrom && se.ErrorCode() != 552 {
			return fmt.Errorf("smtp refused the sender: %w", err)
		}
		if se.Reason == gomail.ErrSMTPRcptTo && relayDenied(se) {
			return fmt.Errorf("smtp server refuses to relay: SMTP_URL may need a user name and password, "+
				"or the server must allow this host to relay: %w", err)
		}
		return bus.Permanent(fmt.Errorf("smtp rejected the message: %w", err))
	}
	return fmt.Errorf("smtp send: %w", err)
}

var (
	// enhancedCode finds an enhanced status code (RFC 3463) in a reply.
	enhancedCode = regexp.MustCompile(`\b[245]\.\d{1,3}\.\d{1,3}\b`)
	// relayWord finds relay, relaying, "Relay access denied"...
	relayWord = regexp.MustCompile(`(?i)\brelay`)
	// mailbox is an address in angle brackets, which a reply quotes.
	mailbox = regexp.MustCompile(`<[^>]*>`)
)

// relayDenied reports whether a refusal of a recipient refuses to relay:
// its text says relay (Postfix "Relay access denied", sendmail "Relaying
// denied", Exchange "Unable to relay", Exim "relay not permitted"), outside
// the quoted address, and its enhanced status code, if any, is of class
// 5.7 (security or policy), not 5.1 (the address itself).
func relayDenied(se *gomail.SendError) bool {
	// go-mail's text: "sending SMTP RCPT TO command: <reply>, affected
	// recipient(s): <addresses>, ...".
	text, _, _ := strings.Cut(se.Error(), ", affected recipient(s):")
	text = mailbox.ReplaceAllString(text, "")
	code := se.EnhancedStatusCode()
	if code == "" {
		// go-mail reads it only from a server that announced
		// ENHANCEDSTATUSCODES.
		code = enhancedCode.FindString(text)
	}
	if code != "" && !strings.HasPrefix(code, "5.7.") {
		return false
	}
	return relayWord.MatchString(text)
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
