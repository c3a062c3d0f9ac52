package bus

import (
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
		fast, fastErr := decodeMetadataFast(string(b))
		libMD := map[string]string{}
		libErr := msgpack.Unmarshal(b, &libMD)
		if fastErr == nil {
			if libErr != nil {
				t.Fatalf("fast path accepted %x, which msgpack refuses: %v", b, libErr)
			}
			if !reflect.DeepEqual(fast, libMD) {
				t.Fatalf("decoded %x differently: %v vs %v", b, fast, libMD)
			}
			// And it round-trips through the encoder.
			again, err := decodeMetadataFast(string(encodeMetadata(fast)))
			if err != nil || !reflect.DeepEqual(again, fast) {
				t.Fatalf("round trip of %v: %v %v", fast, again, err)
			}
			// The pair encoder (publishing) writes what the map encoder does.
			var kv []string
			for k, v := range fast {
				kv = append(kv, k, v)
			}
			if again, err := decodeMetadataFast(string(encodePairs(kv))); err != nil || !reflect.DeepEqual(again, fast) && len(fast) > 0 {
				t.Fatalf("pairs of %v read back as %v (%v)", fast, again, err)
			}
			var viaLib map[string]string
			if err := msgpack.Unmarshal(encodeMetadata(fast), &viaLib); err != nil || !reflect.DeepEqual(viaLib, fast) && len(fast) > 0 {
				t.Fatalf("library reads our encoding of %v as %v (%v)", fast, viaLib, err)
			}
		}
	})
}
