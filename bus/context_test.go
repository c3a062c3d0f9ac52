package bus

import (
	"context"
	"runtime"
	"testing"
	"time"

	"github.com/conveyor/conveyor/events"
)

// TestHandlerContext: a handler's context carries its values through
// derived contexts, and derived contexts end with the message's context
// without a goroutine each (they attach to the parent's cancellation, as
// they would to a context.WithValue).
func TestHandlerContext(t *testing.T) {
	parent, cancel := context.WithCancel(context.Background())
	hc := &handlerCtx{Context: parent, hv: handlerValues{env: events.Envelope{ID: "e1", Attempt: 3}, attempts: attempts{attempt: 3, max: 3}}}
	before := runtime.NumGoroutine()
	var children []context.Context
	for range 200 {
		c, stop := context.WithTimeout(hc, time.Hour)
		defer stop()
		children = append(children, c)
	}
	if grew := runtime.NumGoroutine() - before; grew > 20 {
		t.Fatalf("200 derived contexts started %d goroutines; want none", grew)
	}
	env, ok := EnvelopeFrom(children[0])
	if !ok || env.ID != "e1" || Attempt(children[0]) != 3 || !IsLastAttempt(children[0]) {
		t.Fatalf("derived context: envelope %+v %v, attempt %d, last %v", env, ok, Attempt(children[0]), IsLastAttempt(children[0]))
	}
	if _, ok := EnvelopeFrom(context.Background()); ok || Attempt(context.Background()) != 0 {
		t.Fatal("a plain context claims to be a handler's")
	}
	cancel()
	for _, c := range children {
		select {
		case <-c.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("a derived context outlived the message's context")
		}
	}
}
