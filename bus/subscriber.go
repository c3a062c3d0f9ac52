package bus

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"github.com/vmihailenco/msgpack/v5"
)

// SubscriberConfig configures a Subscriber: one consumer of one consumer
// group, on any number of streams.
type SubscriberConfig struct {
	// Client is the Redis holding the streams. Required. Close never closes
	// it: its owner does.
	Client redis.UniversalClient
	// ConsumerGroup names the group. Required. A group is named after its
	// handler and never renamed: a new name is a new group that replays the
	// stream.
	ConsumerGroup string
	// Consumer names this consumer within the group. Required; it must be
	// unique per replica and stable across restarts of that replica (see
	// ConsumerName), so a restarted replica finds its own pending entries.
	Consumer string
	// BatchSize is the COUNT of each XREADGROUP. Defaults to 100.
	BatchSize int
	// MaxInFlight bounds how many messages of all this subscriber's
	// subscriptions are handed out and not yet done: acked by their
	// handler (the ack itself is then written with the next batch) or
	// nacked and scheduled. It is the concurrency of the handler.
	// Defaults to 64.
	MaxInFlight int
	// ReadAhead is how far past MaxInFlight a subscription reads, in time:
	// a read may ask for the entries its handlers would take within
	// ReadAhead at their pace of the last moments, never more than
	// 2×BatchSize: a full read for each of its two read loops (COUNT, so
	// up to that many from each of the topic and its retry stream). Fast
	// handlers then find the next entries already read when a slot frees,
	// and each read loop reads whole batches. Handlers that turn slow or
	// get stuck stop it within about 20ms: only what was read ahead before
	// waits for their slots (kept alive by the heartbeats, so not claimed by another
	// replica meanwhile); after that nothing waits here behind a slow job
	// while another replica is idle. Entries read ahead stay pending on
	// Close like those handed back. Defaults to 5ms; negative turns it off.
	ReadAhead time.Duration
	// BlockTime is how long one XREADGROUP waits for new entries. Close
	// does not wait it out: it cuts a read over the subscription's own
	// connection short. Defaults to 1s.
	BlockTime time.Duration
	// ClaimMinIdle is how long an entry of another consumer must be idle
	// before this one claims it: the time to recover the work of a crashed
	// replica. Live consumers refresh their entries every
	// HeartbeatInterval, so a slow job is never stolen. Defaults to 10s.
	ClaimMinIdle time.Duration
	// ClaimInterval is how often idle entries are looked for. Defaults to
	// ClaimMinIdle/2.
	ClaimInterval time.Duration
	// HeartbeatInterval is how often entries still being worked on are
	// re-claimed by their own consumer to reset their idle time. Defaults
	// to ClaimMinIdle/3. The heartbeat looks every HeartbeatInterval/2 for
	// entries idle for HeartbeatInterval, so an entry's idle time reaches
	// 1.5×HeartbeatInterval: that must stay under ClaimMinIdle.
	HeartbeatInterval time.Duration
	// Retry is the retry policy for nacked messages.
	Retry RetryPolicy
	// MaxDeliveries dead-letters an entry that was delivered this many
	// times without ever being acked or nacked: a message that crashes or
	// hangs its consumer. Defaults to 10.
	MaxDeliveries int
	// DrainTimeout is how long Close waits for handed-out messages to be
	// acked or nacked before it hands them back (leaves them pending, to be
	// re-read on restart or claimed by another replica), counted from the
	// call of Close: it also bounds the wait for readers still inside a
	// call to a Redis that stopped answering. Defaults to 20s.
	DrainTimeout time.Duration
	// DeadLetterMaxLen caps each dead-letter stream (approximately).
	// Defaults to 100000.
	DeadLetterMaxLen int64
	// HandlerTimeout, if set, cancels the context of a message handed out
	// longer than this (checked with the heartbeats, so up to
	// HeartbeatInterval/2 late). It saves a timer per message.
	HandlerTimeout time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Metrics, if set, counts outcomes.
	Metrics *Metrics
}

func (c *SubscriberConfig) setDefaults() {
	if c.BatchSize == 0 {
		c.BatchSize = 100
	}
	if c.MaxInFlight == 0 {
		c.MaxInFlight = 64
	}
	if c.ReadAhead == 0 {
		c.ReadAhead = 5 * time.Millisecond
	}
	if c.BlockTime == 0 {
		c.BlockTime = time.Second
	}
	if c.ClaimMinIdle == 0 {
		c.ClaimMinIdle = 10 * time.Second
	}
	if c.ClaimInterval == 0 {
		c.ClaimInterval = c.ClaimMinIdle / 2
	}
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = c.ClaimMinIdle / 3
	}
	c.Retry.setDefaults()
	if c.MaxDeliveries == 0 {
		c.MaxDeliveries = 10
	}
	if c.DrainTimeout == 0 {
		c.DrainTimeout = 20 * time.Second
	}
	if c.DeadLetterMaxLen == 0 {
		c.DeadLetterMaxLen = DefaultDeadLetterMaxLen
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Validate reports every configuration problem at once.
func (c *SubscriberConfig) Validate() error {
	var errs []error
	if c.Client == nil {
		errs = append(errs, errors.New("subscriber: Client is required"))
	}
	if c.ConsumerGroup == "" {
		errs = append(errs, errors.New("subscriber: ConsumerGroup is required"))
	}
	if c.Consumer == "" {
		errs = append(errs, errors.New("subscriber: Consumer is required"))
	}
	if c.BatchSize < 1 || c.MaxInFlight < 1 {
		errs = append(errs, errors.New("subscriber: BatchSize and MaxInFlight must be at least 1"))
	}
	if c.BlockTime < time.Millisecond {
		errs = append(errs, errors.New("subscriber: BlockTime must be at least 1ms"))
	}
	if c.HeartbeatInterval*3/2 >= c.ClaimMinIdle {
		errs = append(errs, errors.New("subscriber: HeartbeatInterval must be under two thirds of ClaimMinIdle (an entry's idle time reaches 1.5×HeartbeatInterval between beats), or live jobs get stolen"))
	}
	if c.ClaimInterval <= 0 || c.HeartbeatInterval <= 0 {
		errs = append(errs, errors.New("subscriber: ClaimInterval and HeartbeatInterval must be positive"))
	}
	if c.MaxDeliveries < 1 {
		errs = append(errs, errors.New("subscriber: MaxDeliveries must be at least 1"))
	}
	if err := c.Retry.Validate(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Subscriber implements Watermill's message.Subscriber on Redis Streams
// consumer groups, with the delivery guarantees of ARCHITECTURE.md §3.
//
// Each Subscribe reads one stream and the group's retry stream of it in
// batches, the next read under way while a batch is handed out; at most
// MaxInFlight messages are being handled at once; acks are collected and
// written in batches ahead of the next read, on the reader's own connection
// (readConn), or by the ack loop if no read comes first. A nacked message
// is acked on its stream and re-added, with its attempt count, to a sorted
// set from which it is moved to the group's retry stream when due; after
// the last attempt, or at once for a permanent error, it goes to the
// group's dead-letter stream. An entry that cannot be decoded is
// dead-lettered without stopping anything.
type Subscriber struct {
	cfg SubscriberConfig
	log *slog.Logger

	// slots is the in-flight window: a send takes a slot, a receive frees
	// one.
	slots chan struct{}
	// freed is poked when slots are released.
	freed chan struct{}
	// released counts the slots released by handled deliveries, and pace
	// how fast: the read-ahead follows it.
	released atomic.Int64
	pace     pace

	mu       sync.Mutex
	inflight map[entryKey]*delivery
	waiting  map[*readBatch]struct{} // read, not all handed out yet
	// unsent holds the entries read and never handed out to a handler
	// because their subscription stopped: Close hands them back. No key
	// is in both unsent and inflight (notSent and deliverOne keep it so,
	// under mu), so no handler holds an entry Close hands back.
	unsent map[entryKey]struct{}
	closed bool
	// handOutStopped is set by Close when it stops waiting: nothing is
	// handed out after, even by a reader Close no longer waits for.
	handOutStopped bool

	// Counters of Metrics for this group, looked up once.
	mDelivered prometheus.Counter
	mOutcome   map[outcome]prometheus.Counter
	mClaimed   prometheus.Counter

	closing    chan struct{} // closed when Close starts: stop reading
	hardCtx    context.Context
	hardCancel context.CancelFunc // cancelled when the drain time is over
	stopWork   chan struct{}      // closed last: ack/nack/heartbeat loops end

	// acked holds the deliveries whose handler succeeded and whose ack is
	// not written yet. A reader writes them ahead of its next read, in the
	// same round trip; the ack loop writes those still there after
	// ackLinger.
	ackMu   sync.Mutex
	acked   []*delivery
	ackWake chan struct{} // poked by the first ack after a take, and when many wait
	nacks   chan *delivery

	readers     sync.WaitGroup
	workers     sync.WaitGroup
	outstanding sync.WaitGroup // deliveries not yet finished

	lastErr atomic.Pointer[error]
	closeMu sync.Mutex
}

// entryKey identifies an entry of a stream.
type entryKey struct{ stream, id string }

// delivery is one handed-out entry.
type delivery struct {
	sub    *subscription
	stream string
	id     string
	// ofRetry: stream is the subscription's retry stream, which only this
	// group reads, so the entry is deleted once acknowledged. A topic
	// that is merely named like a retry stream is not: other groups read
	// it too.
	ofRetry bool
	em      entryMessage
	// msg is the Watermill message: made at once for a Subscribe, and
	// on first use (message) for the Router's.
	msg     *message.Message
	ctx     context.Context // the handler's; cancelled at timeout or hard stop
	attempt int
	cancel  context.CancelFunc
	start   int64        // unix nanos when it was handed out
	beat    atomic.Int64 // unix nanos of the last heartbeat
	done    atomic.Bool
	expired atomic.Bool
	// freed is set once the delivery's window slot is given back: when
	// its handler succeeded (the ack is then written in the next batch)
	// or when it finishes otherwise.
	freed atomic.Bool
	tag   any // the subscription's tag (the Router's route)

	// failure is recorded by the handler wrapper before it nacks.
	failMu  sync.Mutex
	failure error
}

// message returns d's Watermill message, making it for a Router delivery
// on first use (a middleware, a retry, a dead letter). It is not safe for
// concurrent use: the handler's worker and, after it, the nack loop call
// it.
func (d *delivery) message() *message.Message {
	if d.msg == nil {
		d.msg = d.em.message(true)
		d.msg.SetContext(d.ctx)
	}
	return d.msg
}

// fail records why a message is about to be nacked.
func (d *delivery) fail(err error) {
	d.failMu.Lock()
	d.failure = err
	d.failMu.Unlock()
}

func (d *delivery) failureErr() error {
	d.failMu.Lock()
	defer d.failMu.Unlock()
	return d.failure
}

type deliveryKey struct{}

// deliveryFrom returns the delivery of a message handed out by a Subscriber.
func deliveryFrom(ctx context.Context) *delivery {
	d, _ := ctx.Value(deliveryKey{}).(*delivery)
	return d
}

// RecordFailure tells the subscriber why msg is about to be nacked, so the
// retry and the dead letter carry the error and a permanent error skips the
// retries. Handlers registered through the Router never call it themselves.
func RecordFailure(msg *message.Message, err error) {
	if d := deliveryFrom(msg.Context()); d != nil {
		d.fail(err)
	}
}

// NewSubscriber returns a Subscriber. It starts its ack, nack and heartbeat
// loops at once; Subscribe starts reading.
func NewSubscriber(cfg SubscriberConfig) (*Subscriber, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	s := &Subscriber{
		cfg:      cfg,
		log:      cfg.Logger.With("consumer_group", cfg.ConsumerGroup, "consumer", cfg.Consumer),
		slots:    make(chan struct{}, cfg.MaxInFlight),
		freed:    make(chan struct{}, 1),
		inflight: make(map[entryKey]*delivery),
		waiting:  make(map[*readBatch]struct{}),
		unsent:   make(map[entryKey]struct{}),
		closing:  make(chan struct{}),
		stopWork: make(chan struct{}),
		ackWake:  make(chan struct{}, 1),
		nacks:    make(chan *delivery, cfg.MaxInFlight),
	}
	s.hardCtx, s.hardCancel = context.WithCancel(context.Background())
	if m := cfg.Metrics; m != nil {
		g := cfg.ConsumerGroup
		s.mDelivered = m.deliveries.WithLabelValues(g)
		s.mClaimed = m.claims.WithLabelValues(g)
		s.mOutcome = map[outcome]prometheus.Counter{}
		for _, o := range []outcome{outcomeAcked, outcomeRetried, outcomeDeadLettered, outcomeHandedBack} {
			s.mOutcome[o] = m.outcomes.WithLabelValues(g, string(o))
		}
	}
	s.workers.Add(3)
	go s.ackLoop()
	go s.nackLoop()
	go s.heartbeatLoop()
	return s, nil
}

// Err returns the last Redis error seen by the subscriber, or nil once a
// later command succeeded. Readiness checks use it.
func (s *Subscriber) Err() error {
	if p := s.lastErr.Load(); p != nil {
		return *p
	}
	return nil
}

func (s *Subscriber) setErr(err error) {
	if err == nil {
		if s.lastErr.Load() != nil {
			s.lastErr.Store(nil)
		}
		return
	}
	s.lastErr.Store(&err)
}

// subscription is one Subscribe call.
type subscription struct {
	s       *Subscriber
	topic   string
	retry   string   // the group's retry stream of topic
	streams []string // topic and retry, as each read names them
	readIDs []string // streams, then > for each
	// lanes are the read loops of new entries: two, so that one read is
	// under way while the other's reply is parsed and handed out.
	lanes [readLanes]lane
	// capMu makes a lane's capacity check and reservation (reserved) one
	// step.
	capMu   sync.Mutex
	delayed string // the group's retry sorted set of topic
	out     chan *message.Message
	// dout, for a subscription of the bus Router (consume), carries
	// deliveries instead of Watermill messages: the Router reports each
	// outcome directly, so no goroutine waits on Ack/Nack per message.
	// Several subscriptions may share one dout; tag tells them apart.
	dout    chan<- *delivery
	tag     any
	done    func() // called once the subscription stops handing out
	managed bool
	stop    chan struct{} // closed when this subscription must stop reading
	ctx     context.Context
	// base carries ctx's values but not its cancellation: a handler's
	// context ends at hard stop, not when reading stops.
	base    context.Context
	wake    chan struct{} // pokes the retry mover
	cursors map[string]string

	// batches carries what the reader read to the deliverer, so the next
	// read is under way while a batch is handed out.
	batches chan *readBatch
	// queued counts entries read and not yet given a window slot by the
	// deliverer: the reader counts them as taken, so it does not read
	// more than the window has room for.
	queued atomic.Int64
	// reserved is the room the lanes' reads under way asked for.
	reserved atomic.Int64
	// progress is poked when the deliverer finishes a batch.
	progress chan struct{}
}

// readLanes is how many read loops of new entries a subscription runs.
const readLanes = 2

// readBatch is one read's entries on their way to the deliverer. No window
// slot is held for them: each takes one as it is handed out, so a batch
// never waits on slots that a batch behind it holds. Until handed out, its
// entries are kept alive by the heartbeats like those being handled (a
// read of two streams may return up to COUNT entries from each, and the
// routes of one group share a window, so a batch can wait for slots).
type readBatch struct {
	res    []streamEntries
	counts map[string]int64
	keys   []entryKey   // every entry, in the order they are handed out
	next   atomic.Int64 // how many of keys have been handed out
	beat   atomic.Int64 // unix nanos of the read or of the last heartbeat
}

// Subscribe starts reading topic (a stream) as this subscriber's consumer
// group. The channel closes when ctx is cancelled or the subscriber closes;
// messages handed out before keep being acked or nacked until Close.
func (s *Subscriber) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	sub, err := s.start(ctx, topic, false)
	if err != nil {
		return nil, err
	}
	return sub.out, nil
}

// consume is Subscribe for the bus Router: it hands out deliveries, tagged
// with tag, into out (which the Router's workers share), and calls done
// once it stops handing out. The Router reports each outcome with
// complete.
func (s *Subscriber) consume(ctx context.Context, topic string, out chan<- *delivery, tag any, done func()) error {
	_, err := s.start(ctx, topic, true, func(sub *subscription) {
		sub.dout, sub.tag, sub.done = out, tag, done
	})
	return err
}

func (s *Subscriber) start(ctx context.Context, topic string, managed bool, setup ...func(*subscription)) (*subscription, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, errors.New("subscriber closed")
	}
	s.readers.Add(2)
	s.mu.Unlock()

	retry := RetryStream(topic, s.cfg.ConsumerGroup)
	sub := &subscription{
		s:       s,
		topic:   topic,
		retry:   retry,
		streams: []string{topic, retry},
		readIDs: []string{topic, retry, ">", ">"},
		delayed: RetrySet(topic, s.cfg.ConsumerGroup),
		managed: managed,
		stop:    make(chan struct{}),
		ctx:     ctx,
		base:    context.WithoutCancel(ctx),
		wake:    make(chan struct{}, 1),
		cursors: map[string]string{},
		// One batch waits while another is handed out.
		batches:  make(chan *readBatch, 1),
		progress: make(chan struct{}, 1),
	}
	for i := range sub.lanes {
		sub.lanes[i].conn = newReadConn(s.cfg.Client)
	}
	if !managed {
		sub.out = make(chan *message.Message)
	}
	for _, f := range setup {
		f(sub)
	}
	// The groups are created by the read loop, not here: a Redis that is
	// down, or a ctx already cancelled by a shutdown racing the start,
	// must not fail Subscribe, which would stop the whole router (and
	// Watermill's router cannot be closed cleanly once a Subscribe of its
	// RunHandlers failed).
	go func() {
		select {
		case <-ctx.Done():
		case <-s.closing:
		}
		close(sub.stop)
	}()
	go sub.read()
	go sub.moveDue()
	return sub, nil
}

// complete reports the outcome of a delivery handed out by consume: nil
// acks it, an error nacks it (retry or dead letter, by the error).
func (s *Subscriber) complete(d *delivery, err error) {
	if err == nil {
		// The handler is done with it: its slot can take the next entry
		// while the ack waits for its batch. The entry stays in flight
		// (heartbeats, Close) until the ack is written.
		s.freeSlot(d)
		s.queueAcks(d)
		return
	}
	if d.failureErr() == nil {
		d.fail(err)
	}
	// If closed already, the entry stays pending and comes back.
	sendOrStop(s.nacks, d, s.stopWork)
}

// ackLinger is how long the ack loop leaves acks for a reader to write
// with its next read before it writes them itself. A busy reader reads
// far more often; an idle one blocks in its read.
const ackLinger = time.Millisecond

// ackFlushAt is how many waiting acks make the ack loop write them at
// once.
const ackFlushAt = 1000

// queueAcks adds ds to the acks to write. After Close, they are not
// written: their entries stay pending and come back.
func (s *Subscriber) queueAcks(ds ...*delivery) {
	s.ackMu.Lock()
	s.acked = append(s.acked, ds...)
	n := len(s.acked)
	s.ackMu.Unlock()
	if n == len(ds) || n >= ackFlushAt {
		select {
		case s.ackWake <- struct{}{}:
		default:
		}
	}
}

// takeAcks takes the acks waiting to be written.
func (s *Subscriber) takeAcks() []*delivery {
	s.ackMu.Lock()
	defer s.ackMu.Unlock()
	b := s.acked
	if len(b) == 0 {
		return nil
	}
	s.acked = make([]*delivery, 0, cap(b))
	return b
}

func (s *Subscriber) waitingAcks() int {
	s.ackMu.Lock()
	defer s.ackMu.Unlock()
	return len(s.acked)
}

// SubscribeInitialize creates the consumer group on topic (Watermill's
// message.SubscribeInitializer).
func (s *Subscriber) SubscribeInitialize(topic string) error {
	sub := &subscription{s: s, topic: topic, retry: RetryStream(topic, s.cfg.ConsumerGroup)}
	return sub.ensureGroups(context.Background())
}

// ensureGroups creates the group on the stream and on its retry stream,
// starting from the beginning: entries added before the group existed are
// work too.
func (sub *subscription) ensureGroups(ctx context.Context) error {
	for _, stream := range []string{sub.topic, sub.retry} {
		err := sub.s.cfg.Client.XGroupCreateMkStream(ctx, stream, sub.s.cfg.ConsumerGroup, "0").Err()
		if err != nil && !isBusyGroup(err) {
			return fmt.Errorf("create group %s on %s: %w", sub.s.cfg.ConsumerGroup, stream, err)
		}
	}
	return nil
}

// acquire takes one window slot, blocking; ok is false when the
// subscription stops, and waited tells whether it had to wait.
func (sub *subscription) acquire() (ok, waited bool) {
	return sendOrStop(sub.s.slots, struct{}{}, sub.stop)
}

// sendOrStop sends v on out, blocking until it can or stop is closed; sent
// is false when stop came first, and waited tells whether it had to wait.
// The common case, a send that can go at once, takes no full select.
func sendOrStop[T any](out chan<- T, v T, stop <-chan struct{}) (sent, waited bool) {
	select {
	case out <- v:
		return true, false
	default:
	}
	select {
	case out <- v:
		return true, true
	case <-stop:
		return false, true
	}
}

// clockEvery is how many entries in a row the deliverer hands out with
// one reading of the clock, unless it had to wait (for the window, for a
// handler to take one, or for Redis: a dead letter, an ack).
const clockEvery = 32

func (s *Subscriber) release(n int) {
	for i := 0; i < n; i++ {
		<-s.slots
	}
	// Wake a reader waiting in awaitCapacity (one wake-up is enough: it
	// re-checks the free slots).
	select {
	case s.freed <- struct{}{}:
	default:
	}
}

// read is the subscription's loop: its own pending entries first, then new
// entries, with a claim of idle entries every ClaimInterval.
func (sub *subscription) read() {
	s := sub.s
	defer s.readers.Done()

	ctx, cancel := context.WithCancel(context.WithoutCancel(sub.ctx))
	defer cancel()
	go func() {
		<-sub.stop
		cancel()
	}()

	// The deliverer hands out what the reader read, in order; it alone
	// calls deliverAll. When reading stops, it hands out (or, stopping,
	// leaves pending) what is queued, and only then is the output closed.
	delivered := make(chan struct{})
	go func() {
		defer close(delivered)
		for b := range sub.batches {
			sub.deliverAll(ctx, b)
			s.mu.Lock()
			delete(s.waiting, b)
			s.mu.Unlock()
			select {
			case sub.progress <- struct{}{}:
			default:
			}
		}
	}()
	defer func() {
		close(sub.batches)
		<-delivered
		if sub.managed {
			sub.done()
		} else {
			close(sub.out)
		}
	}()

	backoff := newBackoff(50*time.Millisecond, 5*time.Second)
	for !sub.stopped() {
		err := sub.ensureGroups(ctx)
		if err == nil {
			break
		}
		s.setErr(err)
		if !sub.stopped() {
			s.log.Warn("create consumer group; retrying", "stream", sub.topic, "error", err, "retry_in", backoff.peek())
			backoff.sleep(sub.stop)
		}
	}
	backoff.reset()
	// Own pending entries: what this consumer held when it last stopped.
	for !sub.stopped() {
		n, err := sub.readPending(ctx)
		if err == nil && n == 0 {
			break
		}
		if err != nil && !sub.stopped() {
			sub.readError(ctx, err, backoff)
		}
	}
	var lanes sync.WaitGroup
	for i := range sub.lanes {
		lanes.Add(1)
		go func() {
			defer lanes.Done()
			sub.readLoop(ctx, &sub.lanes[i], i == 0)
		}()
	}
	lanes.Wait()
}

// lane is one read loop of new entries, with its own connection.
type lane struct {
	conn *readConn    // nil: reads go through go-redis
	buf  bytes.Buffer // for raw replies read through go-redis
}

// readLoop reads new entries until the subscription stops; the loop that
// claims also claims idle entries every ClaimInterval.
//
// A due claim goes before the next read of either lane: it holds capMu,
// so the other lane reserves no room meanwhile, and waits for window room
// as a read does. Under a backlog the window is always full when a claim
// comes due; a claim that gave way to the reads would wait until the
// backlog is drained, and a dead replica's entries with it. A claim that
// took all the room it had stays due: more idle entries may be waiting,
// and they go first.
func (sub *subscription) readLoop(ctx context.Context, l *lane, claims bool) {
	s := sub.s
	if l.conn != nil {
		defer l.conn.close()
	}
	backoff := newBackoff(50*time.Millisecond, 5*time.Second)
	lastClaim := time.Time{}
	for !sub.stopped() {
		block := s.cfg.BlockTime
		if claims {
			if time.Since(lastClaim) >= s.cfg.ClaimInterval {
				sub.capMu.Lock()
				more, err := sub.claimIdle(ctx)
				sub.capMu.Unlock()
				if !more || err != nil {
					lastClaim = time.Now()
				}
				if err != nil && !sub.stopped() {
					s.log.Warn("claim idle entries", "stream", sub.topic, "error", err)
				}
			}
			if until := time.Until(lastClaim.Add(s.cfg.ClaimInterval)); until < block {
				block = max(until, time.Millisecond)
			}
		}
		// Slots are not held across the blocking read: an idle stream
		// must not sit on window slots that a busy stream of the same
		// group needs. The read asks for what is free now, reserved
		// until its entries are queued instead; entries are given slots
		// as they are handed out.
		sub.capMu.Lock()
		n := sub.awaitCapacity(s.cfg.BatchSize)
		sub.reserved.Add(int64(n))
		sub.capMu.Unlock()
		if n == 0 {
			return
		}
		res, err := sub.readNew(ctx, l, n, block)
		if err == nil {
			sub.handOut(res, nil)
		}
		sub.reserved.Add(-int64(n))
		// The other lane may wait for what this read did not fill.
		select {
		case sub.progress <- struct{}{}:
		default:
		}
		if err != nil {
			if sub.stopped() {
				return
			}
			sub.readError(ctx, err, backoff)
			continue
		}
		s.setErr(nil)
		backoff.reset()
	}
}

// readNew reads new entries of the stream and its retry stream: over the
// subscription's own connection, with the acks waiting so far written
// ahead of the read, or through go-redis. A read that fails on the own
// connection (Redis restarted, a failover) is done again through go-redis,
// which has its own handling of such errors.
func (sub *subscription) readNew(ctx context.Context, l *lane, count int, block time.Duration) ([]streamEntries, error) {
	s := sub.s
	if c := l.conn; c != nil {
		if c.readyLogged(ctx, s.log, "own read connection to Redis could not be set up; reading through the client's pool for now",
			"stream", sub.topic) {
			acked := sortByStream(s.takeAcks())
			written := false
			res, err := c.exchange(ctx, acked, s.cfg.ConsumerGroup, s.cfg.Consumer, sub.readIDs, count, block, func() {
				written = true
				s.setErr(nil)
				for _, d := range acked {
					s.finish(d, outcomeAcked)
				}
			})
			if !written && len(acked) > 0 {
				// Not known to be written: the ack loop writes them (an
				// XACK written twice does no harm).
				s.queueAcks(acked...)
			}
			if err == nil || isNoGroup(err) || ctx.Err() != nil {
				return res, err
			}
		}
	}
	return readNew(ctx, s.cfg.Client, &l.buf, s.cfg.ConsumerGroup, s.cfg.Consumer, sub.streams, count, block)
}

// sortByStream puts the deliveries of each stream together, so that each
// stream's acks make one command.
func sortByStream(ds []*delivery) []*delivery {
	for i := 1; i < len(ds); i++ {
		if ds[i].stream < ds[i-1].stream {
			slices.SortStableFunc(ds, func(a, b *delivery) int { return strings.Compare(a.stream, b.stream) })
			break
		}
	}
	return ds
}

// handOut queues res for the deliverer; its entries count in queued until
// they get their window slots. counts are their delivery counts, if known.
func (sub *subscription) handOut(res []streamEntries, counts map[string]int64) {
	total := 0
	for _, st := range res {
		total += len(st.entries)
	}
	if total == 0 {
		return
	}
	b := &readBatch{res: res, counts: counts, keys: make([]entryKey, 0, total)}
	for _, st := range res {
		for _, e := range st.entries {
			b.keys = append(b.keys, entryKey{st.stream, e.id})
		}
	}
	b.beat.Store(time.Now().UnixNano())
	sub.queued.Add(int64(len(b.keys)))
	s := sub.s
	s.mu.Lock()
	s.waiting[b] = struct{}{}
	s.mu.Unlock()
	sub.batches <- b
}

// free is how many more entries the window and the read-ahead have room
// for: slots neither held nor promised to entries read and waiting for the
// deliverer or to the reads under way.
func (sub *subscription) free() int {
	return sub.claimRoom() + sub.s.readAhead() - int(sub.reserved.Load())
}

// readAhead is how many entries past the window a read may take now
// (ReadAhead).
func (s *Subscriber) readAhead() int {
	if s.cfg.ReadAhead <= 0 {
		return 0 // without reading the clock
	}
	return s.readAheadAt(time.Now().UnixNano())
}

// readAheadAt is readAhead at now (unix nanos). It takes the time so that
// a test can give the pace an exact interval: one that reads the clock
// itself measures a slower pace when the machine pauses it.
func (s *Subscriber) readAheadAt(now int64) int {
	if s.cfg.ReadAhead <= 0 {
		return 0
	}
	perSec := s.pace.rate(now, s.released.Load())
	return min(readLanes*s.cfg.BatchSize, int(perSec*s.cfg.ReadAhead.Seconds()))
}

// claimRoom is what the window has room for, without the lanes'
// reservations and without read-ahead: a claim takes entries another
// replica held for a while, to be handled now.
func (sub *subscription) claimRoom() int {
	s := sub.s
	return cap(s.slots) - len(s.slots) - int(sub.queued.Load())
}

// awaitCapacity waits until window slots are free, without taking them,
// and returns how many entries to read (at most n; 0 when stopping). When
// the window is nearly full, it waits a moment longer (up to 2ms) for half
// of the window to free up, so a saturated consumer reads in batches
// instead of one entry per round trip.
//
// Entries already read and waiting for the deliverer, and the room the
// other lane reserved for its read, count as taken.
func (sub *subscription) awaitCapacity(n int) int {
	return sub.awaitRoom(n, sub.free)
}

// awaitRoom is awaitCapacity with free, the room to wait for, given: free
// for a read, claimRoom for a claim.
func (sub *subscription) awaitRoom(n int, free func() int) int {
	s := sub.s
	for free() < 1 {
		if sub.queued.Load() == 0 && sub.reserved.Load() == 0 {
			// Wait for a slot to free up.
			select {
			case s.slots <- struct{}{}:
				<-s.slots
			case <-sub.stop:
				return 0
			}
			continue
		}
		// The deliverer is handing out entries already read: wait for it,
		// or for a release.
		select {
		case <-sub.progress:
		case <-s.freed:
		case <-sub.stop:
			return 0
		}
	}
	want := min(n, max(1, cap(s.slots)/2))
	if free() < want {
		t := time.NewTimer(2 * time.Millisecond)
		defer t.Stop()
	wait:
		for free() < want {
			select {
			case <-s.freed:
			case <-sub.progress:
			case <-t.C:
				break wait
			case <-sub.stop:
				return 0
			}
		}
	}
	if sub.stopped() {
		// Room may have come free because the subscription stopped (the
		// deliverer gave up what it held): a read now would make Redis
		// hand this consumer entries that Close never hands back.
		return 0
	}
	return min(n, max(1, free()))
}

func (sub *subscription) stopped() bool {
	select {
	case <-sub.stop:
		return true
	default:
		return false
	}
}

// readError handles a failed read: a lost group is re-created, anything else
// is waited out with backoff. Nothing here ends the subscription: Redis
// outages are ridden out.
func (sub *subscription) readError(ctx context.Context, err error, b *backoff) {
	s := sub.s
	s.setErr(err)
	if isNoGroup(err) {
		s.log.Error("consumer group or stream is gone (Redis restarted empty or was flushed?); re-creating it from the start of the stream",
			"stream", sub.topic, "error", err)
		if err := sub.ensureGroups(ctx); err != nil {
			s.log.Error("re-create consumer group", "stream", sub.topic, "error", err)
		}
	} else {
		s.log.Warn("read stream; retrying", "stream", sub.topic, "error", err, "retry_in", b.peek())
	}
	b.sleep(sub.stop)
}

// readPending re-reads this consumer's own pending entries (history read
// with id 0) and hands them out again. It returns how many it found.
func (sub *subscription) readPending(ctx context.Context) (int, error) {
	s := sub.s
	n := sub.awaitCapacity(s.cfg.BatchSize)
	if n == 0 {
		return 0, nil
	}
	start := func(stream string) string {
		if c, ok := sub.cursors["pending:"+stream]; ok {
			return c
		}
		return "0"
	}
	xres, err := s.cfg.Client.XReadGroup(ctx, &redis.XReadGroupArgs{
		Group:    s.cfg.ConsumerGroup,
		Consumer: s.cfg.Consumer,
		Streams:  []string{sub.topic, sub.retry, start(sub.topic), start(sub.retry)},
		Count:    int64(n),
		Block:    -1, // a history read never blocks; -1 leaves BLOCK out
	}).Result()
	if err != nil && !errors.Is(err, redis.Nil) {
		return 0, err
	}
	res := fromXStreams(xres)
	total := 0
	for _, st := range res {
		total += len(st.entries)
	}
	if total == 0 {
		return 0, nil
	}
	counts, err := sub.deliveryCounts(ctx, res)
	if err != nil {
		// The cursors stay where they were: the retry reads these
		// entries again. Past them, they would wait for a claim after
		// ClaimMinIdle.
		return 0, err
	}
	sub.handOut(res, counts)
	for _, st := range res {
		if len(st.entries) > 0 {
			sub.cursors["pending:"+st.stream] = st.entries[len(st.entries)-1].id
		}
	}
	return total, nil
}

// deliveryCounts looks up how often each entry of res was delivered.
func (sub *subscription) deliveryCounts(ctx context.Context, res []streamEntries) (map[string]int64, error) {
	s := sub.s
	counts := map[string]int64{}
	for _, st := range res {
		if len(st.entries) == 0 {
			continue
		}
		pend, err := s.cfg.Client.XPendingExt(ctx, &redis.XPendingExtArgs{
			Stream:   st.stream,
			Group:    s.cfg.ConsumerGroup,
			Start:    st.entries[0].id,
			End:      st.entries[len(st.entries)-1].id,
			Count:    int64(len(st.entries)) * 2,
			Consumer: s.cfg.Consumer,
		}).Result()
		if err != nil {
			return nil, fmt.Errorf("pending of %s: %w", st.stream, err)
		}
		for _, p := range pend {
			counts[st.stream+"\x00"+p.ID] = p.RetryCount
		}
	}
	return counts, nil
}

// claimIdle takes over entries that other (presumably dead) consumers have
// left idle for ClaimMinIdle, on the stream and on the retry stream. more
// reports a claim that took as many entries as it had room for: more may
// be idle.
func (sub *subscription) claimIdle(ctx context.Context) (more bool, err error) {
	for _, stream := range []string{sub.topic, sub.retry} {
		full, err := sub.claimIdleOf(ctx, stream)
		if err != nil {
			return more, err
		}
		more = more || full
	}
	return more, nil
}

// claimIdleOf is claimIdle on one stream. It waits for window room, as a
// read does, and claims as many entries as the window has room for, not
// counting the room a read lane has reserved for its read: on an idle
// stream a lane holds that reservation through its whole blocking read,
// and claims must not wait for it. So a claim and a read may both fill the
// same room; the entries beyond the window then wait for slots, kept alive
// by the heartbeats like any read batch. The caller holds capMu. full
// reports that it claimed all n entries it asked for.
func (sub *subscription) claimIdleOf(ctx context.Context, stream string) (full bool, err error) {
	s := sub.s
	n := sub.awaitRoom(s.cfg.BatchSize, sub.claimRoom)
	if n == 0 {
		return false, nil // stopping
	}
	start := sub.cursors["claim:"+stream]
	if start == "" {
		start = "0-0"
	}
	msgs, next, err := s.cfg.Client.XAutoClaim(ctx, &redis.XAutoClaimArgs{
		Stream:   stream,
		Group:    s.cfg.ConsumerGroup,
		Consumer: s.cfg.Consumer,
		MinIdle:  s.cfg.ClaimMinIdle,
		Start:    start,
		Count:    int64(n),
	}).Result()
	if err != nil {
		if isNoGroup(err) {
			return false, nil // the read loop re-creates the group
		}
		return false, fmt.Errorf("xautoclaim %s: %w", stream, err)
	}
	sub.cursors["claim:"+stream] = next
	if len(msgs) == 0 {
		return false, nil
	}
	s.log.Info("claimed idle entries of another consumer", "stream", stream, "count", len(msgs))
	if s.mClaimed != nil {
		s.mClaimed.Add(float64(len(msgs)))
	}
	res := []streamEntries{{stream: stream, entries: fromXMessages(msgs)}}
	counts, err := sub.deliveryCounts(ctx, res)
	if err != nil {
		// Deliver anyway: the crash-loop guard applies next time.
		s.log.Warn("delivery counts of claimed entries", "stream", stream, "error", err)
	}
	sub.handOut(res, counts)
	return len(msgs) == n, nil
}

// deliverAll hands out the entries of b, each once it has a window slot.
// Entries not handed out (stopping) stay pending, and Close hands them
// back.
func (sub *subscription) deliverAll(ctx context.Context, b *readBatch) {
	queued := len(b.keys)
	defer func() { sub.queued.Add(-int64(queued)) }()
	// The hand-out time, from which HandlerTimeout counts (checked with
	// the heartbeats, so to the second at best): the clock is read once
	// for entries handed out in a row, and again after a wait for the
	// window. On some virtual machines a reading costs more than a tenth
	// of a microsecond, per delivery.
	var now int64
	sinceClock := clockEvery
	for _, st := range b.res {
		for _, e := range st.entries {
			ok, waited := !sub.stopped(), false
			if ok {
				ok, waited = sub.acquire()
			}
			if !ok {
				sub.s.notSent(b.keys[b.next.Load():]...)
				return
			}
			if waited || sinceClock == clockEvery {
				now, sinceClock = time.Now().UnixNano(), 0
			}
			sinceClock++
			queued--
			sub.queued.Add(-1)
			b.next.Add(1)
			if sub.deliverOne(ctx, st.stream, e, b.counts, b.beat.Load(), now) {
				sinceClock = clockEvery // it waited: read the clock again
			}
		}
	}
}

// deliverOne hands out one entry whose window slot is held.
//
// beat is when the entry's idle time in Redis was last reset (its read or
// its batch's heartbeat): the heartbeats go on from there. now is the time
// of the hand-out. It reports whether it had to wait (for a handler to
// take the entry, or for Redis): then now is stale.
func (sub *subscription) deliverOne(ctx context.Context, stream string, e entry, counts map[string]int64, beat, now int64) (waited bool) {
	s := sub.s
	key := entryKey{stream, e.id}
	if e.fields == nil {
		// A pending entry whose data was deleted from the stream: nothing
		// to deliver, only the pending record to drop.
		s.cfg.Client.XAck(ctx, stream, s.cfg.ConsumerGroup, e.id)
		s.release(1)
		return true // a round trip to Redis: read the clock again
	}
	s.mu.Lock()
	if _, dup := s.inflight[key]; dup {
		// Already being worked on here (claimed back from ourselves).
		s.mu.Unlock()
		s.release(1)
		return false
	}
	s.mu.Unlock()

	em, err := parseEntry(e.fields)
	if err != nil {
		sub.deadLetterRaw(ctx, stream, e, err.Error(), 0)
		s.release(1)
		return true // a dead letter is written: read the clock again
	}
	if len(em.payload) > MaxPayloadBytes {
		// No producer of Conveyor's makes such a payload, and no retry
		// makes it smaller: it is dead-lettered before anything decodes
		// or copies it.
		if sub.deadLetterTooLarge(ctx, stream, e.id, &em) == nil {
			s.deadLettered()
		}
		s.release(1)
		return true // a dead letter is written: read the clock again
	}
	if c := deliveryCount(counts, stream, e.id); c > int64(s.cfg.MaxDeliveries) {
		if sub.deadLetter(ctx, stream, e.id, em.message(true), fmt.Sprintf(
			"delivered %d times without being acknowledged: its consumer probably crashes or hangs on it", c),
			attemptOf(&em)) == nil {
			s.deadLettered()
		}
		s.release(1)
		return true // a dead letter is written: read the clock again
	}

	msgCtx, cancel := context.WithCancel(sub.base)
	d := &delivery{sub: sub, stream: stream, id: e.id, ofRetry: stream == sub.retry, em: em, ctx: msgCtx, attempt: attemptOf(&em), cancel: cancel, start: now, tag: sub.tag}
	d.beat.Store(beat)
	var msg *message.Message
	if !sub.managed {
		msg = em.message(false)
		msg.SetContext(context.WithValue(msgCtx, deliveryKey{}, d))
		d.msg = msg
	}

	s.mu.Lock()
	if s.handOutStopped {
		// Close is past its wait for the readers (this one was stuck
		// in a call to Redis): the entry stays pending, and comes back.
		s.mu.Unlock()
		cancel()
		s.release(1)
		return true
	}
	s.inflight[key] = d
	if len(s.unsent) > 0 {
		// Read again (its own pending entries, after a new Subscribe, or
		// claimed back) and handed out now: no longer Close's to hand back.
		delete(s.unsent, key)
	}
	s.outstanding.Add(1)
	s.mu.Unlock()

	var sent bool
	if sub.managed {
		sent, waited = sendOrStop(sub.dout, d, sub.stop)
	} else {
		sent, waited = sendOrStop(sub.out, msg, sub.stop)
	}
	if !sent {
		// Not handed out: it stays pending for this consumer, and Close
		// hands it back.
		s.finish(d, outcomeHandedBack)
		s.notSent(key)
		return true
	}
	if s.mDelivered != nil {
		s.mDelivered.Inc()
	}
	if sub.managed {
		return waited
	}
	go func() {
		select {
		case <-msg.Acked():
			s.complete(d, nil)
		case <-msg.Nacked():
			s.complete(d, errNacked{d})
		case <-s.hardCtx.Done():
			s.finish(d, outcomeHandedBack)
		}
	}()
	return waited
}

// deliveryCount looks up an entry's delivery count in counts (nil after a
// read of new entries, which were delivered once).
func deliveryCount(counts map[string]int64, stream, id string) int64 {
	if counts == nil {
		return 1
	}
	return counts[stream+"\x00"+id]
}

// errNacked carries a Watermill Nack into complete, keeping the failure a
// handler recorded with RecordFailure.
type errNacked struct{ d *delivery }

func (e errNacked) Error() string { return "nacked without a recorded error" }

type outcome string

const (
	outcomeAcked        outcome = "acked"
	outcomeRetried      outcome = "retried"
	outcomeDeadLettered outcome = "dead_lettered"
	outcomeHandedBack   outcome = "handed_back"
)

// finish ends a delivery exactly once.
func (s *Subscriber) finish(d *delivery, o outcome) {
	if !d.done.CompareAndSwap(false, true) {
		return
	}
	s.mu.Lock()
	delete(s.inflight, entryKey{d.stream, d.id})
	s.mu.Unlock()
	d.cancel()
	s.freeSlot(d)
	if c := s.mOutcome[o]; c != nil {
		c.Inc()
	}
	s.outstanding.Done()
}

// freeSlot gives back d's window slot, once.
func (s *Subscriber) freeSlot(d *delivery) {
	if d.freed.CompareAndSwap(false, true) {
		s.released.Add(1)
		s.release(1)
	}
}

// ackLoop writes, in pipelined batches, the acks that no reader took with
// its read within ackLinger, and those a reader could not write.
func (s *Subscriber) ackLoop() {
	defer s.workers.Done()
	t := time.NewTimer(time.Hour)
	t.Stop()
	for {
		select {
		case <-s.ackWake:
		case <-s.stopWork:
			// Acks that arrived before the stop are still written.
			if b := s.takeAcks(); len(b) > 0 {
				s.flushAcks(b)
			}
			return
		}
		t.Reset(ackLinger)
	linger:
		for {
			select {
			case <-t.C:
				break linger
			case <-s.ackWake:
				if s.waitingAcks() >= ackFlushAt {
					t.Stop()
					break linger
				}
			case <-s.stopWork:
				t.Stop()
				break linger
			}
		}
		if b := s.takeAcks(); len(b) > 0 {
			s.flushAcks(b)
		}
	}
}

func (s *Subscriber) flushAcks(batch []*delivery) {
	byStream := map[string][]string{}
	var retries map[string][]string
	for _, d := range batch {
		byStream[d.stream] = append(byStream[d.stream], d.id)
		if d.ofRetry {
			if retries == nil {
				retries = map[string][]string{}
			}
			retries[d.stream] = append(retries[d.stream], d.id)
		}
	}
	b := newBackoff(20*time.Millisecond, 2*time.Second)
	for {
		pipe := s.cfg.Client.Pipeline()
		for stream, ids := range byStream {
			pipe.XAck(context.Background(), stream, s.cfg.ConsumerGroup, ids...)
			if del := retries[stream]; len(del) > 0 {
				// Entries of the group's retry stream belong to this
				// group alone: delete them once done so the retry
				// stream stays small.
				pipe.XDel(context.Background(), stream, del...)
			}
		}
		cmds, err := pipe.Exec(context.Background())
		if err == nil || onlyNoGroup(cmds) {
			s.setErr(nil)
			break
		}
		s.setErr(err)
		if s.hardCtx.Err() != nil {
			s.log.Error("acks could not be written before shutdown; those entries will be delivered again",
				"count", len(batch), "error", err)
			// Counted as handed back: they will be delivered again.
			for _, d := range batch {
				s.finish(d, outcomeHandedBack)
			}
			return
		}
		s.log.Warn("write acks; retrying", "count", len(batch), "error", err)
		b.sleep(nil)
	}
	for _, d := range batch {
		s.finish(d, outcomeAcked)
	}
}

func onlyNoGroup(cmds []redis.Cmder) bool {
	for _, c := range cmds {
		if err := c.Err(); err != nil && !isNoGroup(err) {
			return false
		}
	}
	return true
}

// nackLoop schedules retries and writes dead letters.
func (s *Subscriber) nackLoop() {
	defer s.workers.Done()
	for {
		select {
		case d := <-s.nacks:
			s.handleNack(d)
		case <-s.stopWork:
			return
		}
	}
}

func (s *Subscriber) handleNack(d *delivery) {
	if d.done.Load() {
		// Handed back at a hard stop while its handler still ran: the
		// entry stays pending and is delivered again. A retry or a dead
		// letter written now would decide it for a failure that the stop
		// itself most likely caused.
		return
	}
	failure := d.failureErr()
	if s.hardCtx.Err() != nil && errors.Is(failure, context.Canceled) {
		// Failed because the hard stop cancelled it, not for the event:
		// handed back, not retried (an attempt spent) or dead-lettered.
		s.finish(d, outcomeHandedBack)
		return
	}
	reason := "nacked without a recorded error"
	if failure != nil {
		reason = failure.Error()
	}
	b := newBackoff(20*time.Millisecond, 2*time.Second)
	written := false // the dead letter is, the entry is not acknowledged yet
	for {
		var err error
		var o outcome
		if written {
			err = d.sub.ackDeadLettered(context.Background(), d.stream, d.id)
			o = outcomeDeadLettered
		} else if IsPermanent(failure) || d.attempt >= s.cfg.Retry.MaxAttempts {
			err = d.sub.deadLetter(context.Background(), d.stream, d.id, d.message(), reason, d.attempt)
			written = errors.As(err, new(errUnacked))
			o = outcomeDeadLettered
		} else {
			err = d.sub.scheduleRetry(context.Background(), d, reason)
			o = outcomeRetried
		}
		if err == nil {
			s.finish(d, o)
			return
		}
		s.setErr(err)
		if s.hardCtx.Err() != nil {
			s.log.Error("nack could not be written before shutdown; the entry will be delivered again",
				"stream", d.stream, "entry_id", d.id, "error", err)
			s.finish(d, outcomeHandedBack)
			return
		}
		s.log.Warn("write nack; retrying", "stream", d.stream, "entry_id", d.id, "error", err)
		b.sleep(nil)
	}
}

const maxErrorText = 1000

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// retryScript stores a nacked entry's next attempt in the group's retry
// set (or, due at once, in its retry stream) and acknowledges the entry,
// in one step, and only while the entry is still pending in the group with
// this consumer:
//
//   - a write repeated after an error that hid its success (a lost reply)
//     finds the entry acknowledged and adds no second retry;
//   - a consumer whose entry another consumer claimed (its heartbeat lost
//     it) adds none either: the entry is the other's now, running or done;
//   - if the retry cannot be stored (out of memory, a key of another
//     type), the entry is not acknowledged: it stays pending.
//
// A missing group (NOGROUP: Redis restarted empty, or the group was
// deleted) leaves nothing to do: the read loop re-creates the group.
//
// KEYS[1] = the entry's stream, KEYS[2] = the retry set, or the retry
// stream; ARGV[1] = group, ARGV[2] = entry id, ARGV[3] = '1' to delete the
// entry (it is in the retry stream), ARGV[4] = consumer, ARGV[5] = 'z'
// (then ARGV[6] = score, ARGV[7] = member) or 'x' (then ARGV[6..] = the
// entry's fields). Returns 1 if scheduled, 0 if the entry was not pending
// with the consumer.
//
// Redis Cluster: the stream S, conveyor:{S}:G:delayed and
// conveyor:{S}:G:retry share S's slot as long as S holds no '}' (so no
// hash tag of its own), which stream names (prefix and event type) don't.
var retryScript = redis.NewScript(`
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if type(p) == 'table' and p.err then
  if string.sub(p.err, 1, 7) == 'NOGROUP' then return 0 end
  return p
end
if not p[1] or p[1][2] ~= ARGV[4] then return 0 end
local r
if ARGV[5] == 'z' then
  r = redis.pcall('ZADD', KEYS[2], ARGV[6], ARGV[7])
else
  r = redis.pcall('XADD', KEYS[2], '*', unpack(ARGV, 6))
end
if type(r) == 'table' and r.err then return r end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '1' then redis.call('XDEL', KEYS[1], ARGV[2]) end
return 1
`)

// scheduleRetry stores the entry's next attempt and acks it, in one step
// (retryScript). It is safe to repeat after any error: a repeat whose first
// try was applied finds the entry no longer pending, and adds nothing.
func (sub *subscription) scheduleRetry(ctx context.Context, d *delivery, reason string) error {
	s := sub.s
	now := time.Now()
	msg := d.message()
	md := make(map[string]string, len(msg.Metadata)+3)
	for k, v := range msg.Metadata {
		md[k] = v
	}
	md[MetaAttempt] = strconv.Itoa(d.attempt + 1)
	if md[MetaFirstFailedAt] == "" {
		md[MetaFirstFailedAt] = now.UTC().Format(time.RFC3339Nano)
	}
	md[MetaLastError] = truncate(reason, maxErrorText)
	mdb, err := msgpack.Marshal(md)
	if err != nil {
		return fmt.Errorf("marshal metadata: %w", err)
	}
	fields := []string{
		fieldUUID, msg.UUID,
		fieldMetadata, string(mdb),
		fieldPayload, string(msg.Payload),
		fieldOrigin, d.stream + "/" + d.id,
	}
	del := "0"
	if d.ofRetry {
		del = "1"
	}
	keys := []string{d.stream, sub.delayed}
	args := make([]any, 0, 6+len(fields))
	args = append(args, s.cfg.ConsumerGroup, d.id, del, s.cfg.Consumer)
	delay := s.cfg.Retry.Backoff(d.attempt)
	if delay > 0 {
		member, err := msgpack.Marshal(fields)
		if err != nil {
			return fmt.Errorf("marshal retry: %w", err)
		}
		args = append(args, "z", float64(now.Add(delay).UnixMilli()), member)
	} else {
		keys[1] = sub.retry
		args = append(args, "x")
		for _, f := range fields {
			args = append(args, f)
		}
	}
	done, err := retryScript.Run(ctx, s.cfg.Client, keys, args...).Int()
	if err != nil {
		return fmt.Errorf("schedule retry of %s/%s: %w", d.stream, d.id, err)
	}
	s.setErr(nil)
	if done == 0 {
		s.log.Debug("nacked entry no longer pending; no retry added (an earlier try whose reply was lost wrote it, or another consumer took the entry)",
			"stream", d.stream, "entry_id", d.id, "event_id", d.em.uuid)
		return nil
	}
	s.log.Debug("message will be retried", "stream", sub.topic, "entry_id", d.id, "event_id", d.em.uuid,
		"attempt", d.attempt, "retry_in", delay, "error", reason)
	select {
	case sub.wake <- struct{}{}:
	default:
	}
	return nil
}

// deadLetter moves a decoded message to the group's dead-letter stream and
// acks it.
func (sub *subscription) deadLetter(ctx context.Context, stream, id string, msg *message.Message, reason string, attempts int) error {
	md, _ := msgpack.Marshal(map[string]string(msg.Metadata))
	return sub.writeDeadLetter(ctx, stream, id, []any{
		fieldUUID, msg.UUID,
		fieldMetadata, md,
		fieldPayload, []byte(msg.Payload),
		dlqFirstFailedAt, msg.Metadata.Get(MetaFirstFailedAt),
	}, reason, attempts)
}

// MaxPayloadBytes bounds the payload of an entry that consumers take. An
// entry with a larger one is dead-lettered as permanent, undecoded, with
// only its first truncatedPayloadBytes kept (deadLetterTooLarge).
//
// It is four times the api's limit on JSON bodies (1 MiB), which bounds
// every event it publishes, one or a batch of them: a payload encoded
// again from a body can grow somewhat (an invalid UTF-8 byte decodes to
// the three bytes of U+FFFD), never fourfold. The events the handlers
// publish are smaller still.
const MaxPayloadBytes = 4 << 20

// truncatedPayloadBytes is how much of a payload over MaxPayloadBytes its
// dead letter keeps: enough to tell what the entry was. Whole copies would
// not do: the dead-letter stream's cap counts entries, not bytes.
const truncatedPayloadBytes = 64 << 10

// deadLetterTooLarge moves an entry whose payload is over MaxPayloadBytes
// to the dead letters, keeping its id and metadata and the start of its
// payload, and the payload's size (dlqTruncatedFrom), which makes Replay
// refuse it: the rest of the payload is gone.
func (sub *subscription) deadLetterTooLarge(ctx context.Context, stream, id string, em *entryMessage) error {
	meta := make(map[string]string, len(em.meta)/2)
	for i := 0; i+1 < len(em.meta); i += 2 {
		meta[em.meta[i]] = em.meta[i+1]
	}
	md, _ := msgpack.Marshal(meta)
	return sub.writeDeadLetter(ctx, stream, id, []any{
		fieldUUID, em.uuid,
		fieldMetadata, md,
		fieldPayload, em.payload[:truncatedPayloadBytes],
		dlqFirstFailedAt, em.Get(MetaFirstFailedAt),
		dlqTruncatedFrom, strconv.Itoa(len(em.payload)),
	}, fmt.Sprintf("payload too large: %d bytes, over the limit of %d (bus.MaxPayloadBytes); not decoded, and only its first %d bytes are kept",
		len(em.payload), MaxPayloadBytes, truncatedPayloadBytes), attemptOf(em))
}

// deadLetterRaw moves an entry that could not be decoded, with all its
// fields as they were; but of an entry larger than MaxPayloadBytes, as of
// a payload that large, only the first truncatedPayloadBytes of each field
// are kept.
func (sub *subscription) deadLetterRaw(ctx context.Context, stream string, e entry, reason string, attempts int) {
	values := e.valueMap()
	var truncated []any
	if size := e.size(); size > MaxPayloadBytes {
		for k, v := range values {
			values[k] = v[:min(len(v), truncatedPayloadBytes)]
		}
		truncated = []any{dlqTruncatedFrom, strconv.Itoa(size)}
		reason += fmt.Sprintf("; the entry is too large: %d bytes, over the limit of %d (bus.MaxPayloadBytes), and only the first %d bytes of each field are kept",
			size, MaxPayloadBytes, truncatedPayloadBytes)
	}
	raw := encodeMetadata(values)
	err := sub.writeDeadLetter(ctx, stream, e.id, append([]any{dlqRaw, raw}, truncated...), reason, attempts)
	if err != nil {
		// It stays pending; the claim loop brings it back to try again.
		sub.s.log.Error("dead-letter undecodable entry", "stream", stream, "entry_id", e.id, "error", err)
		return
	}
	sub.s.deadLettered()
}

func (sub *subscription) writeDeadLetter(ctx context.Context, stream, id string, fields []any, reason string, attempts int) error {
	s := sub.s
	origin := stream
	if stream == sub.retry {
		origin = sub.topic
	}
	now := time.Now().UTC().Format(time.RFC3339Nano)
	fields = append(fields,
		dlqStream, origin,
		dlqEntryID, id,
		dlqGroup, s.cfg.ConsumerGroup,
		dlqConsumer, s.cfg.Consumer,
		dlqError, truncate(reason, maxErrorText),
		dlqAttempts, strconv.Itoa(attempts),
		dlqLastFailedAt, now,
	)
	// The entry is acknowledged only once its dead letter is written: in
	// one pipeline, an XACK runs even when the XADD before it is refused
	// (out of memory under maxmemory, a key of another type), and the
	// entry would be in neither place. The dead-letter stream is in
	// another Redis Cluster slot than the entry's stream, so the two
	// cannot be one script either. Instead the letter is written with a
	// marker (deadLetterScript): a write repeated after an error that hid
	// its success (a lost reply), or after the entry came back unacked
	// (a crash between the two), adds no second letter.
	// Only the entry's owner writes its letter: a consumer whose entry
	// another consumer claimed (its heartbeat lost it) leaves the entry to
	// that one, as a nack does (retryScript). This check cannot be one step
	// with the write (another slot), so it narrows the window to a round
	// trip rather than closing it.
	if owned, err := sub.owns(ctx, stream, id); err != nil {
		return fmt.Errorf("dead-letter %s/%s: %w", stream, id, err)
	} else if !owned {
		s.log.Info("entry to dead-letter is no longer pending with this consumer (another consumer took it, or an earlier try acknowledged it); leaving it",
			"stream", stream, "entry_id", id)
		return nil
	}
	dlq := DeadLetterStream(s.cfg.ConsumerGroup)
	marker, withMarker := deadLetterMarker(s.cfg.ConsumerGroup, stream, id)
	var err error
	if withMarker {
		args := make([]any, 0, 2+len(fields))
		args = append(args, deadLetterMarkerTTL.Milliseconds(), s.cfg.DeadLetterMaxLen)
		args = append(args, fields...)
		var n int
		n, err = deadLetterScript.Run(ctx, s.cfg.Client, []string{marker, dlq}, args...).Int()
		if err == nil && n == 0 {
			s.log.Info("dead letter was written already (by an earlier try whose reply was lost, or before the entry came back); acknowledging it",
				"stream", stream, "entry_id", id)
		}
	} else {
		err = s.cfg.Client.XAdd(ctx, &redis.XAddArgs{
			Stream: dlq,
			MaxLen: s.cfg.DeadLetterMaxLen,
			Approx: true,
			Values: fields,
		}).Err()
	}
	if err != nil {
		return fmt.Errorf("dead-letter %s/%s: %w", stream, id, err)
	}
	// A few quick tries: an entry left pending is dead-lettered again when
	// it comes back (a raw one, or one past MaxDeliveries).
	ackErr := sub.ackDeadLettered(ctx, stream, id)
	for wait := 50 * time.Millisecond; ackErr != nil && wait <= 200*time.Millisecond; wait *= 2 {
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return errUnacked{fmt.Errorf("dead-letter %s/%s: written, but not acknowledged: %w", stream, id, errors.Join(ackErr, ctx.Err()))}
		}
		ackErr = sub.ackDeadLettered(ctx, stream, id)
	}
	if ackErr != nil {
		return errUnacked{fmt.Errorf("dead-letter %s/%s: written, but not acknowledged: %w", stream, id, ackErr)}
	}
	if withMarker {
		// Acknowledged: the entry cannot come back, and its marker has
		// done its work. Left to its TTL, markers would add up to the
		// dead-letter rate times a day, whatever the stream's cap.
		if err := s.cfg.Client.Del(ctx, marker).Err(); err != nil {
			s.log.Warn("remove dead letter's marker (it expires in a day)", "stream", stream, "entry_id", id, "error", err)
		}
	}
	s.log.Error("message dead-lettered", "stream", origin, "entry_id", id, "attempts", attempts, "error", reason)
	return nil
}

// deadLetterScript appends a dead letter unless its marker is set, and sets
// the marker in the same step. A refused append removes the marker again,
// so a marker always means the letter was written.
// KEYS[1] = marker, KEYS[2] = dead-letter stream; ARGV[1] = marker TTL
// (ms), ARGV[2] = MAXLEN (approximate), ARGV[3..] = fields.
// Returns 1 if written, 0 if the marker was set (written before).
var deadLetterScript = redis.NewScript(`
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  local r = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
  if type(r) == 'table' and r.err then
    redis.call('DEL', KEYS[1])
    return r
  end
  return 1
end
return 0`)

// deadLetterMarkerTTL is how long a dead letter's marker is kept: far
// longer than an entry left unacknowledged takes to come back (claimed
// after ClaimMinIdle, or re-read when its consumer restarts).
const deadLetterMarkerTTL = 24 * time.Hour

// deadLetterMarker names the marker of the dead letter of entry id of
// stream: a key in the hash slot of the group's dead-letter stream, so
// that one script checks it and appends the letter in Redis Cluster too.
// ok is false for a group name that leaves no such name (a '}' that forms
// no hash tag): its letters are written without a marker.
func deadLetterMarker(group, stream, id string) (string, bool) {
	tag := hashTag(DeadLetterStream(group))
	if strings.IndexByte(tag, '}') >= 0 {
		return "", false
	}
	return "conveyor:{" + tag + "}:dlq-written:" + stream + "/" + id, true
}

// hashTag returns what Redis Cluster hashes of key: the text between its
// first '{' and the first '}' after it, if not empty, else the whole key.
func hashTag(key string) string {
	if i := strings.IndexByte(key, '{'); i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			return key[i+1 : i+1+j]
		}
	}
	return key
}

// ackDeadLettered acknowledges an entry whose dead letter is written (and
// deletes it from the retry stream, where nothing else reads it).
func (sub *subscription) ackDeadLettered(ctx context.Context, stream, id string) error {
	pipe := sub.s.cfg.Client.Pipeline()
	pipe.XAck(ctx, stream, sub.s.cfg.ConsumerGroup, id)
	if stream == sub.retry {
		pipe.XDel(ctx, stream, id)
	}
	cmds, err := pipe.Exec(ctx)
	if err != nil && onlyNoGroup(cmds) {
		// The group is gone, and the entry's pending record with it.
		return nil
	}
	return err
}

// owns reports whether entry id of stream is pending with this consumer.
// With the group gone (NOGROUP) there is no owner, and it reports true:
// the letter is written, and the acknowledgement finds nothing to do.
func (sub *subscription) owns(ctx context.Context, stream, id string) (bool, error) {
	p, err := sub.s.cfg.Client.XPendingExt(ctx, &redis.XPendingExtArgs{
		Stream: stream, Group: sub.s.cfg.ConsumerGroup, Start: id, End: id, Count: 1,
	}).Result()
	if isNoGroup(err) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("xpending: %w", err)
	}
	return len(p) == 1 && p[0].Consumer == sub.s.cfg.Consumer, nil
}

// errUnacked is a dead letter written whose entry was not acknowledged:
// only the acknowledgement is left to retry.
type errUnacked struct{ error }

func (e errUnacked) Unwrap() error { return e.error }

// moveDueScript moves due members of a retry (or delay) set into a stream,
// atomically, so that with several replicas each is moved exactly once. A
// member that is not an event's fields (msgpack of an even, non-empty list
// that XADD takes) is set aside in a list, KEYS[3]: left in place, as the
// earliest due it would stop every member behind it for good.
// KEYS[1] = sorted set, KEYS[2] = stream, KEYS[3] = list of unreadable
// members; ARGV[1] = now (ms), ARGV[2] = limit.
// Returns {moved, next due score or -1, set aside}.
var moveDueScript = redis.NewScript(`
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local moved, bad = 0, 0
for _, m in ipairs(due) do
  local ok, f = pcall(cmsgpack.unpack, m)
  local added = false
  -- unpack takes at most about 8,000 values: a longer list would abort
  -- the script, as the first of the due members, on every run.
  if ok and type(f) == 'table' and #f > 0 and #f % 2 == 0 and #f <= 7998 then
    local r = redis.pcall('XADD', KEYS[2], '*', unpack(f))
    added = not (type(r) == 'table' and r.err)
  end
  if added then
    moved = moved + 1
  else
    redis.call('RPUSH', KEYS[3], m)
    bad = bad + 1
  end
  redis.call('ZREM', KEYS[1], m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if nxt[2] then return {moved, nxt[2], bad} end
return {moved, '-1', bad}
`)

// Moved is what one move of due members of a retry or delay set did.
type Moved struct {
	// N members were appended to the stream.
	N int
	// Next is when the next member is due (zero if none is left).
	Next time.Time
	// SetAside members were not events: they are in the list UnreadableKey
	// names, for an operator to look at (LRANGE), and the members behind
	// them were moved.
	SetAside int
}

// UnreadableKey is the list where the members of a retry or delay set that
// are not events are set aside.
func UnreadableKey(set string) string { return set + ":unreadable" }

// moveDueTo runs moveDueScript once.
func moveDueTo(ctx context.Context, rdb redis.Scripter, set, stream string, limit int) (Moved, error) {
	res, err := moveDueScript.Run(ctx, rdb, []string{set, stream, UnreadableKey(set)}, time.Now().UnixMilli(), limit).Slice()
	if err != nil {
		return Moved{}, err
	}
	var m Moved
	n, _ := res[0].(int64)
	aside, _ := res[2].(int64)
	m.N, m.SetAside = int(n), int(aside)
	if s, ok := res[1].(string); ok && s != "-1" {
		if f, err := strconv.ParseFloat(s, 64); err == nil {
			m.Next = time.UnixMilli(int64(f))
		}
	}
	return m, nil
}

// moveDue moves this group's due retries of the topic into its retry
// stream. It sleeps until the next is due (at most a second, so retries
// scheduled by other replicas are seen), or until woken by a new retry.
func (sub *subscription) moveDue() {
	s := sub.s
	defer s.readers.Done()
	b := newBackoff(100*time.Millisecond, 5*time.Second)
	for {
		wait := time.Second
		m, err := moveDueTo(context.Background(), s.cfg.Client, sub.delayed, sub.retry, 500)
		if m.SetAside > 0 {
			s.log.Error("retries that are not events were set aside", "consumer_group", s.cfg.ConsumerGroup,
				"count", m.SetAside, "list", UnreadableKey(sub.delayed))
		}
		switch {
		case err != nil:
			s.setErr(err)
			wait = b.next()
		case m.N+m.SetAside == 500:
			wait = 0
		case !m.Next.IsZero():
			b.reset()
			wait = min(max(time.Until(m.Next), time.Millisecond), time.Second)
		}
		t := time.NewTimer(wait)
		select {
		case <-sub.stop:
			t.Stop()
			return
		case <-sub.wake:
			t.Stop()
		case <-t.C:
		}
	}
}

// idleScript sets the idle time of the entries this consumer still owns,
// and returns how many it owns. An entry another consumer already took is
// left alone. JUSTID leaves the delivery counts as they are. The heartbeat
// sets 0, so that no other replica claims a job that is merely slow; Close
// sets ClaimMinIdle on the entries it hands back, so that the next claim
// of another replica takes them.
// KEYS[1] = stream; ARGV[1] = group, ARGV[2] = consumer, ARGV[3] = idle
// time in milliseconds, ARGV[4..] = ids.
var idleScript = redis.NewScript(`
local kept = 0
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
    kept = kept + 1
  end
end
return kept
`)

func (s *Subscriber) heartbeatLoop() {
	defer s.workers.Done()
	t := time.NewTicker(s.cfg.HeartbeatInterval / 2)
	defer t.Stop()
	for {
		select {
		case <-s.stopWork:
			return
		case <-t.C:
			s.heartbeat()
		}
	}
}

func (s *Subscriber) heartbeat() {
	now := time.Now()
	cutoff := now.Add(-s.cfg.HeartbeatInterval).UnixNano()
	deadline := now.Add(-s.cfg.HandlerTimeout).UnixNano()
	byStream := map[string][]*delivery{}
	var expired []*delivery
	s.mu.Lock()
	for _, d := range s.inflight {
		if d.beat.Load() < cutoff {
			byStream[d.stream] = append(byStream[d.stream], d)
		}
		// A delivery acked by its handler (its slot freed, its ack
		// waiting for the next write) has nothing left to time out.
		if s.cfg.HandlerTimeout > 0 && d.start < deadline && !d.expired.Load() && !d.freed.Load() {
			expired = append(expired, d)
		}
	}
	var stale []*readBatch
	for b := range s.waiting {
		if b.beat.Load() < cutoff {
			stale = append(stale, b)
		}
	}
	s.mu.Unlock()
	s.beatWaiting(stale)
	for _, d := range expired {
		d.expired.Store(true)
		d.cancel()
		s.log.Warn("handler timed out; its context is cancelled", "stream", d.stream, "entry_id", d.id,
			"event_id", d.em.uuid, "timeout", s.cfg.HandlerTimeout)
	}
	for stream, ds := range byStream {
		ids := make([]string, len(ds))
		for i, d := range ds {
			ids[i] = d.id
		}
		kept, err := s.keepAlive(stream, ids)
		if err != nil {
			s.log.Warn("heartbeat of in-flight entries", "stream", stream, "error", err)
			continue
		}
		now := time.Now().UnixNano()
		for _, d := range ds {
			d.beat.Store(now)
		}
		if kept < len(ds) {
			s.log.Warn("in-flight entries were claimed by another consumer while still being worked on; raise ClaimMinIdle if this repeats",
				"stream", stream, "lost", len(ds)-kept)
		}
	}
}

// keepAlive resets the idle time of those of ids on stream that this
// consumer still holds, and returns how many it holds.
func (s *Subscriber) keepAlive(stream string, ids []string) (int, error) {
	return s.setIdle(context.Background(), stream, ids, 0)
}

// setIdle sets the idle time of those of ids on stream that this consumer
// still holds, and returns how many it holds.
func (s *Subscriber) setIdle(ctx context.Context, stream string, ids []string, idle time.Duration) (int, error) {
	args := make([]any, 0, len(ids)+3)
	args = append(args, s.cfg.ConsumerGroup, s.cfg.Consumer, idle.Milliseconds())
	for _, id := range ids {
		args = append(args, id)
	}
	return idleScript.Run(ctx, s.cfg.Client, []string{stream}, args...).Int()
}

// notSent records entries that were read and will not be handed out: their
// subscription stopped first. An entry being handled here all the same (read
// twice: by a stopped subscription and by a new one of the same topic, or
// claimed back from this consumer) is not recorded: its handler has it.
func (s *Subscriber) notSent(keys ...entryKey) {
	if len(keys) == 0 {
		return
	}
	s.mu.Lock()
	for _, k := range keys {
		if _, busy := s.inflight[k]; !busy {
			s.unsent[k] = struct{}{}
		}
	}
	s.mu.Unlock()
}

// handBack makes the entries that were read and never handed out
// claimable at once by the other consumers of the group, rather than after
// ClaimMinIdle: it sets their idle time to ClaimMinIdle. No handler has
// seen them, so no other may still be at work on them. A restart under the
// same consumer name reads them anyway; a replica that stops for good (a
// scale-down, a rolling update with new names) would otherwise leave them
// waiting up to ClaimMinIdle plus ClaimInterval. Entries whose handler was
// still running at the drain timeout are not handed back early: their
// handler may not have stopped yet. It runs after the heartbeats stopped,
// which would reset the idle time.
func (s *Subscriber) handBack() {
	s.mu.Lock()
	byStream := map[string][]string{}
	for k := range s.unsent {
		byStream[k.stream] = append(byStream[k.stream], k.id)
	}
	clear(s.unsent)
	s.mu.Unlock()
	if len(byStream) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), handBackTimeout)
	defer cancel()
	for stream, ids := range byStream {
		n := 0
		for chunk := range slices.Chunk(ids, handBackChunk) {
			kept, err := s.setIdle(ctx, stream, chunk, s.cfg.ClaimMinIdle)
			if err != nil {
				s.log.Warn("hand back entries read but not handed out; other replicas claim them after ClaimMinIdle",
					"stream", stream, "count", len(ids)-n, "error", err)
				break
			}
			n += kept
		}
		if n > 0 {
			s.log.Info("handed back entries read but not handed out; other replicas claim them now",
				"stream", stream, "count", n)
		}
	}
}

// handBackTimeout bounds the hand-back at Close: a Redis that does not
// answer must not hold up a shutdown. The entries then come back after
// ClaimMinIdle, as after a crash.
const handBackTimeout = 2 * time.Second

// handBackChunk bounds the entries of one script call, which blocks Redis
// while it runs.
const handBackChunk = 500

// beatWaiting resets the idle time of the entries of batches that are
// read but not yet handed out (those handed out meanwhile are beaten with
// them, which does no harm).
func (s *Subscriber) beatWaiting(batches []*readBatch) {
	if len(batches) == 0 {
		return
	}
	byStream := map[string][]string{}
	for _, b := range batches {
		for _, k := range b.keys[b.next.Load():] {
			byStream[k.stream] = append(byStream[k.stream], k.id)
		}
	}
	failed := false
	for stream, ids := range byStream {
		if _, err := s.keepAlive(stream, ids); err != nil {
			s.log.Warn("heartbeat of entries waiting to be handed out", "stream", stream, "error", err)
			failed = true
		}
	}
	if !failed {
		now := time.Now().UnixNano()
		for _, b := range batches {
			b.beat.Store(now)
		}
	}
}

// Close stops reading, waits up to DrainTimeout for handed-out messages to
// be acked or nacked, hands back the rest, flushes every ack, and returns.
// The entries it read and never handed out it makes claimable by the other
// consumers at once (handBack). It does not close the Redis client. Close
// is safe to call more than once.
//
// DrainTimeout counts from the call: a reader still waiting for a Redis
// that stopped answering (a read through go-redis waits up to BlockTime
// plus 10s; one over the own connection is cut short at once) is waited
// for no longer than that, so a Close takes about DrainTimeout at most,
// plus the time the ack and nack loops' last writes and handBack take to
// fail against such a Redis (the client's timeouts).
func (s *Subscriber) Close() error {
	s.closeMu.Lock()
	defer s.closeMu.Unlock()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()

	close(s.closing)
	t := time.NewTimer(s.cfg.DrainTimeout)
	defer t.Stop()
	readersDone := make(chan struct{})
	go func() {
		s.readers.Wait()
		close(readersDone)
	}()
	// drained may only wait once nothing more can be handed out (a
	// WaitGroup's Add must not race its Wait): the readers are done, or
	// handOutStopped is set.
	drain := func() <-chan struct{} {
		drained := make(chan struct{})
		go func() {
			s.outstanding.Wait()
			close(drained)
		}()
		return drained
	}
	var drained <-chan struct{}
	select {
	case <-readersDone:
		drained = drain()
		select {
		case <-drained:
		case <-t.C:
			s.mu.Lock()
			n := len(s.inflight)
			s.mu.Unlock()
			s.log.Warn("drain timeout: handing back messages still being worked on", "count", n)
		}
	case <-t.C:
		s.log.Warn("drain timeout: a reader is still waiting for Redis; handing back messages still being worked on")
	}
	s.mu.Lock()
	s.handOutStopped = true
	s.mu.Unlock()
	// Cancels the contexts of handlers still running and hands their
	// entries back; acks and nacks received until now are flushed first by
	// the loops, which finish their current batch.
	s.hardCancel()
	s.mu.Lock()
	held := make([]*delivery, 0, len(s.inflight))
	for _, d := range s.inflight {
		held = append(held, d)
	}
	s.mu.Unlock()
	for _, d := range held {
		d.cancel()
		if d.sub.managed {
			// No goroutine waits on these: hand them back here. A late
			// outcome of the handler is still acked if the loops run.
			s.finish(d, outcomeHandedBack)
		}
	}
	if drained == nil {
		drained = drain()
	}
	<-drained
	close(s.stopWork)
	s.workers.Wait()
	s.handBack()
	return nil
}

// backoff is a small exponential backoff for retrying Redis commands.
type backoff struct {
	min, max, cur time.Duration
}

func newBackoff(minD, maxD time.Duration) *backoff { return &backoff{min: minD, max: maxD, cur: minD} }

func (b *backoff) reset()              { b.cur = b.min }
func (b *backoff) peek() time.Duration { return b.cur }

func (b *backoff) next() time.Duration {
	d := b.cur
	b.cur = min(b.cur*2, b.max)
	return d
}

// sleep waits for the next backoff step or until stop closes.
func (b *backoff) sleep(stop <-chan struct{}) {
	t := time.NewTimer(b.next())
	defer t.Stop()
	select {
	case <-t.C:
	case <-stop:
	}
}
