package chaos

import (
	"fmt"
	"strings"
	"text/tabwriter"
	"time"
)

// table renders the report as one table: what was measured, the value,
// and the rule it is held to.
func (r *report) table() string {
	var b strings.Builder
	fmt.Fprintf(&b, "chaos run: mode %s, seed %d, %d requests, %s\n", r.mode, r.seed, r.requests, r.elapsed.Round(time.Second))
	w := tabwriter.NewWriter(&b, 0, 0, 1, ' ', tabwriter.Debug)
	row := func(what, value, rule string) { fmt.Fprintf(w, " %s\t %s\t %s\n", what, value, rule) }
	perKind := func(n [numKinds]int) string {
		return fmt.Sprintf("%d (docs %d / emails %d / events %d)", sum(n), n[kindDocument], n[kindEmail], n[kindEvent])
	}
	row("what", "value", "rule")
	row("accepted (202, in the ledger)", perKind(r.accepted), "")
	row("processed (row in a final status)", perKind(r.processed), "")
	row("LOST (accepted; no row, no final status, or never delivered)", perKind(r.lost), "must be 0")
	row("wrong outcome", perKind(r.wrong), "must be 0")
	row("not accepted (given up after retries)", perKind(r.abandoned),
		fmt.Sprintf("reported; %d retries, %d keys renewed after a stuck 409", r.retried, r.rotated))
	row("repeats on purpose answered with the same id", fmt.Sprintf("%d (%d unsettled)", r.repeated-r.repeatsUnsettled, r.repeatsUnsettled), "a different id fails")
	row("rows no accepted request explains", fmt.Sprint(r.unledgered), "reported (a 202 or 503 the client never saw)")
	row("duplicate deliveries absorbed", fmt.Sprintf("%.0f by the projector inbox, %d by the email sent mark", r.inboxDuplicates, r.markAbsorbed),
		"inbox: projectors' duplicate counter, banked before each stop (lower bound); mark: sender log lines")
	row("DUPLICATE EFFECTS in PostgreSQL", fmt.Sprint(r.dupEffects), "must be 0 (inbox rows beyond rows, two outcomes, two rows per request)")
	mail := "not checked (no SMTP server)"
	if r.mailChecked {
		mail = fmt.Sprintf("%d of %d messages", r.dupEmails, r.mails)
	}
	row("duplicate emails (Mailpit copies per Message-ID - 1)", mail,
		fmt.Sprintf("<= %d = %d handler stops x concurrency %d", r.dupEmailBudget, r.handlerStops, r.handlerConcurrency))
	for _, g := range sortedKeys(r.deadLetters) {
		d := r.deadLetters[g]
		row("DEAD-LETTERED by "+g, fmt.Sprintf("%d of %d poison expected (%d duplicated, %d missing, %d not poison)",
			d.got, d.want, d.duplicates, d.missing, len(d.unexpected)), "must equal the poison")
	}
	var faults []string
	for k := range numFaults {
		faults = append(faults, fmt.Sprintf("%s %d/%d", k, r.faults[k], r.faultsPlanned[k]))
	}
	row("faults injected (done/planned)", strings.Join(faults, ", "), fmt.Sprintf("%d poison entries", r.poison))
	for _, role := range []string{roleHandler, roleProjector} {
		longest, kills, stuck := maxRecovery(r.recoveries, role)
		if kills == 0 {
			continue
		}
		row("max recovery after kill -9 of a "+role, longest.Round(10*time.Millisecond).String(),
			fmt.Sprintf("%d kills, %d not recovered; until its pending entries are claimed or finished (XPENDING)", kills, stuck))
	}
	lat := func(d []time.Duration) string {
		if len(d) == 0 {
			return "n/a"
		}
		return fmt.Sprintf("p50 %s, p99 %s (%d rows)", percentile(d, 0.5).Round(time.Millisecond), percentile(d, 0.99).Round(time.Millisecond), len(d))
	}
	row("replicas that exited by themselves", fmt.Sprint(len(r.exits)), "reported; restarted as compose's restart: unless-stopped would")
	row("groups with a stale lag counter once drained", fmt.Sprint(len(r.oddLag)), "reported: Redis's lag contradicts last-delivered-id")
	row("latency accept -> final row, documents", lat(r.docLatency), "documents.updated_at - uploaded_at")
	row("latency accept -> final row, emails", lat(r.emailLatency), "emails.updated_at - requested_at (POST /v1/emails)")
	_ = w.Flush()
	return b.String()
}
