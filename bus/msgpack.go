package bus

import (
	"encoding/binary"
	"errors"
	"strings"

	"github.com/vmihailenco/msgpack/v5"
)

// Message metadata travels as a msgpack map of strings, the format of
// watermill-redisstream's marshaller. It is encoded on every publish and
// decoded on every delivery, so the common shapes take a direct path here;
// anything else (binary strings, unusual widths) falls back to the msgpack
// library, and a fuzz test checks both agree.

var errShortMsgpack = errors.New("msgpack: truncated")

// encodeMetadata encodes md as a msgpack map of str to str.
func encodeMetadata(md map[string]string) []byte {
	size := 5
	for k, v := range md {
		size += len(k) + len(v) + 10
	}
	b := appendMapHeader(make([]byte, 0, size), len(md))
	for k, v := range md {
		b = appendStr(b, k)
		b = appendStr(b, v)
	}
	return b
}

// encodePairs encodes alternating keys and values, each key once, as
// encodeMetadata encodes the map of them.
func encodePairs(kv []string) []byte {
	size := 5
	for _, s := range kv {
		size += len(s) + 5
	}
	b := appendMapHeader(make([]byte, 0, size), len(kv)/2)
	for _, s := range kv {
		b = appendStr(b, s)
	}
	return b
}

func appendMapHeader(b []byte, n int) []byte {
	switch {
	case n <= 15:
		b = append(b, 0x80|byte(n))
	case n <= 0xffff:
		b = append(b, 0xde, byte(n>>8), byte(n))
	default:
		b = append(b, 0xdf)
		b = binary.BigEndian.AppendUint32(b, uint32(n))
	}
	return b
}

func appendStr(b []byte, s string) []byte {
	n := len(s)
	switch {
	case n <= 31:
		b = append(b, 0xa0|byte(n))
	case n <= 0xff:
		b = append(b, 0xd9, byte(n))
	case n <= 0xffff:
		b = append(b, 0xda, byte(n>>8), byte(n))
	default:
		b = append(b, 0xdb)
		b = binary.BigEndian.AppendUint32(b, uint32(n))
	}
	return append(b, s...)
}

// decodeMetadataPairs decodes a msgpack map of strings into its keys and
// values, alternating, in one allocation: the strings share b's memory (b
// is an immutable string).
// Maps that are not plain string maps are decoded by the msgpack library.
func decodeMetadataPairs(b string) ([]string, error) {
	pairs, err := decodeMetadataFast(b)
	if err == nil {
		return pairs, nil
	}
	if errors.Is(err, errShortMsgpack) {
		// Cut short, or a map that declares more entries than its bytes
		// can hold: the library can do no better, and would first size
		// a map for the declared count (up to a million entries, some
		// 80 MB from a 5-byte field).
		return nil, err
	}
	// Decoded into a map made here (the library sizes only a nil map by
	// the declared count), from b itself, not a copy.
	md := map[string]string{}
	dec := msgpack.GetDecoder()
	dec.Reset(strings.NewReader(b))
	err = dec.Decode(&md)
	msgpack.PutDecoder(dec)
	if err != nil {
		return nil, err
	}
	pairs = make([]string, 0, 2*len(md))
	for k, v := range md {
		pairs = append(pairs, k, v)
	}
	return pairs, nil
}

func decodeMetadataFast(b string) ([]string, error) {
	if len(b) == 0 {
		return nil, errShortMsgpack
	}
	var n, i int
	switch c := b[0]; {
	case c&0xf0 == 0x80:
		n, i = int(c&0x0f), 1
	case c == 0xde && len(b) >= 3:
		n, i = int(be16(b[1:])), 3
	case c == 0xdf && len(b) >= 5:
		n, i = int(be32(b[1:])), 5
	default:
		return nil, errors.New("msgpack: not a map")
	}
	if n > (len(b)-i)/2 { // each entry needs at least two bytes
		return nil, errShortMsgpack
	}
	// Sized for the declared count only up to a usual envelope's: a map
	// that declares more than it holds (its first value not a string, say)
	// must not allocate for what it declares.
	pairs := make([]string, 0, min(2*n, 64))
	for j := 0; j < 2*n; j++ {
		v, next, err := readStr(b, i)
		if err != nil {
			return nil, err
		}
		pairs, i = append(pairs, v), next
	}
	if i != len(b) {
		return nil, errors.New("msgpack: trailing bytes")
	}
	return pairs, nil
}

func readStr(b string, i int) (string, int, error) {
	if i >= len(b) {
		return "", 0, errShortMsgpack
	}
	var n int
	c := b[i]
	switch {
	case c&0xe0 == 0xa0:
		n, i = int(c&0x1f), i+1
	case c == 0xd9 && i+1 < len(b):
		n, i = int(b[i+1]), i+2
	case c == 0xda && i+2 < len(b):
		n, i = int(be16(b[i+1:])), i+3
	case c == 0xdb && i+4 < len(b):
		n, i = int(be32(b[i+1:])), i+5
	default:
		return "", 0, errors.New("msgpack: not a string")
	}
	if n < 0 || i+n > len(b) {
		return "", 0, errShortMsgpack
	}
	return b[i : i+n], i + n, nil
}

func be16(b string) uint16 { return uint16(b[0])<<8 | uint16(b[1]) }

func be32(b string) uint32 {
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}
