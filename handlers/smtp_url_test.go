package handlers

import (
	"strings"
	"testing"

	gomail "github.com/wneessen/go-mail"
)

func TestNewSMTP(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		url      string
		wantAddr string
		// wantTLS is go-mail's TLS policy; "" leaves it unchecked (smtps
		// speaks TLS before any policy applies).
		wantTLS string
		wantErr string
	}{
		{name: "smtp defaults to 587 with STARTTLS when offered", url: "smtp://mail.example.com", wantAddr: "mail.example.com:587", wantTLS: "TLSOpportunistic"},
		{name: "tls=opportunistic", url: "smtp://mail.example.com?tls=opportunistic", wantAddr: "mail.example.com:587", wantTLS: "TLSOpportunistic"},
		{name: "tls=required", url: "smtp://mail.example.com?tls=required", wantAddr: "mail.example.com:587", wantTLS: "TLSMandatory"},
		{name: "tls=none defaults to 25", url: "smtp://mail.example.com?tls=none", wantAddr: "mail.example.com:25", wantTLS: "NoTLS"},
		{name: "explicit port", url: "smtp://127.0.0.1:1025?tls=none", wantAddr: "127.0.0.1:1025", wantTLS: "NoTLS"},
		{name: "smtps defaults to 465", url: "smtps://mail.example.com", wantAddr: "mail.example.com:465"},
		{name: "smtps with credentials and a port", url: "smtps://user:secret@mail.example.com:2465", wantAddr: "mail.example.com:2465"},
		{name: "escaped credentials", url: "smtp://user%40example.com:p%40ss%20word@mail.example.com:2525", wantAddr: "mail.example.com:2525", wantTLS: "TLSOpportunistic"},
		{name: "IPv6 host", url: "smtp://[::1]:2525?tls=none", wantAddr: "::1:2525", wantTLS: "NoTLS"},
		{name: "bad tls value", url: "smtp://mail.example.com?tls=maybe", wantErr: "tls must be opportunistic, required or none"},
		// A password is sent only inside TLS, unless the URL says
		// otherwise: with tls=none it could only fail every send.
		{name: "credentials with tls=none", url: "smtp://user:secret@mail.example.com?tls=none", wantErr: "auth=plain-insecure"},
		{name: "credentials with tls=none, allowed", url: "smtp://user:secret@mail.example.com?tls=none&auth=plain-insecure", wantAddr: "mail.example.com:25", wantTLS: "NoTLS"},
		{name: "credentials, allowed without TLS", url: "smtp://user:secret@mail.example.com?auth=plain-insecure", wantAddr: "mail.example.com:587", wantTLS: "TLSOpportunistic"},
		{name: "tls=none without credentials", url: "smtp://mail.example.com?tls=none&auth=plain-insecure", wantAddr: "mail.example.com:25", wantTLS: "NoTLS"},
		{name: "bad auth value", url: "smtp://user:secret@mail.example.com?auth=plain", wantErr: "auth must be plain-insecure"},
		{name: "missing host", url: "smtp://", wantErr: "names no host"},
		{name: "port without host", url: "smtp://:25", wantErr: "names no host"},
		{name: "no scheme", url: "mail.example.com:25", wantErr: "names no host"},
		{name: "empty", url: "", wantErr: "names no host"},
		{name: "bad scheme", url: "http://mail.example.com", wantErr: `scheme must be smtp or smtps, not "http"`},
		{name: "unparsable", url: "smtp://[::1", wantErr: "SMTP URL"},
		{name: "port zero", url: "smtp://mail.example.com:0", wantErr: "port"},
		{name: "port out of range", url: "smtp://mail.example.com:70000", wantErr: "port"},
		{name: "port overflows", url: "smtp://mail.example.com:99999999999999999999", wantErr: "port"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			s, err := NewSMTP(SMTPConfig{URL: tt.url})
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("NewSMTP(%q) = %v, want an error containing %q", tt.url, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("NewSMTP(%q): %v", tt.url, err)
			}
			// The options configure a go-mail client exactly as Send does.
			c, err := gomail.NewClient(s.host, s.opts...)
			if err != nil {
				t.Fatalf("the options do not make a client: %v", err)
			}
			if c.ServerAddr() != tt.wantAddr {
				t.Errorf("server = %s, want %s", c.ServerAddr(), tt.wantAddr)
			}
			if tt.wantTLS != "" && c.TLSPolicy() != tt.wantTLS {
				t.Errorf("TLS policy = %s, want %s", c.TLSPolicy(), tt.wantTLS)
			}
		})
	}
}

// TestSMTPURLErrorsHideThePassword: an SMTP URL that does not parse (a '/'
// or '#' in its password, not percent-encoded) is refused without quoting
// any of it.
func TestSMTPURLErrorsHideThePassword(t *testing.T) {
	t.Parallel()
	for _, u := range []string{"smtp://user:s3cr/etpw@mail.example.com:25", "smtp://user:s3cr#etpw@[mail.example.com:25", "s3cr/etpw",
		"smtp://user:s3cretpw@mail.example.com?tls=none", "smtp://user:s3cretpw@mail.example.com?auth=yes"} {
		_, err := NewSMTP(SMTPConfig{URL: u})
		if err == nil {
			t.Fatalf("NewSMTP(%q): no error", u)
		}
		if strings.Contains(err.Error(), "s3cr") || strings.Contains(err.Error(), "etpw") {
			t.Errorf("NewSMTP(%q) = %q: the error quotes the password", u, err)
		}
	}
}
