package bus

import (
	"maps"
	"reflect"
	"testing"

	"github.com/vmihailenco/msgpack/v5"
)

// FuzzMetadataCodec: the direct metadata codec agrees with the msgpack
// library both ways, and never accepts what the library refuses.
func FuzzMetadataCodec(f *testing.F) {
	f.Add([]byte{0x80})
	f.Add(encodeMetadata(map[string]string{"event_type": "email.requested", "k": string(make([]byte, 40000))}))
	big := map[string]string{}
	for i := 0; i < 20; i++ {
		big[string(rune('a'+i))] = "v"
	}
	f.Add(encodeMetadata(big))
	lib, _ := msgpack.Marshal(map[string]string{"a": "b", "long": string(make([]byte, 300))})
	f.Add(lib)
	f.Add([]byte{0x81, 0xc4, 0x01, 'k', 0xa1, 'v'}) // a binary key: the library's path
	f.Fuzz(func(t *testing.T, b []byte) {
		pairs, fastErr := decodeMetadataFast(string(b))
		fast := pairsMap(pairs)
		libMD := map[string]string{}
		libErr := msgpack.Unmarshal(b, &libMD)
		// The decoder as a whole (fast path, else the library) reads
		// whatever the library reads, the same way.
		if libErr == nil {
			all, err := decodeMetadata(string(b))
			if err != nil || len(all) != len(libMD) || len(all) > 0 && !reflect.DeepEqual(all, libMD) {
				t.Fatalf("decoded %x as %v (%v); the library reads %v", b, all, err, libMD)
			}
		}
		if fastErr == nil {
			if libErr != nil {
				t.Fatalf("fast path accepted %x, which msgpack refuses: %v", b, libErr)
			}
			if !reflect.DeepEqual(fast, libMD) {
				t.Fatalf("decoded %x differently: %v vs %v", b, fast, libMD)
			}
			// A handler without middleware reads the pairs as a
			// message's metadata would read.
			em := entryMessage{meta: pairs}
			for k, v := range libMD {
				if got := em.Get(k); got != v {
					t.Fatalf("Get(%q) of %x = %q; the map has %q", k, b, got, v)
				}
			}
			// And it round-trips through the encoder.
			again, err := decodeMetadata(string(encodeMetadata(fast)))
			if err != nil || !reflect.DeepEqual(again, fast) {
				t.Fatalf("round trip of %v: %v %v", fast, again, err)
			}
			// The pair encoder (publishing) writes what the map encoder does.
			var kv []string
			for k, v := range fast {
				kv = append(kv, k, v)
			}
			if again, err := decodeMetadata(string(encodePairs(kv))); err != nil || !reflect.DeepEqual(again, fast) && len(fast) > 0 {
				t.Fatalf("pairs of %v read back as %v (%v)", fast, again, err)
			}
			var viaLib map[string]string
			if err := msgpack.Unmarshal(encodeMetadata(fast), &viaLib); err != nil || !reflect.DeepEqual(viaLib, fast) && len(fast) > 0 {
				t.Fatalf("library reads our encoding of %v as %v (%v)", fast, viaLib, err)
			}
		}
	})
}

// pairsMap is the map of alternating keys and values (nil for none).
// decodeMetadata decodes a msgpack map of strings into a map.
func decodeMetadata(b string) (map[string]string, error) {
	pairs, err := decodeMetadataPairs(b)
	if err != nil {
		return nil, err
	}
	return pairsMap(pairs), nil
}

func pairsMap(pairs []string) map[string]string {
	if pairs == nil {
		return nil
	}
	m := make(map[string]string, len(pairs)/2)
	for i := 0; i+1 < len(pairs); i += 2 {
		m[pairs[i]] = pairs[i+1]
	}
	return m
}

// The raw fields of an undecodable entry's dead letter keep their bytes,
// and dead letters written as JSON before still read.
func TestDecodeRaw(t *testing.T) {
	fields := map[string]string{"payload": "\xff\xfe\x00binary", "{": "}", "": ""}
	got, err := decodeRaw(string(encodeMetadata(fields)))
	if err != nil || !maps.Equal(got, fields) {
		t.Fatalf("decodeRaw(msgpack) = %q, %v; want %q", got, err, fields)
	}
	got, err = decodeRaw(`{"foo":"bar"}`)
	if err != nil || !maps.Equal(got, map[string]string{"foo": "bar"}) {
		t.Fatalf("decodeRaw(JSON) = %q, %v", got, err)
	}
	if _, err := decodeRaw("\xc1"); err == nil {
		t.Fatal("decodeRaw of neither msgpack nor JSON: no error")
	}
}
