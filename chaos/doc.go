// Package chaos holds Conveyor's chaos tests (ARCHITECTURE.md §3 and §7).
//
// They run the real conveyor binary as separate processes (one api, several
// handler and projector replicas) against a redis-server, a PostgreSQL and a
// Mailpit of their own. A seeded generator posts documents, emails and
// upstream events and keeps a ledger of every request the API accepted,
// while a seeded injector kills replicas with kill -9, stops them with a
// grace period too short to drain, kills Redis, stops PostgreSQL and writes
// poison entries straight into the streams. When the schedule is over,
// everything is brought back, the streams drain, and a checker compares the
// ledger with the read models, the SMTP server and the dead-letter streams.
// One table reports accepted, processed, lost (must be 0), duplicates
// absorbed, duplicate effects (must be 0), duplicate emails, dead letters
// (must equal the poison injected), recovery time and latency.
//
// A negative control runs the same checker against a Redis without AOF that
// is killed while work is accepted, and requires it to report loss: a
// checker that cannot fail proves nothing.
//
// Every run is bounded in time and count and stops itself. `go test
// ./chaos/` runs the short mode (skipped with -short, the unit tier);
// `go tool task chaos` runs the full mode (-chaos.full). The seed is logged
// first; -chaos.seed replays the same load and fault schedule.
//
// The package holds tests only and nothing imports it. It drives the binary
// from outside and imports product packages only for names (groups, event
// types, derived ids) and read-only inspection (bus.Inspect, dead letters).
package chaos
