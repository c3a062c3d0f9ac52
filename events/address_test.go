package events

import (
	"errors"
	"net/mail"
	"strings"
	"testing"
)

// addressSeeds are plain addresses the fast path takes and near misses it
// must leave to net/mail.
var addressSeeds = []string{
	"a@example.com", "first.last+tag@sub.example.co.uk", "x@localhost", "!#$%&'*+-/=?^_`{|}~@example.com",
	"a@b", "@example.com", "a@", "a", "", "a@@b.com", "a@b@c.com", ".a@example.com", "a.@example.com",
	"a..b@example.com", "a@.example.com", "a@example.com.", "a@example..com", "a@[127.0.0.1]",
	`"quoted"@example.com`, "Name <a@example.com>", "a@example.com (comment)", " a@example.com",
	"a@example.com ", "a b@example.com", "é@example.com", "a@exämple.com", "a\x00@example.com",
	"a\t@example.com", "a@example.com\x7f", "a(b)@example.com", "a,b@example.com", "a;b@example.com",
	"a\\b@example.com", "<a@example.com>", "a@example.com>", "a:b@example.com",
	// At and over the RFC 5321 limits: 64 bytes before the @, 254 in all.
	strings.Repeat("a", 64) + "@example.com", strings.Repeat("a", 65) + "@example.com",
	"a@" + strings.Repeat("b", 248) + ".com", "a@" + strings.Repeat("b", 249) + ".com",
	"Name <" + strings.Repeat("a", 65) + "@example.com>",
}

// TestAddressLength: RFC 5321 bounds the address (not its display name)
// to 254 bytes, of which at most 64 before the @.
func TestAddressLength(t *testing.T) {
	t.Parallel()
	domain := func(n int) string { return strings.Repeat("d", n-4) + ".com" } // n bytes
	tests := []struct {
		name    string
		addr    string
		wantErr bool
	}{
		{name: "local part of 64", addr: strings.Repeat("a", 64) + "@example.com"},
		{name: "local part of 65", addr: strings.Repeat("a", 65) + "@example.com", wantErr: true},
		{name: "254 in all", addr: "a@" + domain(252)},
		{name: "255 in all", addr: "a@" + domain(253), wantErr: true},
		{name: "20 KB", addr: strings.Repeat("a", 20<<10) + "@example.com", wantErr: true},
		{name: "20 KB domain", addr: "a@" + domain(20<<10), wantErr: true},
		{name: "display name does not count", addr: strings.Repeat("N", 300) + " <a@example.com>"},
		{name: "long local part with a display name", addr: "Name <" + strings.Repeat("a", 65) + "@example.com>", wantErr: true},
		{name: "long quoted local part", addr: `"` + strings.Repeat("a b", 22) + `"@example.com`, wantErr: true},
		{name: "multi-byte local part counts bytes", addr: strings.Repeat("é", 33) + "@example.com", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := ParseAddress(tt.addr)
			if (err != nil) != tt.wantErr {
				t.Fatalf("ParseAddress(%.80q…) err = %v, want an error: %v", tt.addr, err, tt.wantErr)
			}
			if err != nil && !strings.Contains(err.Error(), "at most 254 bytes") {
				t.Errorf("err = %q, want it to give the limits", err)
			}
		})
	}
}

// TestPlainAddressAgreesWithNetMail checks that whatever the fast path
// accepts, net/mail accepts with the same result.
func TestPlainAddressAgreesWithNetMail(t *testing.T) {
	t.Parallel()
	took := 0
	for _, s := range addressSeeds {
		if checkPlainAddress(t, s) {
			took++
		}
	}
	// Every byte in the local part and in the domain.
	for c := range 256 {
		checkPlainAddress(t, "a"+string([]byte{byte(c)})+"b@example.com")
		checkPlainAddress(t, "ab@exa"+string([]byte{byte(c)})+"mple.com")
	}
	// The fast path must actually take the common form, or it saves nothing.
	if took < 5 {
		t.Fatalf("fast path took %d of the seeds; want at least the 5 plain ones", took)
	}
	if !isPlainAddress("a@example.com") {
		t.Fatal(`fast path refused "a@example.com"`)
	}
}

func FuzzPlainAddress(f *testing.F) {
	for _, s := range addressSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) { checkPlainAddress(t, s) })
}

// checkPlainAddress fails t if the fast path accepts s differently from
// net/mail, and reports whether it accepted s. It also checks that the
// validation without a result (parseAddress) agrees with ParseAddress.
func checkPlainAddress(t *testing.T, s string) bool {
	t.Helper()
	full, fullErr := ParseAddress(s)
	short, shortErr := parseAddress(s)
	switch {
	case errors.Is(fullErr, errAddressTooLong):
		// A length only ParseAddress (ingest) refuses.
		if shortErr != nil {
			t.Errorf("parseAddress(%q) error %v; ParseAddress refuses only its length", s, shortErr)
		}
	case (fullErr == nil) != (shortErr == nil):
		t.Errorf("parseAddress(%q) error %v; ParseAddress's %v", s, shortErr, fullErr)
	case fullErr == nil && short == nil && *full != (mail.Address{Address: s}):
		t.Errorf("parseAddress(%q) took it as plain; ParseAddress gives %+v", s, *full)
	case fullErr == nil && short != nil && *short != *full:
		t.Errorf("parseAddress(%q) = %+v; ParseAddress gives %+v", s, *short, *full)
	}
	if !isPlainAddress(s) {
		return false
	}
	want, err := mail.ParseAddress(s)
	if err != nil {
		t.Errorf("isPlainAddress(%q) accepted it; net/mail refuses it: %v", s, err)
		return true
	}
	if *want != (mail.Address{Address: s}) {
		t.Errorf("isPlainAddress(%q) accepted it as the address itself; net/mail gives %+v", s, *want)
	}
	return true
}
