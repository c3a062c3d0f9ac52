// Package bench holds Conveyor's benchmarks. It is a module of its own, so
// that the peers it compares against (asynq, River) never enter the
// product's go.mod.
//
// The benchmark command, cmd/conveyor-bench, measures Conveyor against raw
// go-redis, the stock watermill-redisstream subscriber, asynq and River on
// one Redis and one PostgreSQL, and reports ratios to baselines measured in
// the same run:
//
//	cd bench && go run ./cmd/conveyor-bench            # full run, about 10–15 minutes
//	cd bench && go run ./cmd/conveyor-bench -short     # smoke run
//	go tool task bench -- -only e2e,latency            # from the repository root
//
// The Go benchmarks in hotpath_test.go measure hot paths of the product
// through its exported API (event decoding, the bus wire format, cache
// hits, JSON views), with allocations:
//
//	cd bench && go test -run '^$' -bench . -benchmem
//
// Nothing here is a timed assertion: speed is reported, never tested.
//
// Package bench must not be imported by the product.
package bench
