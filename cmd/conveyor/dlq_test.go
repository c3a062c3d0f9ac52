package main_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/embedded"
	"github.com/conveyor/conveyor/internal/harness"
	"github.com/conveyor/conveyor/internal/testenv"
)

// conveyor runs `conveyor <args...>` with env and returns its stdout, its
// stderr and its exit status.
func conveyor(t *testing.T, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), harness.Binary(t), args...)
	for _, k := range []string{"PATH", "HOME", "TMPDIR"} {
		if v, ok := os.LookupEnv(k); ok {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		code = exit.ExitCode()
	case err != nil:
		t.Fatalf("conveyor %v: %v", args, err)
	}
	return out.String(), errOut.String(), code
}

// deadLetters is a Redis holding real dead letters, written by a real
// handler: two in group email-sender, one in document-processor.
type deadLetters struct {
	env  []string
	rdb  *redis.Client
	snap map[string][]redis.XMessage // by group
}

var dlqGroups = []string{"document-processor", "email-sender"}

func startDeadLetters(t *testing.T) *deadLetters {
	t.Helper()
	r := testenv.StartRedis(t, embedded.RedisConfig{Dir: t.TempDir()})
	d := &deadLetters{env: []string{"REDIS_URL=" + r.URL()}, rdb: redis.NewClient(&redis.Options{Addr: r.Addr()})}
	t.Cleanup(func() { _ = d.rdb.Close() })
	h := harness.Start(t, "handler", append([]string{"BLOB_DIR=" + t.TempDir(), "OUTBOX_DIR=" + t.TempDir(),
		"CONSUMER_NAME=handler-1"}, d.env...), "handler")
	h.WaitReady(t, time.Minute)
	ctx := t.Context()
	// Entries no handler can decode are dead-lettered at once.
	for _, e := range []struct{ stream, v string }{
		{"email.requested", "a"}, {"email.requested", "b"}, {"document.uploaded", "c"},
	} {
		if err := d.rdb.XAdd(ctx, &redis.XAddArgs{Stream: e.stream, Values: []any{"garbage", e.v}}).Err(); err != nil {
			t.Fatal(err)
		}
	}
	want := map[string]int64{"document-processor": 1, "email-sender": 2}
	deadline := time.Now().Add(time.Minute)
	for g, n := range want {
		for d.count(t, g) != n {
			if time.Now().After(deadline) {
				t.Fatalf("group %s holds %d dead letters, want %d", g, d.count(t, g), n)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// Stopped, the handler does not take back what is replayed.
	if err := h.Stop(time.Minute); err != nil {
		t.Fatalf("stop handler: %v", err)
	}
	d.snap = map[string][]redis.XMessage{}
	for _, g := range dlqGroups {
		xs, err := d.rdb.XRange(ctx, bus.DeadLetterStream(g), "-", "+").Result()
		if err != nil {
			t.Fatal(err)
		}
		d.snap[g] = xs
	}
	return d
}

func (d *deadLetters) count(t *testing.T, group string) int64 {
	t.Helper()
	n, err := d.rdb.XLen(t.Context(), bus.DeadLetterStream(group)).Result()
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func (d *deadLetters) retries(t *testing.T, stream, group string) int64 {
	t.Helper()
	n, err := d.rdb.XLen(t.Context(), bus.RetryStream(stream, group)).Result()
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// reset puts back the dead letters as the handler wrote them, under their
// ids, and removes what a replay added.
func (d *deadLetters) reset(t *testing.T) {
	t.Helper()
	ctx := t.Context()
	keys := []string{bus.DeadLetterStream("document-processor"), bus.DeadLetterStream("email-sender"),
		bus.RetryStream("document.uploaded", "document-processor"), bus.RetryStream("email.requested", "email-sender")}
	// A replay marks each letter it put back (the letters come back under
	// the same ids here, which the pipeline never does).
	replayed, err := d.rdb.Keys(ctx, "conveyor:{*}:*:replayed:*").Result()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.rdb.Del(ctx, append(keys, replayed...)...).Err(); err != nil {
		t.Fatal(err)
	}
	for g, xs := range d.snap {
		for _, x := range xs {
			if err := d.rdb.XAdd(ctx, &redis.XAddArgs{Stream: bus.DeadLetterStream(g), ID: x.ID, Values: x.Values}).Err(); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func (d *deadLetters) ids(group string) []string {
	var out []string
	for _, x := range d.snap[group] {
		out = append(out, x.ID)
	}
	return out
}

// Every form of the README's `dlq list`, with flags after the verb, before
// it or both, lists exactly the dead letters asked for.
func TestDLQListTakesFlagsAnywhere(t *testing.T) {
	t.Parallel()
	d := startDeadLetters(t)
	for _, tc := range []struct {
		args  []string
		want  []string // ids, in order
		group string   // "" for any
	}{
		{[]string{"dlq", "list", "--group", "email-sender", "--json"}, d.ids("email-sender"), "email-sender"},
		{[]string{"dlq", "--group", "email-sender", "list", "--json"}, d.ids("email-sender"), "email-sender"},
		{[]string{"dlq", "--json", "--group=email-sender", "list"}, d.ids("email-sender"), "email-sender"},
		{[]string{"dlq", "list", "--json", "--group", "document-processor"}, d.ids("document-processor"), "document-processor"},
		{[]string{"dlq", "list", "--limit", "1", "--json", "--group", "email-sender"}, d.ids("email-sender")[:1], "email-sender"},
		{[]string{"dlq", "list", "--json"}, append(d.ids("document-processor"), d.ids("email-sender")...), ""},
	} {
		stdout, stderr, code := conveyor(t, d.env, tc.args...)
		var got []bus.DeadLetter
		if code != 0 || json.Unmarshal([]byte(stdout), &got) != nil {
			t.Errorf("conveyor %s: exit %d, not a JSON list:\n%s%s", strings.Join(tc.args, " "), code, stdout, stderr)
			continue
		}
		var ids []string
		for _, dl := range got {
			ids = append(ids, dl.ID)
			if tc.group != "" && dl.Group != tc.group {
				t.Errorf("conveyor %s lists a dead letter of %s", strings.Join(tc.args, " "), dl.Group)
			}
		}
		if !slices.Equal(ids, tc.want) {
			t.Errorf("conveyor %s lists %v, want %v", strings.Join(tc.args, " "), ids, tc.want)
		}
	}
	// The README's plain form: a table of every group.
	stdout, stderr, code := conveyor(t, d.env, "dlq", "list")
	if code != 0 || !strings.Contains(stdout, "email-sender") || !strings.Contains(stdout, "document-processor") {
		t.Errorf("conveyor dlq list: exit %d\n%s%s", code, stdout, stderr)
	}
}

// `dlq show` prints the one dead letter asked for, whether --group comes
// before the verb, after it, or after the id, and after a "--" an id may
// look like a flag.
func TestDLQShowTakesFlagsAnywhere(t *testing.T) {
	t.Parallel()
	d := startDeadLetters(t)
	id := d.ids("email-sender")[1]
	entry, _ := d.snap["email-sender"][1].Values["dlq_entry_id"].(string)
	for _, args := range [][]string{
		{"dlq", "show", "--group", "email-sender", id},
		{"dlq", "show", id, "--group", "email-sender"},
		{"dlq", "--group", "email-sender", "show", id},
		{"dlq", "show", "--group=email-sender", "--", id},
	} {
		stdout, stderr, code := conveyor(t, d.env, args...)
		if code != 0 {
			t.Errorf("conveyor %s: exit %d\n%s", strings.Join(args, " "), code, stderr)
			continue
		}
		dec := json.NewDecoder(strings.NewReader(stdout))
		var got bus.DeadLetter
		if err := dec.Decode(&got); err != nil {
			t.Errorf("conveyor %s: %v\n%s", strings.Join(args, " "), err, stdout)
			continue
		}
		if got.ID != id || got.Group != "email-sender" || got.Stream != "email.requested" ||
			got.EntryID != entry || got.Raw["garbage"] == "" {
			t.Errorf("conveyor %s shows %+v, want %s of email-sender", strings.Join(args, " "), got, id)
		}
		if err := dec.Decode(&struct{}{}); !errors.Is(err, io.EOF) {
			t.Errorf("conveyor %s prints more than one dead letter:\n%s", strings.Join(args, " "), stdout)
		}
	}
	// After "--", "--all" is an id, not the flag (and not a valid one).
	_, stderr, code := conveyor(t, d.env, "dlq", "show", "--group", "email-sender", "--", "--all")
	if code != 2 || !strings.Contains(stderr, `not a dead-letter id (want milliseconds-sequence, as dlq list prints it): "--all"`) {
		t.Errorf("conveyor dlq show --group email-sender -- --all: exit %d\n%s", code, stderr)
	}
}

// `dlq replay --group G --all` in every order replays the dead letters of
// G only, onto G's retry stream; `dlq purge --group G ID` deletes that one.
func TestDLQReplayAndPurgeTakeFlagsAnywhere(t *testing.T) {
	t.Parallel()
	d := startDeadLetters(t)
	for _, args := range [][]string{
		{"dlq", "replay", "--group", "email-sender", "--all"},
		{"dlq", "--group", "email-sender", "replay", "--all"},
		{"dlq", "--all", "replay", "--group", "email-sender"},
		{"dlq", "--group=email-sender", "--all", "replay"},
	} {
		d.reset(t)
		stdout, stderr, code := conveyor(t, d.env, args...)
		if code != 0 || strings.TrimSpace(stdout) != "replayed 2 dead letter(s) of email-sender" {
			t.Errorf("conveyor %s: exit %d\n%s%s", strings.Join(args, " "), code, stdout, stderr)
		}
		if n := d.count(t, "email-sender"); n != 0 {
			t.Errorf("conveyor %s: email-sender still holds %d dead letters", strings.Join(args, " "), n)
		}
		if n := d.retries(t, "email.requested", "email-sender"); n != 2 {
			t.Errorf("conveyor %s: %d entries on email-sender's retry stream, want 2", strings.Join(args, " "), n)
		}
		if n, r := d.count(t, "document-processor"), d.retries(t, "document.uploaded", "document-processor"); n != 1 || r != 0 {
			t.Errorf("conveyor %s: document-processor holds %d dead letters (want 1) and %d retries (want 0)", strings.Join(args, " "), n, r)
		}
	}
	id := d.ids("email-sender")[0]
	for _, args := range [][]string{
		{"dlq", "purge", "--group", "email-sender", id},
		{"dlq", "purge", id, "--group", "email-sender"},
	} {
		d.reset(t)
		stdout, stderr, code := conveyor(t, d.env, args...)
		if code != 0 || strings.TrimSpace(stdout) != "purged 1 dead letter(s) of email-sender" {
			t.Errorf("conveyor %s: exit %d\n%s%s", strings.Join(args, " "), code, stdout, stderr)
		}
		left, err := d.rdb.XRange(t.Context(), bus.DeadLetterStream("email-sender"), "-", "+").Result()
		if err != nil {
			t.Fatal(err)
		}
		if len(left) != 1 || left[0].ID != d.ids("email-sender")[1] || d.count(t, "document-processor") != 1 {
			t.Errorf("conveyor %s left %v in email-sender", strings.Join(args, " "), left)
		}
	}
}

// An unknown flag is an error wherever it is (exit 2, with the usage, and
// nothing done); --help after the verb prints the usage; a command without
// positional arguments refuses one instead of ignoring the flags after it.
func TestCommandFlagErrorsAnywhere(t *testing.T) {
	t.Parallel()
	d := startDeadLetters(t)
	for _, args := range [][]string{
		{"dlq", "list", "--bogus"},
		{"dlq", "replay", "--group", "email-sender", "--all", "--bogus"},
		{"dlq", "replay", "--group", "email-sender", "--bogus", "--all"},
	} {
		stdout, stderr, code := conveyor(t, d.env, args...)
		if code != 2 || stdout != "" || !strings.Contains(stderr, "flag provided but not defined: -bogus") ||
			!strings.Contains(stderr, "conveyor dlq replay  --group G") {
			t.Errorf("conveyor %s: exit %d\n%s%s", strings.Join(args, " "), code, stdout, stderr)
		}
	}
	// A flag left without its value, last, is an error too.
	for _, args := range [][]string{{"dlq", "list", "--group"}, {"dlq", "replay", "--all", "--group"}} {
		stdout, stderr, code := conveyor(t, d.env, args...)
		if code != 2 || stdout != "" || !strings.Contains(stderr, "flag needs an argument: -group") {
			t.Errorf("conveyor %s: exit %d\n%s%s", strings.Join(args, " "), code, stdout, stderr)
		}
	}
	if n := d.count(t, "email-sender"); n != 2 {
		t.Errorf("a refused replay changed the dead letters: %d left, want 2", n)
	}
	for _, args := range [][]string{{"dlq", "list", "--help"}, {"dlq", "replay", "--group", "email-sender", "-h"}} {
		stdout, stderr, code := conveyor(t, d.env, args...)
		if code != 0 || stdout != "" || !strings.Contains(stderr, "Flags:") || !strings.Contains(stderr, "-group") {
			t.Errorf("conveyor %s: exit %d\n%s%s", strings.Join(args, " "), code, stdout, stderr)
		}
	}
	if n := d.count(t, "email-sender"); n != 2 {
		t.Errorf("replay --help replayed: %d left, want 2", n)
	}
	for _, args := range [][]string{{"schedules", "list", "--json"}, {"status", "groups", "--json"}, {"version", "x"}} {
		stdout, stderr, code := conveyor(t, d.env, args...)
		if code != 2 || stdout != "" || !strings.Contains(stderr, "unexpected argument \""+args[1]+"\"") {
			t.Errorf("conveyor %s: exit %d\n%s%s", strings.Join(args, " "), code, stdout, stderr)
		}
	}
	// Ids are whole (a bare millisecond would pick whichever letter came
	// first in it), limits positive, --after with a group.
	for _, tc := range []struct{ args []string }{
		{[]string{"dlq", "list", "--limit", "0"}},
		{[]string{"dlq", "list", "--after", "1-0"}},
		{[]string{"dlq", "show", "--group", "email-sender", "1700000000000"}},
		{[]string{"dlq", "replay", "--group", "email-sender", "1700000000000"}},
		{[]string{"dlq", "purge", "--group", "email-sender", "x-1"}},
	} {
		stdout, stderr, code := conveyor(t, d.env, tc.args...)
		if code != 2 || stdout != "" {
			t.Errorf("conveyor %s: exit %d, want 2\n%s%s", strings.Join(tc.args, " "), code, stdout, stderr)
		}
	}
	if n := d.count(t, "email-sender"); n != 2 {
		t.Errorf("a refused replay or purge changed the dead letters: %d left, want 2", n)
	}
	// Paging: a page of one, then the page after it.
	var first, second []bus.DeadLetter
	for _, page := range []struct {
		after string
		into  *[]bus.DeadLetter
	}{{"", &first}, {"", &second}} {
		after := page.after
		if page.into == &second {
			after = first[0].ID
		}
		stdout, stderr, code := conveyor(t, d.env, "dlq", "list", "--group", "email-sender", "--limit", "1", "--after", after, "--json")
		if code != 0 || json.Unmarshal([]byte(stdout), page.into) != nil || len(*page.into) != 1 {
			t.Fatalf("dlq list --limit 1 --after %q: exit %d\n%s%s", after, code, stdout, stderr)
		}
	}
	if first[0].ID == second[0].ID || second[0].ID != d.snap["email-sender"][1].ID {
		t.Errorf("pages hold %s then %s, want %s then %s", first[0].ID, second[0].ID, d.snap["email-sender"][0].ID, d.snap["email-sender"][1].ID)
	}
	if stdout, stderr, code := conveyor(t, d.env, "dlq", "list", "--group", "nobody", "--json"); code != 0 || stdout != "[]\n" {
		t.Errorf("dlq list --json of a group without dead letters: exit %d, %q%s; want []", code, stdout, stderr)
	}
	// Flags of other commands still take their values.
	stdout, stderr, code := conveyor(t, d.env, "schedules", "--json")
	if code != 0 || !json.Valid([]byte(stdout)) {
		t.Errorf("conveyor schedules --json: exit %d\n%s%s", code, stdout, stderr)
	}
}

// `dlq replay` keeps, and reports with exit 1, the dead letters of a stream
// that their group does not read in any role (a retired group), which would
// go to a retry stream nobody reads; --force replays them. A group that no
// role has and that has no dead-letter stream (a typo) is refused by replay
// and purge. Replay by ids tries every id and names the missing ones.
func TestDLQReplayRefusesWhatNoRoleReads(t *testing.T) {
	t.Parallel()
	d := startDeadLetters(t)
	ctx := t.Context()
	const retired = "retired-group"
	letter := d.snap["email-sender"][0]
	t.Cleanup(func() {
		_ = d.rdb.Del(context.Background(), bus.DeadLetterStream(retired), bus.RetryStream("email.requested", retired)).Err()
	})
	retiredID, err := d.rdb.XAdd(ctx, &redis.XAddArgs{Stream: bus.DeadLetterStream(retired), Values: letter.Values}).Result()
	if err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"dlq", "replay", "--group", retired, "--all"},
		{"dlq", "replay", "--group", retired, retiredID},
	} {
		stdout, stderr, code := conveyor(t, d.env, args...)
		if code != 1 || strings.TrimSpace(stdout) != "replayed 0 dead letter(s) of "+retired ||
			!strings.Contains(stderr, "group "+retired+" does not read stream email.requested in any role (known groups: document-processor, email-sender, projector)") ||
			!strings.Contains(stderr, "--force") {
			t.Errorf("conveyor %s: exit %d, want 1 and the group, stream and known groups named\n%s%s", strings.Join(args, " "), code, stdout, stderr)
		}
		if n := d.count(t, retired); n != 1 {
			t.Errorf("conveyor %s: %d dead letters left in %s, want 1", strings.Join(args, " "), n, retired)
		}
		if n, _ := d.rdb.Exists(ctx, bus.RetryStream("email.requested", retired)).Result(); n != 0 {
			t.Errorf("conveyor %s made a retry stream that no role reads", strings.Join(args, " "))
		}
	}

	// A letter of email-sender from a stream it does not read stays; the
	// others go.
	d.reset(t)
	stray := map[string]any{}
	for k, v := range letter.Values {
		stray[k] = v
	}
	stray["dlq_stream"] = "document.uploaded"
	strayID, err := d.rdb.XAdd(ctx, &redis.XAddArgs{Stream: bus.DeadLetterStream("email-sender"), Values: stray}).Result()
	if err != nil {
		t.Fatal(err)
	}
	stdout, stderr, code := conveyor(t, d.env, "dlq", "replay", "--group", "email-sender", "--all")
	if code != 1 || strings.TrimSpace(stdout) != "replayed 2 dead letter(s) of email-sender" ||
		!strings.Contains(stderr, "group email-sender does not read stream document.uploaded in any role (it reads email.requested; known groups:") {
		t.Errorf("replay of email-sender with a letter of document.uploaded: exit %d\n%s%s", code, stdout, stderr)
	}
	left, err := d.rdb.XRange(ctx, bus.DeadLetterStream("email-sender"), "-", "+").Result()
	if err != nil || len(left) != 1 || left[0].ID != strayID || d.retries(t, "email.requested", "email-sender") != 2 {
		t.Errorf("left %v (%v) in email-sender, want only %s", left, err, strayID)
	}

	// --force replays them anyway.
	stdout, stderr, code = conveyor(t, d.env, "dlq", "replay", "--group", retired, "--all", "--force")
	if code != 0 || strings.TrimSpace(stdout) != "replayed 1 dead letter(s) of "+retired {
		t.Errorf("replay --force of %s: exit %d\n%s%s", retired, code, stdout, stderr)
	}
	if n := d.retries(t, "email.requested", retired); n != 1 || d.count(t, retired) != 0 {
		t.Errorf("replay --force of %s: %d retries, %d dead letters; want 1 and 0", retired, n, d.count(t, retired))
	}
	// Its dead-letter stream is there, empty: no error.
	if stdout, stderr, code := conveyor(t, d.env, "dlq", "purge", "--group", retired, "--all"); code != 0 {
		t.Errorf("purge of %s, emptied: exit %d\n%s%s", retired, code, stdout, stderr)
	}

	// A mistyped group.
	for _, args := range [][]string{
		{"dlq", "replay", "--group", "email-sendr", "--all"},
		{"dlq", "replay", "--group", "email-sendr", "--all", "--force"},
		{"dlq", "replay", "--group", "email-sendr", letter.ID},
		{"dlq", "purge", "--group", "email-sendr", "--all"},
		{"dlq", "purge", "--group", "email-sendr", letter.ID},
	} {
		stdout, stderr, code := conveyor(t, d.env, args...)
		if code == 0 || stdout != "" ||
			!strings.Contains(stderr, "no dead-letter stream for group email-sendr (known: document-processor, email-sender, projector)") {
			t.Errorf("conveyor %s: exit %d, want an error naming the known groups\n%s%s", strings.Join(args, " "), code, stdout, stderr)
		}
	}

	// Every id is tried; the missing ones are named.
	d.reset(t)
	ids := d.ids("email-sender")
	stdout, stderr, code = conveyor(t, d.env, "dlq", "replay", "--group", "email-sender", ids[0], "1-1", ids[1], "1-2")
	if code != 1 || strings.TrimSpace(stdout) != "replayed 2 dead letter(s) of email-sender" ||
		!strings.Contains(stderr, "dead letter not found: 1-1, 1-2 in group email-sender") {
		t.Errorf("replay of two ids and two missing ones: exit %d\n%s%s", code, stdout, stderr)
	}
	if n, r := d.count(t, "email-sender"), d.retries(t, "email.requested", "email-sender"); n != 0 || r != 2 {
		t.Errorf("replay of two ids and two missing ones: %d dead letters, %d retries; want 0 and 2", n, r)
	}
}

// A full page of `dlq list` after which more letters follow ends with the
// command for the next page (JSON: next_after on its last letter), and that
// command lists the next page.
func TestDLQListSaysWhenMoreFollow(t *testing.T) {
	t.Parallel()
	d := startDeadLetters(t)
	ids := d.ids("email-sender")
	next := "conveyor dlq list --group email-sender --after " + ids[0] + " --limit 1"
	for _, tc := range []struct {
		args  []string
		lists []string // the ids of email-sender listed
		more  []string // the more: lines, last
	}{
		{[]string{"dlq", "list", "--group", "email-sender", "--limit", "1"}, ids[:1], []string{next}},
		// document-processor has one: a full page, and no more.
		{[]string{"dlq", "list", "--limit", "1"}, ids[:1], []string{next}},
		{[]string{"dlq", "list", "--group", "email-sender", "--limit", "2"}, ids, nil},
		{[]string{"dlq", "list", "--group", "email-sender"}, ids, nil},
		{strings.Fields(next)[1:], ids[1:], nil},
	} {
		stdout, stderr, code := conveyor(t, d.env, tc.args...)
		lines := strings.Split(strings.TrimSpace(stdout), "\n")
		var more []string
		for _, l := range lines {
			if m, ok := strings.CutPrefix(l, "more: "); ok {
				more = append(more, m)
			}
		}
		if code != 0 || !slices.Equal(more, tc.more) || (len(more) > 0 && lines[len(lines)-1] != "more: "+more[len(more)-1]) {
			t.Errorf("conveyor %s: exit %d, more %q, want %q last\n%s%s", strings.Join(tc.args, " "), code, more, tc.more, stdout, stderr)
		}
		for _, id := range ids {
			// By group and id: letters of two groups' streams may share an id.
			listed := slices.ContainsFunc(lines, func(l string) bool {
				f := strings.Fields(l)
				return len(f) > 1 && f[0] == "email-sender" && f[1] == id
			})
			if listed != slices.Contains(tc.lists, id) {
				t.Errorf("conveyor %s: lists %s: %v, want %v\n%s", strings.Join(tc.args, " "), id, listed, slices.Contains(tc.lists, id), stdout)
			}
		}
	}
	for _, tc := range []struct {
		limit string
		want  []string // next_after of each listed letter
	}{
		{"1", []string{ids[0]}},
		{"2", []string{"", ""}},
	} {
		stdout, stderr, code := conveyor(t, d.env, "dlq", "list", "--group", "email-sender", "--json", "--limit", tc.limit)
		var got []struct {
			ID        string `json:"id"`
			NextAfter string `json:"next_after"`
		}
		if code != 0 || json.Unmarshal([]byte(stdout), &got) != nil {
			t.Fatalf("dlq list --json --limit %s: exit %d\n%s%s", tc.limit, code, stdout, stderr)
		}
		var nexts []string
		for _, g := range got {
			nexts = append(nexts, g.NextAfter)
		}
		if !slices.Equal(nexts, tc.want) {
			t.Errorf("dlq list --json --limit %s: next_after %q, want %q\n%s", tc.limit, nexts, tc.want, stdout)
		}
	}
}
