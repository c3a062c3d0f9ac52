package bus

import (
	"testing"

	"github.com/conveyor/conveyor/internal/testenv"
)

// TestNotSentSkipsEntriesBeingHandled: an entry that a stopped
// subscription did not hand out, but that a handler of this subscriber
// holds all the same (read again by a new Subscribe of the topic, or
// claimed back from this consumer), is not recorded for Close to hand
// back: that handler may still be at work when the drain ends.
func TestNotSentSkipsEntriesBeingHandled(t *testing.T) {
	s, err := NewSubscriber(SubscriberConfig{Client: testenv.Redis(t), ConsumerGroup: "g", Consumer: "a"})
	if err != nil {
		t.Fatal(err)
	}
	busy, free := entryKey{"stream", "1-1"}, entryKey{"stream", "1-2"}
	s.mu.Lock()
	s.inflight[busy] = &delivery{}
	s.mu.Unlock()

	s.notSent(busy, free)

	s.mu.Lock()
	_, gotBusy := s.unsent[busy]
	_, gotFree := s.unsent[free]
	// Leave nothing for Close: the delivery is not a real one.
	delete(s.inflight, busy)
	clear(s.unsent)
	s.mu.Unlock()
	if gotBusy || !gotFree {
		t.Fatalf("recorded: entry being handled %v, entry not handed out %v; want false, true", gotBusy, gotFree)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}
