package testenv

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// mailpitTool is the Mailpit package, pinned as a tool in go.mod.
const mailpitTool = "github.com/axllent/mailpit"

// mailpitPageSize is how many messages one request of [Mailpit.Messages]
// asks for.
const mailpitPageSize = 200

// mailpitStartAttempts is how many pairs of free ports a start tries: a port
// found free may be taken by another process before Mailpit binds it.
const mailpitStartAttempts = 3

// Mailpit is a running Mailpit (real SMTP server with an HTTP API), for tests.
type Mailpit struct {
	SMTPAddr string // 127.0.0.1:port
	SMTPURL  string // "smtp://127.0.0.1:port?tls=none" — the form handlers.NewSMTP accepts
	APIURL   string // http://127.0.0.1:port

	// api has a transport of its own, whose idle connections are closed at
	// cleanup so that no connection goroutine outlives the test.
	api *http.Client
}

// MailpitMessage is the summary of one message Mailpit received.
type MailpitMessage struct {
	// ID is Mailpit's id of the message, for [Mailpit.Text] and
	// [Mailpit.Raw].
	ID string
	// MessageID is the Message-ID header without its angle brackets, as
	// Mailpit reports it.
	MessageID string
	Subject   string
	// To holds the bare addresses of the To header.
	To []string
	// From is the bare address of the From header.
	From string
	// Username is the user the sender authenticated as over SMTP, if it
	// did.
	Username string
}

// The Mailpit executable, built once per test binary.
var (
	mailpitOnce sync.Once
	mailpitBin  struct {
		path string
		err  error
	}
)

// mailpitBinary returns the path of the Mailpit executable of the version
// go.mod pins. `go tool -n` builds it on first use and leaves it in the Go
// build cache, where later test binaries find it ready: unlike a build into
// a temporary folder, it leaves nothing behind that a test would have to
// remove after the last test of the binary has run.
func mailpitBinary() (string, error) {
	mailpitOnce.Do(func() {
		b := &mailpitBin
		goBin, err := exec.LookPath("go")
		if err != nil {
			b.err = fmt.Errorf("find the go command to build mailpit: %w", err)
			return
		}
		out, err := exec.Command(goBin, "env", "GOMOD").Output()
		if err != nil {
			b.err = fmt.Errorf("go env GOMOD: %w", commandError(err))
			return
		}
		gomod := strings.TrimSpace(string(out))
		if gomod == "" || gomod == os.DevNull {
			b.err = errors.New("build mailpit: the tests do not run inside a Go module")
			return
		}
		cmd := exec.Command(goBin, "tool", "-n", mailpitTool)
		cmd.Dir = filepath.Dir(gomod)
		out, err = cmd.Output()
		if err != nil {
			b.err = fmt.Errorf("build mailpit (go tool -n %s in %s): %w", mailpitTool, cmd.Dir, commandError(err))
			return
		}
		b.path = strings.TrimSpace(string(out))
		if _, err := os.Stat(b.path); err != nil {
			b.err = fmt.Errorf("build mailpit: %w", err)
		}
	})
	return mailpitBin.path, mailpitBin.err
}

// commandError adds a failed command's standard error to err.
func commandError(err error) error {
	var ee *exec.ExitError
	if errors.As(err, &ee) && len(ee.Stderr) > 0 {
		return fmt.Errorf("%w: %s", err, bytes.TrimSpace(ee.Stderr))
	}
	return err
}

// StartMailpit starts a Mailpit of its own for the test and stops it at
// cleanup. The executable is built once per test binary from the version
// pinned in go.mod (see mailpitBinary). Mailpit listens on free ports of
// 127.0.0.1, keeps every message (no limit), stores them in a database in
// a temporary folder, checks for no updates and logs errors only. flags are
// added to its command line, for example
// "--smtp-allowed-recipients=@example\\.com$" to have recipients refused.
// Environment variables that configure Mailpit (MP_*) are not passed on.
//
// If Mailpit cannot be built or started, the test fails; it never skips.
// If Mailpit exits before cleanup, the test fails with its output.
func StartMailpit(t testing.TB, flags ...string) *Mailpit {
	t.Helper()
	bin, err := mailpitBinary()
	if err != nil {
		t.Fatalf("start test mailpit: %v", err)
	}
	dir := t.TempDir()
	var errs []error
	for attempt := 1; attempt <= mailpitStartAttempts; attempt++ {
		m, p, err := startMailpit(t.Context(), bin, dir, flags)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		t.Cleanup(func() {
			m.api.CloseIdleConnections()
			if err := p.stop(); err != nil {
				t.Errorf("stop test mailpit: %v", err)
			}
		})
		return m
	}
	t.Fatalf("start test mailpit: %v", errors.Join(errs...))
	return nil
}

// mailpitProcess is a started Mailpit, reaped by a goroutine as soon as it
// exits, so that it never lingers as a zombie.
type mailpitProcess struct {
	cmd     *exec.Cmd
	out     *lockedBuffer
	done    chan struct{} // closed once the process has been reaped
	waitErr error         // the result of cmd.Wait; read only after done
}

// startMailpit starts Mailpit on two free ports and waits until both its
// SMTP server and its API answer. On failure nothing is left running.
func startMailpit(ctx context.Context, bin, dir string, flags []string) (*Mailpit, *mailpitProcess, error) {
	smtpPort, err := freePort()
	if err != nil {
		return nil, nil, err
	}
	apiPort, err := freePort()
	if err != nil {
		return nil, nil, err
	}
	smtpAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(smtpPort))
	apiAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(apiPort))
	args := append([]string{
		"--smtp", smtpAddr,
		"--listen", apiAddr,
		"--database", filepath.Join(dir, "mailpit.db"),
		// 0 turns the pruning of old messages off: a test sees every
		// message it caused.
		"--max", "0",
		"--disable-version-check",
		"--quiet",
		// The peer is always 127.0.0.1; a reverse lookup could only wait
		// for a DNS server the test machine may not have.
		"--smtp-disable-rdns",
	}, flags...)
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Env = withoutMailpitEnv(os.Environ())
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	setParentDeathSignal(cmd.SysProcAttr, syscall.SIGKILL)
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("start %s: %w", bin, err)
	}
	p := &mailpitProcess{cmd: cmd, out: out, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()

	m := &Mailpit{
		SMTPAddr: smtpAddr,
		SMTPURL:  "smtp://" + smtpAddr + "?tls=none",
		APIURL:   "http://" + apiAddr,
		api:      &http.Client{Transport: &http.Transport{}, Timeout: stopTimeout},
	}
	if err := p.waitReady(ctx, m); err != nil {
		m.api.CloseIdleConnections()
		return nil, nil, errors.Join(err, p.kill())
	}
	return m, p, nil
}

// waitReady polls Mailpit until its SMTP server greets and its API reports
// ready, the process exits, or startup takes longer than stopTimeout.
func (p *mailpitProcess) waitReady(ctx context.Context, m *Mailpit) error {
	ctx, cancel := context.WithTimeout(ctx, stopTimeout)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		err := m.ready(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("mailpit exited while starting (%v): %s", p.waitErr, p.out.tail())
		case <-ctx.Done():
			return fmt.Errorf("wait for mailpit: %w (last error: %v): %s", ctx.Err(), err, p.out.tail())
		case <-tick.C:
		}
	}
}

// ready reports whether the SMTP server greets with 220 and GET /readyz
// answers 200.
func (m *Mailpit) ready(ctx context.Context) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", m.SMTPAddr)
	if err != nil {
		return err
	}
	_ = conn.SetDeadline(time.Now().Add(time.Second)) // a failed read reports it
	greeting, err := bufio.NewReader(conn).ReadString('\n')
	_ = conn.Close() // the probe is over either way
	if err != nil {
		return fmt.Errorf("read SMTP greeting: %w", err)
	}
	if !strings.HasPrefix(greeting, "220") {
		return fmt.Errorf("SMTP greeting %q", strings.TrimSpace(greeting))
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, m.APIURL+"/readyz", nil)
	if err != nil {
		return err
	}
	resp, err := m.api.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, resp.Body) // drained so the connection is reused
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET /readyz: %s", resp.Status)
	}
	return nil
}

// stop sends SIGTERM, on which Mailpit closes its database and exits, and
// waits for it to be reaped. If that takes longer than stopTimeout, it is
// killed. An exit before stop was asked for is reported with the output.
func (p *mailpitProcess) stop() error {
	select {
	case <-p.done:
		return fmt.Errorf("mailpit exited before the test ended (%v): %s", p.waitErr, p.out.tail())
	default:
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return errors.Join(fmt.Errorf("signal mailpit: %w", err), p.kill())
	}
	timer := time.NewTimer(stopTimeout)
	defer timer.Stop()
	select {
	case <-p.done:
		return nil
	case <-timer.C:
		return errors.Join(fmt.Errorf("mailpit did not stop within %s; killed it: %s", stopTimeout, p.out.tail()), p.kill())
	}
}

// kill sends SIGKILL and waits until the process is reaped.
func (p *mailpitProcess) kill() error {
	err := p.cmd.Process.Kill()
	<-p.done
	if err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill mailpit: %w", err)
	}
	return nil
}

// setParentDeathSignal asks the kernel to send sig to the child if the
// thread that started it dies, so that a test binary killed by its timeout
// does not leave a Mailpit holding its ports. Only Linux has the field; it
// is set by name so that this file builds on every system.
func setParentDeathSignal(attr *syscall.SysProcAttr, sig syscall.Signal) {
	f := reflect.ValueOf(attr).Elem().FieldByName("Pdeathsig")
	if f.IsValid() && f.CanSet() && f.Type() == reflect.TypeOf(sig) {
		f.Set(reflect.ValueOf(sig))
	}
}

// withoutMailpitEnv drops the MP_* variables, which configure Mailpit, so
// that a developer's own Mailpit settings cannot change the tests.
func withoutMailpitEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		if !strings.HasPrefix(kv, "MP_") {
			out = append(out, kv)
		}
	}
	return out
}

// freePort asks the kernel for a free TCP port on 127.0.0.1. It is released
// before Mailpit binds it; a start that loses the port to another process
// is tried again on new ports.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	return port, nil
}

// lockedBuffer collects a process's output; the copying goroutines of
// exec.Cmd write to it while a failing start reads it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// tail returns the last few KiB of the output, for an error message.
func (b *lockedBuffer) tail() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.buf.Bytes()
	if len(s) > 4096 {
		s = s[len(s)-4096:]
	}
	if out := strings.TrimSpace(string(s)); out != "" {
		return out
	}
	return "(no output)"
}

// Messages returns every message Mailpit received, oldest first. It pages
// through GET /api/v1/messages, which lists the newest first.
func (m *Mailpit) Messages(t testing.TB) []MailpitMessage {
	t.Helper()
	var newestFirst []MailpitMessage
	seen := map[string]bool{}
	for start := 0; ; {
		var page struct {
			Total    int `json:"total"`
			Messages []struct {
				ID        string
				MessageID string
				Subject   string
				Username  string
				From      *struct{ Address string }
				To        []struct{ Address string }
			} `json:"messages"`
		}
		m.getJSON(t, "/api/v1/messages?"+url.Values{
			"start": {strconv.Itoa(start)},
			"limit": {strconv.Itoa(mailpitPageSize)},
		}.Encode(), &page)
		for _, msg := range page.Messages {
			// A message arriving between two pages shifts the next page
			// by one; the repeat is dropped.
			if seen[msg.ID] {
				continue
			}
			seen[msg.ID] = true
			mm := MailpitMessage{ID: msg.ID, MessageID: msg.MessageID, Subject: msg.Subject, Username: msg.Username}
			if msg.From != nil {
				mm.From = msg.From.Address
			}
			for _, to := range msg.To {
				mm.To = append(mm.To, to.Address)
			}
			newestFirst = append(newestFirst, mm)
		}
		start += len(page.Messages)
		if len(page.Messages) == 0 || start >= page.Total {
			break
		}
	}
	out := make([]MailpitMessage, len(newestFirst))
	for i, msg := range newestFirst {
		out[len(out)-1-i] = msg
	}
	return out
}

// Text returns the plain-text body of one message.
func (m *Mailpit) Text(t testing.TB, id string) string {
	t.Helper()
	var msg struct{ Text string }
	m.getJSON(t, "/api/v1/message/"+url.PathEscape(id), &msg)
	return msg.Text
}

// Raw returns the source of one message as Mailpit received it, headers
// included, for a test that parses it with net/mail.
func (m *Mailpit) Raw(t testing.TB, id string) string {
	t.Helper()
	return string(m.get(t, "/api/v1/message/"+url.PathEscape(id)+"/raw"))
}

func (m *Mailpit) getJSON(t testing.TB, path string, v any) {
	t.Helper()
	body := m.get(t, path)
	if err := json.Unmarshal(body, v); err != nil {
		t.Fatalf("mailpit GET %s: decode: %v", path, err)
	}
}

// get returns the body of a successful GET of path on the API. It uses a
// background context: a cleanup, whose t.Context() has ended, may ask too.
func (m *Mailpit) get(t testing.TB, path string) []byte {
	t.Helper()
	req, err := http.NewRequestWithContext(context.Background(), http.MethodGet, m.APIURL+path, nil)
	if err != nil {
		t.Fatalf("mailpit GET %s: %v", path, err)
	}
	resp, err := m.api.Do(req)
	if err != nil {
		t.Fatalf("mailpit GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("mailpit GET %s: read: %v", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("mailpit GET %s: %s: %s", path, resp.Status, bytes.TrimSpace(body))
	}
	return body
}
