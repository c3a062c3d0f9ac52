package api

import (
	"bytes"
	"io"
	"testing"
	"testing/iotest"
)

// TestCloseWatch reads bodies in reads of every size from 1 byte up, so
// that the close delimiter falls across reads in every way.
func TestCloseWatch(t *testing.T) {
	const boundary = "b0undary"
	tests := []struct {
		name   string
		body   string
		closed bool
	}{
		{"closed", "--b0undary\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx\r\n--b0undary--\r\n", true},
		{"closed without a line break after", "--b0undary\r\n\r\nx\r\n--b0undary--", true},
		{"closed with an epilogue", "--b0undary\r\n\r\nx\r\n--b0undary--\r\nepilogue text", true},
		{"empty multipart", "--b0undary--\r\n", true},
		{"cut after a delimiter line", "--b0undary\r\n\r\nx\r\n--b0undary\r\n", false},
		{"cut in the close delimiter", "--b0undary\r\n\r\nx\r\n--b0undary-", false},
		{"delimiter text without its line break", "--b0undary\r\n\r\nx--b0undary--", false},
		{"bare LF line breaks, closed", "--b0undary\nContent-Disposition: form-data; name=\"a\"\n\nx\n--b0undary--\n", true},
		{"bare LF line breaks, cut", "--b0undary\n\nx\n--b0undary\n", false},
	}
	for _, tt := range tests {
		for size := 1; size <= len(tt.body); size++ {
			w := newCloseWatch(&chunked{r: bytes.NewReader([]byte(tt.body)), n: size}, boundary)
			got, err := io.ReadAll(w)
			if err != nil || string(got) != tt.body {
				t.Fatalf("%s, reads of %d: read %q, %v", tt.name, size, got, err)
			}
			if w.closed != tt.closed {
				t.Errorf("%s, reads of %d: closed %v, want %v", tt.name, size, w.closed, tt.closed)
			}
		}
		w := newCloseWatch(iotest.HalfReader(bytes.NewReader([]byte(tt.body))), boundary)
		if _, err := io.ReadAll(w); err != nil || w.closed != tt.closed {
			t.Errorf("%s, half reads: closed %v (%v), want %v", tt.name, w.closed, err, tt.closed)
		}
	}
}

// chunked returns at most n bytes per read.
type chunked struct {
	r io.Reader
	n int
}

func (c *chunked) Read(p []byte) (int, error) {
	if len(p) > c.n {
		p = p[:c.n]
	}
	return c.r.Read(p)
}
