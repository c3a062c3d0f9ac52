package cache

// ValueKey exposes the Redis key that holds key's value, for tests that
// inspect Redis directly.
func (c *Client) ValueKey(key string) string { return c.valueKey(key) }

// VersionKey exposes the Redis key that holds key's version.
func (c *Client) VersionKey(key string) string { return c.versionKey(key) }
