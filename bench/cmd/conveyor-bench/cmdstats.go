package main

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/redis/go-redis/v9"
)

// cmdStat is one command's line of Redis's INFO commandstats: how often it
// ran and the microseconds Redis spent running it (not reading the request
// or writing the reply).
type cmdStat struct {
	calls, usec int64
}

// commandStats reads INFO commandstats, keyed by lower-case command name
// ("xadd", "xinfo|groups"), or nil if Redis does not answer.
func commandStats(ctx context.Context, rdb *redis.Client) map[string]cmdStat {
	info, err := rdb.Info(ctx, "commandstats").Result()
	if err != nil {
		return nil
	}
	return parseCommandStats(info)
}

func parseCommandStats(info string) map[string]cmdStat {
	out := map[string]cmdStat{}
	for _, line := range strings.Split(info, "\n") {
		name, fields, ok := strings.Cut(strings.TrimSpace(line), ":")
		name, found := strings.CutPrefix(name, "cmdstat_")
		if !ok || !found {
			continue
		}
		var st cmdStat
		for _, f := range strings.Split(fields, ",") {
			k, v, _ := strings.Cut(f, "=")
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				continue
			}
			switch k {
			case "calls":
				st.calls = n
			case "usec":
				st.usec = n
			}
		}
		out[name] = st
	}
	return out
}

// perUnitByCommand describes, from two snapshots of commandStats taken
// around a window of n units, the calls per unit and Redis's time per unit
// of each command that took at least 1% of the time, most costly first.
func perUnitByCommand(before, after map[string]cmdStat, n int64, unit string) string {
	if before == nil || after == nil || n <= 0 {
		return ""
	}
	type row struct {
		name        string
		calls, usec float64
	}
	var rows []row
	var total float64
	for name, a := range after {
		b := before[name]
		r := row{name: strings.ToUpper(name), calls: float64(a.calls-b.calls) / float64(n), usec: float64(a.usec-b.usec) / float64(n)}
		if r.usec > 0 {
			rows = append(rows, r)
			total += r.usec
		}
	}
	if total == 0 {
		return ""
	}
	slices.SortFunc(rows, func(a, b row) int {
		switch {
		case a.usec > b.usec:
			return -1
		case a.usec < b.usec:
			return 1
		}
		return strings.Compare(a.name, b.name)
	})
	var parts []string
	for _, r := range rows {
		if r.usec < total/100 {
			break
		}
		parts = append(parts, fmt.Sprintf("%s %.1f µs (calls: %s)", r.name, r.usec, formatNum(r.calls)))
	}
	return fmt.Sprintf("Redis time in commands per %s: %.1f µs: %s", unit, total, strings.Join(parts, ", "))
}
