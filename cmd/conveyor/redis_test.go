package main

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"
)

// TestRedisClientHonoursDeadlines: a command to a Redis that hangs (it
// takes connections and never answers) ends with its context's deadline,
// not with the client's own read timeout: a readiness check must answer in
// its 2 s.
func TestRedisClientHonoursDeadlines(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { _ = c.Close() })
		}
	}()
	rdb, err := redisClient("redis://" + ln.Addr().String() + "/0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rdb.Close() })
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := rdb.Ping(ctx).Err(); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("PING of a hung Redis: %v, want the context's deadline", err)
	}
	// Not a measure of speed: without the deadline the client waits for
	// its read timeout, 3 s, fifteen times the deadline.
	if took := time.Since(start); took >= 2*time.Second {
		t.Errorf("PING of a hung Redis with a 200ms deadline took %v: the client waited for its own read timeout", took)
	}
}
