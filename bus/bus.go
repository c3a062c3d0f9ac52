// Package bus carries Conveyor's events over Redis Streams. It is the only
// package that imports Watermill and speaks the Redis Streams commands; the
// api, handlers and projector see typed events and return errors.
//
// It owns what the stock watermill-redisstream subscriber gets wrong for a
// job system (see ARCHITECTURE.md §4): batched reads with a bounded in-flight
// window, batched acks that travel with the next read, reclaiming entries of dead consumers
// within seconds, heartbeats for long jobs, durable retries with backoff that
// never block a stream, a dead-letter stream per consumer group, stable
// consumer names, self-healing of lost groups, and a graceful close that
// never drops an ack. It keeps watermill-redisstream's wire format, so any
// Watermill publisher can produce Conveyor events.
//
// bus must not import the api, handlers, projector, store or cache packages.
package bus

import (
	"errors"
	"fmt"
	"strings"
)

// Metadata keys of the event envelope (ARCHITECTURE.md §2), kept in Watermill
// message metadata.
const (
	MetaEventID       = "event_id"
	MetaEventType     = "event_type"
	MetaEventVersion  = "event_version"
	MetaOccurredAt    = "occurred_at"
	MetaCorrelationID = "correlation_id"
	MetaCausationID   = "causation_id"
	MetaSource        = "source"
	MetaTraceparent   = "traceparent"
	// MetaAttempt is the delivery attempt a retried message is on (2 for the
	// first retry). Absent means 1.
	MetaAttempt = "attempt"
	// MetaFirstFailedAt and MetaLastError describe earlier failed attempts.
	MetaFirstFailedAt = "first_failed_at"
	MetaLastError     = "last_error"
)

// Key names. Keys that belong to one stream carry the stream name as a Redis
// Cluster hash tag, so a stream and its retry keys share one slot and can be
// updated in one MULTI or script.

// RetryStream is the stream a group's due retries are moved into. Only that
// group reads it, so a retry never reaches other groups of the stream.
func RetryStream(stream, group string) string {
	return "conveyor:{" + stream + "}:" + group + ":retry"
}

// RetrySet is the sorted set (score: due time in ms) holding a group's
// retries until they are due.
func RetrySet(stream, group string) string {
	return "conveyor:{" + stream + "}:" + group + ":delayed"
}

// DelayedSet is the sorted set holding events scheduled for later delivery to
// every group of stream.
func DelayedSet(stream string) string {
	return "conveyor:{" + stream + "}:delayed"
}

// DeadLetterStream is the dead-letter stream of a consumer group.
func DeadLetterStream(group string) string {
	return "conveyor:dlq:" + group
}

// permanentError marks an error that must not be retried.
type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

// Permanent marks err as permanent: the message goes to the dead-letter
// stream at once instead of being retried. Permanent(nil) is nil.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	if IsPermanent(err) {
		return err
	}
	return &permanentError{err}
}

// IsPermanent reports whether err (or an error it wraps) was marked with
// Permanent.
func IsPermanent(err error) bool {
	var p *permanentError
	return errors.As(err, &p)
}

// isNoGroup reports a NOGROUP reply: the stream or its consumer group is gone
// (Redis restarted empty, FLUSHALL, or someone deleted it).
func isNoGroup(err error) bool {
	return err != nil && strings.HasPrefix(err.Error(), "NOGROUP")
}

func isBusyGroup(err error) bool {
	return err != nil && strings.HasPrefix(err.Error(), "BUSYGROUP")
}

func wrapf(err error, format string, args ...any) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf(format+": %w", append(args, err)...)
}
