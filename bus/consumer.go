package bus

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Consumer names must be unique per replica and stable across its restarts:
// a restarted replica re-reads its own pending entries at once, while an
// entry of a vanished name waits ClaimMinIdle for another replica. A lease
// in Redis makes two live processes never share a name.

// leaseTTL is short so that a replica restarted after a crash gets its own
// name back (and its pending entries at once) within seconds; it is
// renewed every third of it.
const leaseTTL = 6 * time.Second

func leaseKey(name string) string { return "conveyor:consumer:" + name }

// ConsumerLease holds a consumer name for as long as the process lives.
type ConsumerLease struct {
	name   string
	rdb    redis.UniversalClient
	token  string
	stop   chan struct{}
	done   chan struct{}
	once   sync.Once
	logger *slog.Logger
}

// Name returns the leased consumer name.
func (l *ConsumerLease) Name() string { return l.name }

var renewScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0`)

var releaseScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0`)

// LeaseConsumerName leases a consumer name. With an explicit name it waits
// (up to the lease time, for a crashed previous holder's lease to expire)
// and fails if another live process holds it. Without one it takes the
// lowest free "<hostname>-<n>", which is stable across restarts on one host
// and unique among replicas sharing a host name.
func LeaseConsumerName(ctx context.Context, rdb redis.UniversalClient, explicit string, logger *slog.Logger) (*ConsumerLease, error) {
	if logger == nil {
		logger = slog.Default()
	}
	tok := make([]byte, 16)
	_, _ = rand.Read(tok)
	l := &ConsumerLease{rdb: rdb, token: hex.EncodeToString(tok), stop: make(chan struct{}), done: make(chan struct{}), logger: logger}
	// setNX rides out Redis being down or loading: a replica that starts
	// during an outage waits for Redis instead of exiting.
	setNX := func(name string) (bool, error) {
		b := newBackoff(100*time.Millisecond, 5*time.Second)
		for {
			ok, err := rdb.SetNX(ctx, leaseKey(name), l.token, leaseTTL).Result()
			if err == nil {
				return ok, nil
			}
			if ctx.Err() != nil {
				return false, fmt.Errorf("lease consumer name %s: %w", name, err)
			}
			logger.Warn("lease consumer name; retrying", "consumer", name, "error", err, "retry_in", b.peek())
			b.sleep(ctx.Done())
		}
	}
	if explicit != "" {
		deadline := time.Now().Add(leaseTTL + time.Second)
		for {
			start := time.Now()
			ok, err := setNX(explicit)
			if err != nil {
				return nil, err
			}
			if time.Since(start) > time.Second {
				// Redis was out: the previous holder's lease may only now
				// run down.
				deadline = time.Now().Add(leaseTTL + time.Second)
			}
			if ok {
				l.name = explicit
				break
			}
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("consumer name %q is in use by another live process; give each replica its own CONSUMER_NAME", explicit)
			}
			select {
			case <-time.After(500 * time.Millisecond):
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
	} else {
		host, err := os.Hostname()
		if err != nil || host == "" {
			host = "conveyor"
		}
		host = strings.ReplaceAll(host, " ", "-")
		for i := 1; ; i++ {
			name := fmt.Sprintf("%s-%d", host, i)
			ok, err := setNX(name)
			if err != nil {
				return nil, err
			}
			if ok {
				l.name = name
				break
			}
			if i == 1000 {
				return nil, errors.New("no free consumer name among 1000")
			}
		}
	}
	go l.renew()
	return l, nil
}

// renew keeps the lease while the process runs. A Redis outage may let it
// lapse; renewing re-takes it if nobody else did.
func (l *ConsumerLease) renew() {
	defer close(l.done)
	t := time.NewTicker(leaseTTL / 3)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			n, err := renewScript.Run(ctx, l.rdb, []string{leaseKey(l.name)}, l.token, leaseTTL.Milliseconds()).Int()
			if err == nil && n == 0 {
				ok, serr := l.rdb.SetNX(ctx, leaseKey(l.name), l.token, leaseTTL).Result()
				if serr == nil && !ok {
					l.logger.Error("consumer name lease taken by another process; two replicas may share a consumer name", "consumer", l.name)
				}
			}
			cancel()
		}
	}
}

// Release gives the name back at shutdown.
func (l *ConsumerLease) Release(ctx context.Context) {
	l.once.Do(func() {
		close(l.stop)
		<-l.done
		_ = releaseScript.Run(ctx, l.rdb, []string{leaseKey(l.name)}, l.token).Err()
	})
}

// EnsureGroups creates consumer groups (and their retry streams) ahead of
// time, from the start of each stream. Creating every group before any
// event is trimmed means no group misses events published before its
// handler first ran. topology maps a group to the streams it reads.
func EnsureGroups(ctx context.Context, rdb redis.UniversalClient, topology map[string][]string) error {
	var errs []error
	for group, streams := range topology {
		for _, stream := range streams {
			for _, s := range []string{stream, RetryStream(stream, group)} {
				if err := rdb.XGroupCreateMkStream(ctx, s, group, "0").Err(); err != nil && !isBusyGroup(err) {
					errs = append(errs, fmt.Errorf("create group %s on %s: %w", group, s, err))
				}
			}
		}
	}
	return errors.Join(errs...)
}
