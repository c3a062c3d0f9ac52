// Package blob stores uploaded document bytes.
//
// The default Store is Dir, a directory (a named docker volume in
// production) whose files are addressed by the SHA-256 of their content.
// The Store interface is kept small so that S3-compatible storage can be
// added later without touching its callers. Uploads are streamed: a Put
// never holds the whole document in memory.
//
// This package must not import other project packages; it depends on the
// standard library only, so that any role can use it.
package blob

import (
	"context"
	"errors"
	"io"
	"time"
)

// ErrTooLarge is returned by Put when the reader holds more than maxBytes.
// Nothing is kept in that case.
var ErrTooLarge = errors.New("blob too large")

// ErrNotFound is returned when no bytes are stored under a key.
var ErrNotFound = errors.New("blob not found")

// ErrInvalidKey is returned when a key is not a valid content address.
// Keys are checked before any file system access so that a key taken from
// a request can never name a path outside the store.
var ErrInvalidKey = errors.New("invalid blob key")

// Info describes stored bytes.
type Info struct {
	// Key is the content address: the lowercase hex SHA-256 of the bytes.
	Key string
	// SHA256 is the lowercase hex SHA-256 of the bytes. It equals Key for
	// Dir; it is a separate field so that other stores can use other keys.
	SHA256 string
	// Size is the number of bytes stored.
	Size int64
	// Created is true if this Put wrote new bytes and false if identical
	// bytes were already stored. A caller whose request fails after the Put
	// may delete the bytes only when Created is true, because otherwise they
	// belong to an earlier upload too. Stat always leaves it false.
	Created bool
	// LastPut is when the bytes were last stored by any Put (a Put of
	// identical bytes refreshes it). Retention uses it to spare bytes that a
	// new upload just claimed. Stat and Walk set it, and a Put that created
	// the bytes (for DeleteIfUnchanged).
	LastPut time.Time
}

// Walker is a Store that can list what it holds, for sweeping bytes that
// nothing refers to.
type Walker interface {
	// Walk calls fn with the Info (Key, Size, LastPut) of every stored
	// blob, in no particular order, until fn returns an error (which Walk
	// returns) or ctx ends.
	Walk(ctx context.Context, fn func(Info) error) error
}

// Store is the storage for document bytes that the API and the handlers
// need. Implementations must be safe for concurrent use.
type Store interface {
	// Put streams r into the store. It reads at most maxBytes (which must
	// be > 0); if r holds more, it returns ErrTooLarge and keeps nothing.
	// On any error nothing is kept.
	Put(ctx context.Context, r io.Reader, maxBytes int64) (Info, error)
	// Open returns a reader for the bytes under key, or ErrNotFound if
	// there are none. The caller must close the reader.
	Open(ctx context.Context, key string) (io.ReadCloser, error)
	// Stat returns the key and size of the bytes under key, or ErrNotFound
	// if there are none.
	Stat(ctx context.Context, key string) (Info, error)
	// Delete removes the bytes under key. Deleting an absent key is not an
	// error, so a retried delete succeeds.
	Delete(ctx context.Context, key string) error
	// DeleteIfUnchanged removes the bytes under info.Key unless a Put
	// stored them after info.LastPut, atomically with respect to Puts: a
	// Put of the same bytes either keeps them or stores them anew. It
	// reports whether it removed them. The cleanup of a failed upload and
	// retention use it: concurrent uploads of identical bytes share them.
	DeleteIfUnchanged(ctx context.Context, info Info) (bool, error)
}

// keyLen is the length of a hex-encoded SHA-256 digest.
const keyLen = 64

// validKey reports whether key is exactly 64 lowercase hex characters.
// Accepting nothing else rules out path separators, "..", and a second
// spelling (uppercase) of the same content address.
func validKey(key string) bool {
	if len(key) != keyLen {
		return false
	}
	for i := range len(key) {
		c := key[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
