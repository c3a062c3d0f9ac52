package api_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/redis/go-redis/v9"
)

// failHolds is a go-redis hook that fails every ZADD (the hold of an event
// without an id of its own) without sending it, as a Redis that stopped
// answering fails each after the client's timeouts, and counts them.
type failHolds struct{ tried atomic.Int32 }

func (h *failHolds) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *failHolds) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if cmdArgs(cmd)[0] == "zadd" {
			h.tried.Add(1)
			err := errors.New("i/o timeout")
			cmd.SetErr(err)
			return err
		}
		return next(ctx, cmd)
	}
}

func (h *failHolds) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// TestPostEventBatch_heldBackStopAtAFailure: once a held-back event of a
// batch fails, the batch tries no other: each would wait out the client's
// timeouts against a Redis that hangs. The ones not tried are answered as
// not published; the events for now are published as ever.
func TestPostEventBatch_heldBackStopAtAFailure(t *testing.T) {
	t.Parallel()
	holds := &failHolds{}
	e := newEnv(t, withPublisherRedis(hookedRedis(t, holds)))
	held := `{"type":"email.requested","delay":"1h","data":` + emailData("ann@example.com") + `}`
	now := `{"type":"email.requested","data":` + emailData("bob@example.com") + `}`
	a := e.postBatch(t, held, now, held, held)
	if n := holds.tried.Load(); n != 1 {
		t.Errorf("%d holds tried, want 1: none after the first failed", n)
	}
	if a.Results[1].Status != http.StatusAccepted {
		t.Errorf("event for now: %+v, want it accepted", a.Results[1])
	}
	for _, i := range []int{0, 2, 3} {
		if res := a.Results[i]; res.Status != http.StatusServiceUnavailable {
			t.Errorf("held-back event %d: %+v, want 503", i, res)
		}
	}
	for _, i := range []int{2, 3} {
		if res := a.Results[i]; !strings.Contains(string(res.Error), "not published") {
			t.Errorf("held-back event %d not tried: error %s, want it said not published", i, res.Error)
		}
	}
}
