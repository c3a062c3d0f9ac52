package main

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"
)

// redisLogEvery is how often redisLogger writes a line of one format.
const redisLogEvery = 10 * time.Second

// redisLogger is go-redis's own logger (redis.SetLogger): it writes what the
// client library logs by itself, such as a pool's failed dials, through slog
// at warn level, so in the process's format (JSON in containers) rather than
// as go-redis's plain-text lines on stderr.
//
// While Redis is down the pools keep dialing (for their idle connections and
// every command) and go-redis logs each failure: dozens of lines a second.
// So a format is written at most once per interval; the next line written
// says how many were suppressed since the last one ("suppressed"). Go-redis's
// formats are constants, so the map stays small; it is emptied should it
// ever grow large.
type redisLogger struct {
	log   *slog.Logger
	every time.Duration
	now   func() time.Time

	mu   sync.Mutex
	seen map[string]*redisLogFormat // by format
}

// redisLogFormat is what redisLogger remembers of one format.
type redisLogFormat struct {
	last       time.Time // when a line of it was written
	suppressed int       // lines not written since
}

func newRedisLogger(log *slog.Logger) *redisLogger {
	return &redisLogger{log: log, every: redisLogEvery, now: time.Now, seen: map[string]*redisLogFormat{}}
}

// Printf implements go-redis's logger interface.
func (l *redisLogger) Printf(ctx context.Context, format string, args ...any) {
	l.mu.Lock()
	now := l.now()
	f := l.seen[format]
	if f != nil && now.Sub(f.last) < l.every {
		f.suppressed++
		l.mu.Unlock()
		return
	}
	if f == nil {
		if len(l.seen) >= 1000 {
			clear(l.seen)
		}
		f = &redisLogFormat{}
		l.seen[format] = f
	}
	suppressed := f.suppressed
	f.last, f.suppressed = now, 0
	l.mu.Unlock()

	msg := strings.TrimSpace(fmt.Sprintf(format, args...))
	attrs := []any{"component", "go-redis"}
	if suppressed > 0 {
		attrs = append(attrs, "suppressed", suppressed)
	}
	if ctx == nil {
		ctx = context.Background()
	}
	l.log.WarnContext(ctx, msg, attrs...)
}
