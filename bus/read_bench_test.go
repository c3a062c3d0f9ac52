package bus

import (
	"fmt"
	"strings"
	"testing"
)

// replayReader hands out copies of one reply, back to back, in reads of
// whatever size the caller asks for, as a socket would.
type replayReader struct {
	b   []byte
	pos int
}

func (r *replayReader) Read(p []byte) (int, error) {
	if r.pos == len(r.b) {
		r.pos = 0
	}
	n := copy(p, r.b[r.pos:])
	r.pos += n
	return n, nil
}

// benchReadReply is an XREADGROUP reply of 100 entries the size of an
// email.requested event (metadata and payload of a few hundred bytes), and
// an empty retry stream.
func benchReadReply() []byte {
	var b strings.Builder
	stream := "conveyor:email.requested"
	fmt.Fprintf(&b, "*2\r\n*2\r\n$%d\r\n%s\r\n*100\r\n", len(stream), stream)
	for i := range 100 {
		id := fmt.Sprintf("1765000000000-%d", i)
		fields := []string{fieldUUID, "0193a4b2-7c1d-7e2f-8a3b-4c5d6e7f8091", fieldMetadata, strings.Repeat("m", 160), fieldPayload, strings.Repeat("p", 260)}
		fmt.Fprintf(&b, "*2\r\n$%d\r\n%s\r\n*%d\r\n", len(id), id, len(fields))
		for _, f := range fields {
			fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(f), f)
		}
	}
	retry := RetryStream(stream, "g")
	fmt.Fprintf(&b, "*2\r\n$%d\r\n%s\r\n*0\r\n", len(retry), retry)
	return []byte(b.String())
}

// BenchmarkReadReply measures framing a read's reply off the connection,
// once per read of a subscription's lane.
func BenchmarkReadReply(b *testing.B) {
	raw := benchReadReply()
	c := &readConn{src: &replayReader{b: raw}}
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		if err := c.readReply(); err != nil {
			b.Fatal(err)
		}
		if len(c.rbuf) != len(raw) {
			b.Fatalf("framed %d bytes, want %d", len(c.rbuf), len(raw))
		}
	}
}

// BenchmarkParseXRead measures parsing a framed reply into entries.
func BenchmarkParseXRead(b *testing.B) {
	raw := benchReadReply()
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		res, err := parseXRead(raw)
		if err != nil {
			b.Fatal(err)
		}
		if len(res) != 2 || len(res[0].entries) != 100 {
			b.Fatalf("parsed %d streams", len(res))
		}
	}
}

// BenchmarkReadReplyPipelined measures framing the replies of a
// publisher's pipelined batch (512 XADDs), one after another.
func BenchmarkReadReplyPipelined(b *testing.B) {
	const n = 512
	reply := "$15\r\n1765000000000-0\r\n"
	c := &readConn{src: &replayReader{b: []byte(strings.Repeat(reply, n))}}
	b.ReportAllocs()
	for b.Loop() {
		for range n {
			if err := c.readReply(); err != nil {
				b.Fatal(err)
			}
			if len(c.rbuf) != len(reply) {
				b.Fatalf("framed %q", c.rbuf)
			}
		}
	}
}
