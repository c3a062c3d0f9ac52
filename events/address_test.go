package events

import (
	"net/mail"
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
