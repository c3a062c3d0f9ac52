package handlers

import (
	"bufio"
	"cmp"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/internal/testenv"
)

// closeBound is how long a connection may stay open after a send that
// failed on it. Send closes it before it returns; the bound only allows for
// a slow machine. Without the close, only a garbage collection would end it.
const closeBound = 10 * time.Second

// fakeSMTP is a scripted SMTP server on 127.0.0.1, for what Mailpit cannot
// do: refuse at a chosen step, speak implicit TLS, and report whether the
// client closed its connection.
type fakeSMTP struct {
	// helloReply answers EHLO and HELO when set (say "554 go away");
	// otherwise EHLO lists ext.
	helloReply string
	// ext are the EHLO extensions, such as "STARTTLS" or "AUTH PLAIN".
	// After STARTTLS the server lists them without STARTTLS.
	ext []string
	// startTLSReply answers STARTTLS when set (say "454 TLS not
	// available"); otherwise the server starts TLS.
	startTLSReply string
	// authReply answers the credentials. Defaults to "235 2.7.0 ok".
	authReply string
	// rcptReply answers RCPT TO. Defaults to "250 ok".
	rcptReply string
	// quitReply answers QUIT. Defaults to "221 bye".
	quitReply string
	// implicitTLS speaks TLS from the first byte (smtps).
	implicitTLS bool
	// cert is the server's certificate for TLS.
	cert tls.Certificate
}

// fakeSession is what one connection to a fakeSMTP saw.
type fakeSession struct {
	// closed is closed when the client has closed the connection (a read
	// ends in EOF or a reset), not when the server's own read deadline
	// expired.
	closed chan struct{}

	mu        sync.Mutex
	tls       bool   // the session is encrypted
	auth      string // "PLAIN alice", the mechanism and user of the last AUTH
	authInTLS bool   // the AUTH came inside TLS
	delivered bool   // the server accepted a message
}

// ended records how the connection ended, given the error that ended a
// read: the client closed it, or the server's deadline expired.
func (s *fakeSession) ended(err error) {
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		close(s.closed)
	}
}

// drain reads c until it fails, and returns the error.
func drain(c net.Conn) error {
	buf := make([]byte, 512)
	for {
		if _, err := c.Read(buf); err != nil {
			return err
		}
	}
}

func (s *fakeSession) get() (auth string, authInTLS, delivered bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.auth, s.authInTLS, s.delivered
}

// start runs the server until the test ends and returns its address and
// the sessions, one per connection, in the order they began.
func (f fakeSMTP) start(t *testing.T) (addr string, sessions <-chan *fakeSession) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		conns   []net.Conn
		stopped bool
	)
	// The listener first, then the connections, so that no goroutine is
	// left waiting for a client.
	t.Cleanup(func() {
		_ = ln.Close()
		mu.Lock()
		stopped = true
		for _, c := range conns {
			_ = c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	ch := make(chan *fakeSession, 16)
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if stopped {
				mu.Unlock()
				_ = c.Close()
				return
			}
			conns = append(conns, c)
			mu.Unlock()
			s := &fakeSession{closed: make(chan struct{})}
			ch <- s
			wg.Go(func() { f.serve(c, s) })
		}
	})
	return ln.Addr().String(), ch
}

func (f fakeSMTP) serve(raw net.Conn, s *fakeSession) {
	// The deadline outlasts closeBound, so that a connection the client
	// left open is reported as open, not as closed by the server.
	_ = raw.SetDeadline(time.Now().Add(closeBound + liveness))
	tlsConfig := &tls.Config{Certificates: []tls.Certificate{f.cert}}
	var c net.Conn = raw
	if f.implicitTLS {
		c = tls.Server(raw, tlsConfig)
		s.tls = true
	}
	r := bufio.NewReader(c)
	reply := func(lines ...string) { fmt.Fprint(c, strings.Join(lines, "\r\n")+"\r\n") }
	read := func() (string, bool) {
		line, err := r.ReadString('\n')
		if err != nil {
			s.ended(err)
			return "", false
		}
		return strings.TrimRight(line, "\r\n"), true
	}
	reply("220 fake ESMTP")
	for {
		line, ok := read()
		if !ok {
			return
		}
		verb, arg, _ := strings.Cut(line, " ")
		switch strings.ToUpper(verb) {
		case "EHLO", "HELO":
			if f.helloReply != "" {
				reply(f.helloReply)
				continue
			}
			lines := []string{"250-fake"}
			for _, e := range f.ext {
				if e != "STARTTLS" || !s.tls {
					lines = append(lines, "250-"+e)
				}
			}
			lines[len(lines)-1] = "250 " + strings.TrimPrefix(lines[len(lines)-1], "250-")
			reply(lines...)
		case "STARTTLS":
			if f.startTLSReply != "" {
				reply(f.startTLSReply)
				continue
			}
			reply("220 2.0.0 go ahead")
			tc := tls.Server(c, tlsConfig)
			if err := tc.Handshake(); err != nil {
				// A client that refuses the certificate has to close
				// the connection too.
				s.ended(drain(raw))
				return
			}
			c, r = tc, bufio.NewReader(tc)
			s.mu.Lock()
			s.tls = true
			s.mu.Unlock()
		case "AUTH":
			mech, initial, _ := strings.Cut(arg, " ")
			var user string
			switch strings.ToUpper(mech) {
			case "PLAIN":
				if initial == "" {
					reply("334 ")
					if initial, ok = read(); !ok {
						return
					}
				}
				b, _ := base64.StdEncoding.DecodeString(initial)
				if parts := strings.Split(string(b), "\x00"); len(parts) == 3 {
					user = parts[1]
				}
			case "LOGIN":
				reply("334 VXNlcm5hbWU6")
				if initial, ok = read(); !ok {
					return
				}
				b, _ := base64.StdEncoding.DecodeString(initial)
				user = string(b)
				reply("334 UGFzc3dvcmQ6")
				if _, ok = read(); !ok {
					return
				}
			default:
				reply("504 5.5.4 mechanism not supported")
				continue
			}
			s.mu.Lock()
			s.auth, s.authInTLS = strings.ToUpper(mech)+" "+user, s.tls
			s.mu.Unlock()
			reply(cmp.Or(f.authReply, "235 2.7.0 ok"))
		case "MAIL":
			reply("250 2.1.0 ok")
		case "RCPT":
			reply(cmp.Or(f.rcptReply, "250 2.1.5 ok"))
		case "DATA":
			reply("354 go on")
			for {
				l, ok := read()
				if !ok {
					return
				}
				if l == "." {
					break
				}
			}
			s.mu.Lock()
			s.delivered = true
			s.mu.Unlock()
			reply("250 2.0.0 queued")
		case "RSET", "NOOP":
			reply("250 2.0.0 ok")
		case "QUIT":
			// The server does not close: the client must.
			reply(cmp.Or(f.quitReply, "221 2.0.0 bye"))
		default:
			reply("502 5.5.2 not implemented")
		}
	}
}

// testCert returns a certificate for 127.0.0.1, the pool that trusts it,
// and its PEM files, for Mailpit.
func testCert(t *testing.T) (cert tls.Certificate, roots *x509.CertPool, certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	roots = x509.NewCertPool()
	roots.AddCert(leaf)
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	if err := os.WriteFile(certFile, certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	cert, err = tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return cert, roots, certFile, keyFile
}

// newTestSMTP is NewSMTP for a test server whose certificate roots
// trusts.
func newTestSMTP(t *testing.T, url string, roots *x509.CertPool) *SMTP {
	t.Helper()
	s, err := NewSMTP(SMTPConfig{URL: url, Timeout: liveness})
	if err != nil {
		t.Fatalf("NewSMTP: %v", err)
	}
	s.tlsConfig.RootCAs = roots
	return s
}

func testMail(subject string) Mail {
	return Mail{ID: fmt.Sprintf("%d", time.Now().UnixNano()), From: "conveyor@localhost", To: "reader@example.com",
		Subject: subject, Body: "Body.", Date: time.Now()}
}

// liveness bounds waits for what takes milliseconds on an idle machine.
const liveness = 30 * time.Second

// nextSession returns the next session of a fake server.
func nextSession(t *testing.T, sessions <-chan *fakeSession) *fakeSession {
	t.Helper()
	select {
	case s := <-sessions:
		return s
	case <-time.After(liveness):
		t.Fatal("the client never connected")
		return nil
	}
}

// TestSMTPClosesFailedConnections: a send that fails while the connection
// is being set up (greeting, STARTTLS, AUTH) closes the connection at once.
// go-mail 0.8.1 returns no client to close it with, and leaves it open
// until a garbage collection finds it: with a broken SMTP setup, every
// attempt of every email would keep a socket open on both sides.
func TestSMTPClosesFailedConnections(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		server fakeSMTP
		query  string // the SMTP URL's query
		// untrusted has the client trust no certificate.
		untrusted bool
		wantErr   string
	}{
		{name: "EHLO and HELO refused", server: fakeSMTP{helloReply: "554 5.7.1 go away"}, query: "?tls=none", wantErr: "554"},
		{name: "tls=required, no STARTTLS", server: fakeSMTP{ext: []string{"8BITMIME"}}, query: "?tls=required", wantErr: "STARTTLS"},
		{name: "STARTTLS refused", server: fakeSMTP{ext: []string{"STARTTLS"}, startTLSReply: "454 4.7.0 TLS not available"}, query: "?tls=required", wantErr: "454"},
		{
			name:      "STARTTLS with an untrusted certificate",
			server:    fakeSMTP{ext: []string{"STARTTLS"}},
			query:     "?tls=required",
			untrusted: true,
			wantErr:   "certificate",
		},
		{
			// go-mail sends QUIT after a failed AUTH, and closes
			// the connection on its 221; not on another reply.
			name:    "AUTH refused, then QUIT",
			server:  fakeSMTP{ext: []string{"AUTH PLAIN"}, authReply: "535 5.7.8 authentication failed", quitReply: "421 4.7.0 too many errors"},
			query:   "?tls=none&auth=plain-insecure",
			wantErr: "535",
		},
	}
	cert, roots, _, _ := testCert(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tt.server.cert = cert
			addr, sessions := tt.server.start(t)
			user := ""
			if strings.Contains(tt.query, "auth=") {
				user = "alice:secret@"
			}
			s := newTestSMTP(t, "smtp://"+user+addr+tt.query, roots)
			if tt.untrusted {
				s.tlsConfig.RootCAs = x509.NewCertPool()
			}
			err := s.Send(t.Context(), testMail(tt.name))
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Send = %v, want an error containing %q", err, tt.wantErr)
			}
			sess := nextSession(t, sessions)
			select {
			case <-sess.closed:
			case <-time.After(closeBound):
				t.Fatalf("the connection is still open %s after Send failed", closeBound)
			}
		})
	}
}

// TestSMTPCredentials: a user name and password go only into a session with
// TLS (STARTTLS or smtps), unless the SMTP URL has auth=plain-insecure; a
// server without STARTTLS is then a setup problem, reported as such and
// retried.
func TestSMTPCredentials(t *testing.T) {
	t.Parallel()
	cert, roots, _, _ := testCert(t)
	tests := []struct {
		name   string
		server fakeSMTP
		scheme string // defaults to smtp
		query  string
		// wantAuth is the AUTH the server saw, "" for none.
		wantAuth      string
		wantAuthInTLS bool
		wantErr       string
	}{
		{
			name:          "STARTTLS when offered",
			server:        fakeSMTP{ext: []string{"STARTTLS", "AUTH PLAIN LOGIN"}},
			wantAuth:      "PLAIN alice",
			wantAuthInTLS: true,
		},
		{
			name:          "tls=required",
			server:        fakeSMTP{ext: []string{"STARTTLS", "AUTH LOGIN"}},
			query:         "?tls=required",
			wantAuth:      "LOGIN alice",
			wantAuthInTLS: true,
		},
		{
			name:          "smtps",
			server:        fakeSMTP{implicitTLS: true, ext: []string{"AUTH LOGIN PLAIN"}},
			scheme:        "smtps",
			wantAuth:      "PLAIN alice",
			wantAuthInTLS: true,
		},
		{
			name:    "a server without STARTTLS is not sent the password",
			server:  fakeSMTP{ext: []string{"AUTH PLAIN LOGIN"}},
			wantErr: "auth=plain-insecure",
		},
		{
			// Postfix with smtpd_tls_auth_only, without a certificate.
			name:    "a server without STARTTLS that offers AUTH only inside TLS",
			server:  fakeSMTP{ext: []string{"8BITMIME"}},
			wantErr: "does not offer STARTTLS",
		},
		{
			name:     "plaintext when allowed",
			server:   fakeSMTP{ext: []string{"AUTH PLAIN LOGIN"}},
			query:    "?auth=plain-insecure",
			wantAuth: "PLAIN alice",
		},
		{
			name:     "tls=none when allowed",
			server:   fakeSMTP{ext: []string{"AUTH LOGIN"}},
			query:    "?tls=none&auth=plain-insecure",
			wantAuth: "LOGIN alice",
		},
		{
			name:          "STARTTLS is still used when plaintext is allowed",
			server:        fakeSMTP{ext: []string{"STARTTLS", "AUTH PLAIN"}},
			query:         "?auth=plain-insecure",
			wantAuth:      "PLAIN alice",
			wantAuthInTLS: true,
		},
		{
			name:    "no AUTH inside TLS",
			server:  fakeSMTP{ext: []string{"STARTTLS"}},
			wantErr: "offers no authentication",
		},
		{
			name:    "no mechanism in common",
			server:  fakeSMTP{ext: []string{"STARTTLS", "AUTH GSSAPI XOAUTH2"}},
			wantErr: "GSSAPI XOAUTH2",
		},
		{
			name:    "wrong password",
			server:  fakeSMTP{ext: []string{"STARTTLS", "AUTH PLAIN"}, authReply: "535 5.7.8 authentication failed"},
			wantErr: "535",
			// The server saw the attempt.
			wantAuth:      "PLAIN alice",
			wantAuthInTLS: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tt.server.cert = cert
			addr, sessions := tt.server.start(t)
			s := newTestSMTP(t, cmp.Or(tt.scheme, "smtp")+"://alice:s3cret@"+addr+tt.query, roots)
			err := s.Send(t.Context(), testMail(tt.name))
			sess := nextSession(t, sessions)
			auth, authInTLS, delivered := sess.get()
			if auth != tt.wantAuth || authInTLS != tt.wantAuthInTLS {
				t.Errorf("the server saw AUTH %q (inside TLS: %t), want %q (inside TLS: %t)", auth, authInTLS, tt.wantAuth, tt.wantAuthInTLS)
			}
			if tt.wantErr == "" {
				if err != nil || !delivered {
					t.Fatalf("Send = %v, delivered = %t; want the mail delivered", err, delivered)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Send = %v, want an error containing %q", err, tt.wantErr)
			}
			// The server can be fixed, or the URL; the next attempt may
			// then succeed.
			if bus.IsPermanent(err) {
				t.Errorf("Send = %v, a permanent error; want one to retry", err)
			}
			if delivered {
				t.Error("the server accepted the mail")
			}
		})
	}
}

// TestSMTPCredentialsAgainstMailpit: STARTTLS and authentication with a
// real server, which offers AUTH only inside TLS.
func TestSMTPCredentialsAgainstMailpit(t *testing.T) {
	t.Parallel()
	_, roots, certFile, keyFile := testCert(t)
	authFile := filepath.Join(t.TempDir(), "smtp-users")
	// Mailpit splits its auth file at white space: no space in the
	// password.
	if err := os.WriteFile(authFile, []byte("alice:s3cret-p@ss\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	mp := testenv.StartMailpit(t, "--smtp-auth-file", authFile, "--smtp-tls-cert", certFile, "--smtp-tls-key", keyFile, "--smtp-require-starttls")
	for _, query := range []string{"", "?tls=required"} {
		t.Run(cmp.Or(query, "opportunistic"), func(t *testing.T) {
			t.Parallel()
			subject := "credentials, " + cmp.Or(query, "opportunistic")
			s := newTestSMTP(t, "smtp://alice:s3cret-p%40ss@"+mp.SMTPAddr+query, roots)
			if err := s.Send(t.Context(), testMail(subject)); err != nil {
				t.Fatalf("Send: %v", err)
			}
			got := slices.DeleteFunc(mp.Messages(t), func(m testenv.MailpitMessage) bool { return m.Subject != subject })
			if len(got) != 1 || got[0].Username != "alice" {
				t.Errorf("Mailpit received %+v, want one mail sent as alice", got)
			}
		})
	}
}

// TestSMTPRecipientRefusals: a 5xx reply to RCPT TO fails the email at
// once, unless the server refuses to relay: that is the setup (SMTP_URL
// without credentials, or this host not allowed to relay), which every
// email to another domain shares, and which an operator can fix.
func TestSMTPRecipientRefusals(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, to, rcptReply string
		ext                 []string
		wantPermanent       bool
	}{
		{name: "Postfix relay denied", rcptReply: "554 5.7.1 <reader@example.com>: Relay access denied", ext: []string{"ENHANCEDSTATUSCODES"}},
		{name: "Postfix relay denied, no enhanced status codes announced", rcptReply: "554 5.7.1 <reader@example.com>: Relay access denied"},
		{name: "sendmail relaying denied", rcptReply: "550 5.7.1 <reader@example.com>... Relaying denied"},
		{name: "Exchange", rcptReply: "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain", ext: []string{"ENHANCEDSTATUSCODES"}},
		{name: "Exim, without an enhanced code", rcptReply: "550 relay not permitted"},
		{name: "unknown user", rcptReply: "550 5.1.1 <reader@example.com>: Recipient address rejected: User unknown", wantPermanent: true},
		{
			name: "unknown user whose address says relay", to: "relay@example.com",
			rcptReply: "550 5.1.1 <relay@example.com>: Recipient address rejected: User unknown", wantPermanent: true,
		},
		{
			name: "relay in the address of a policy refusal", to: "relay@example.com",
			rcptReply: "554 5.7.1 <relay@example.com>: Recipient address rejected: Access denied", wantPermanent: true,
		},
		{name: "a relay's refusal that is about the address", rcptReply: "550 5.1.2 relay host reports: no such domain", wantPermanent: true},
		{name: "temporary", rcptReply: "450 4.7.1 <reader@example.com>: Relay access temporarily denied"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			addr, _ := fakeSMTP{ext: tt.ext, rcptReply: tt.rcptReply}.start(t)
			m := testMail(tt.name)
			if tt.to != "" {
				m.To = tt.to
			}
			err := newTestSMTP(t, "smtp://"+addr+"?tls=none", nil).Send(t.Context(), m)
			if err == nil || !strings.Contains(err.Error(), tt.rcptReply[:3]) {
				t.Fatalf("Send = %v, want the %s reply", err, tt.rcptReply[:3])
			}
			if bus.IsPermanent(err) != tt.wantPermanent {
				t.Errorf("Send = %v: permanent %t, want %t", err, bus.IsPermanent(err), tt.wantPermanent)
			}
		})
	}
}
