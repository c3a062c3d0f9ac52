package cache

import (
	"context"
	"time"
)

// ValueKey exposes the Redis key that holds key's value, for tests that
// inspect Redis directly.
func (c *Client) ValueKey(key string) string { return c.valueKey(key) }

// VersionKey exposes the Redis key that holds key's version.
func (c *Client) VersionKey(key string) string { return c.versionKey(key) }

// VersionTTL is how long a version key lives after the load that made it.
const VersionTTL = versionTTL

// GuardedLoad returns the longest load whose value c stores.
func (c *Client) GuardedLoad() time.Duration { return c.guardedLoad }

// SetGuardedLoad shortens it, for a test of a load that outlasts it.
func (c *Client) SetGuardedLoad(d time.Duration) { c.guardedLoad = d }

// SetRedisPause sets how long Fetch leaves Redis alone after a failed call.
func (c *Client) SetRedisPause(d time.Duration) { c.redisPause = d }

// ReadForLoad runs the read that precedes a load (see fill).
func (c *Client) ReadForLoad(ctx context.Context, key string, force bool) ([]byte, string, error) {
	return c.readForLoad(ctx, key, force)
}
